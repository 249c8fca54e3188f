"""Connecting the driver to Ray: a cluster when an address is given, else a local Ray."""

from __future__ import annotations

import logging
import os

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
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    kwargs: dict = {"num_cpus": cpus, "include_dashboard": False}
    if object_store_memory_mb:
        kwargs["object_store_memory"] = object_store_memory_mb * 1024 * 1024
    logger.info("starting a local Ray with %d logical CPUs", cpus)
    ray.init(**kwargs)
    _quiet_ray_data_progress()


def _quiet_ray_data_progress() -> None:
    """Ray Data's per-operator progress bars flood non-interactive logs; keep one summary line."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("SMPP_RAY_PROGRESS", "0") == "1"
