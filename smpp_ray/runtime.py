"""Connecting the driver to Ray: a cluster when an address is given, else a local Ray."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def init_ray(address: str = "", num_cpus: int = 0, object_store_memory_mb: int = 0) -> None:
    """Start or join Ray once per process.

    Inside ``ray job submit`` (RAY_ADDRESS set) or with an explicit address this joins the
    cluster. Otherwise it starts a local Ray with *logical* CPUs declared explicitly: on a
    2-core machine training workers that hold every CPU leave Ray Data backpressured forever,
    so we declare at least 4.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        logger.info("joining Ray cluster at %s", address)
        cwd = os.getcwd()
        # A loopback address is a cluster on this host whose nodes keep 127.0.0.1 as their IP:
        # joining it must not turn the address into the host's (where nothing listens).
        joining = _loopback_only() if _is_loopback(address) else contextlib.nullcontext()
        with joining:
            ray.init(address=address, log_to_driver=True)
        _check_working_dir(cwd)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    kwargs: dict = {"num_cpus": cpus, "include_dashboard": False}
    if object_store_memory_mb:
        kwargs["object_store_memory"] = object_store_memory_mb * 1024 * 1024
    logger.info("starting a local Ray with %d logical CPUs on 127.0.0.1", cpus)
    with _loopback_only():
        ray.init(**kwargs)
    quiet_ray_data_progress()


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) names this host's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Keep a local Ray's services on 127.0.0.1 while it starts.

    Ray binds a node's servers (GCS, raylet, object manager, agents, every worker's gRPC server)
    to loopback only when the node's IP is exactly 127.0.0.1, and on Linux it replaces 127.0.0.1
    with the host's routable address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. A local Ray
    serves this one process, so nothing of it should listen on the network. The variable reaches
    the processes Ray starts (they inherit it, and every worker inherits the raylet's); the
    driver read it when it imported Ray, so its module constant is set for the start too. Both
    are restored afterwards: a later ``ray start`` from this process must be able to join
    a real cluster.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


def _check_working_dir(before: str) -> None:
    """Fail clearly if joining the cluster deleted this driver's working folder.

    A job driver runs inside its unpacked ``working_dir``. Two Ray nodes on one host that share
    a ``--temp-dir`` share that folder, and the second node's runtime-env agent re-extracts it
    while the driver runs there; the next native library that calls ``getcwd`` (torch's oneMKL)
    then aborts the process. ``cluster/local.sh`` gives each node its own temp folder.
    """
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    if os.path.isdir(before):
        logger.warning("this driver's working folder %s was deleted and re-created while joining Ray "
                       "(two Ray nodes sharing one --temp-dir on this host?); moving back into it", before)
        os.chdir(before)
        return
    raise RuntimeError(f"this driver's working folder {before} was deleted while joining Ray; two Ray nodes "
                       "on one host must not share a --temp-dir (start each with its own)")


def quiet_ray_data_progress() -> None:
    """Ray Data's per-operator progress bars flood non-interactive logs; keep one summary line."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("SMPP_RAY_PROGRESS", "0") == "1"
