"""Shared fixtures: one real local Ray for the whole session (start-up costs ~6 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A real local Ray with 4 logical CPUs shared by every test that needs one.

    It starts after the session's S3 server, so every Ray worker inherits the ``AWS_*``
    variables (a worker reads os.environ as it was when Ray started) and any test can hand
    Ray an ``s3://`` location."""
    import ray

    from smpp_ray.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_with_s3(ray_session, s3_endpoint):
    """The session's Ray, checked to reach the S3 server from its workers."""
    @ray_session.remote(num_cpus=0)
    def endpoint_seen_by_workers() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray_session.get(endpoint_seen_by_workers.remote()) == s3_endpoint
    return ray_session


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process: Ray workers run beside it on 2 cores, and
    oversubscribed torch threads turn 2-second steps into minutes."""
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 server (moto) on 127.0.0.1 for the session, with the standard AWS_* variables
    set in this process (pyarrow and MLflow read them); yields the endpoint URL."""
    from environ import environ
    from s3_server import moto_server, s3_env

    with moto_server(tmp_path_factory.mktemp("s3") / "moto.log") as endpoint, environ(s3_env(endpoint)):
        yield endpoint


def _fresh_bucket(endpoint: str) -> str:
    import uuid

    from s3_server import create_bucket

    bucket = f"smpp-{uuid.uuid4().hex[:10]}"
    create_bucket(endpoint, bucket)
    return f"s3://{bucket}"


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the session's S3 server for one test; ``s3://<bucket>``."""
    return _fresh_bucket(s3_endpoint)


@pytest.fixture(scope="module")
def module_bucket(s3_endpoint):
    """One bucket for a module whose stages build on each other; ``s3://<bucket>``."""
    return _fresh_bucket(s3_endpoint)


#: Subcategory names the package has never seen (the first five are real SMPD names, commas
#: included), one per packaged subcategory: the session pipeline's corpus is classed with them.
def unseen_subcategory_names(count: int) -> list[str]:
    real = ["StreetArt", "Love", "Books", "Good,Morning", "Health,Fitness"]
    return real + [f"Corpus,Class{i:02d}" for i in range(count - len(real))]


def rename_classes(raw, names: dict[str, str]) -> None:
    """Rename the subcategories of a raw SMPD folder's category file and drop its taxonomy.json,
    so prepare infers the classes from the rows (as it must for the real SMPD)."""
    import json

    for name in ("train_category.json", "test_category.json"):
        path = raw / name
        if path.exists():
            records = json.loads(path.read_text())
            for record in records:
                record["Subcategory"] = names[record["Subcategory"]]
            path.write_text(json.dumps(records))
    (raw / "taxonomy.json").unlink()


@pytest.fixture(scope="session")
def smoke_pipeline(ray_session, tmp_path_factory):
    """One smoke pipeline (real Ray and MLflow; minutes on 2 cores) for the session: the
    pipeline, predict, registry, Serve and CLI tests all read it. Yields (config, out, result).

    As a user with a corpus of their own runs it: ``--raw`` names the corpus (so the synth stage
    does not run), whose subcategory names the package has never seen and which carries no class
    list: every stage runs on the classes prepare infers, with the default config.

    ``SMPP_TEST_PIPELINE=<folder>`` reuses a smoke pipeline finished there (a development
    shortcut: the run below then skips every complete stage); CI builds a fresh one."""
    from pathlib import Path

    from smpp_ray.config import load_config
    from smpp_ray.data.synth import synthesize_corpus
    from smpp_ray.data.taxonomy_names import default_taxonomy
    from smpp_ray.pipeline import run_pipeline

    root = Path(__file__).resolve().parents[1]
    reuse = os.environ.get("SMPP_TEST_PIPELINE")
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("pipeline")
    config = load_config(root / "jobs" / "configs" / "smoke.yaml", ["synth.test_posts=0"])
    raw = out / "raw"
    if not (raw / "train_category.json").exists():
        s = config.synth
        synthesize_corpus(str(raw), posts=s.posts, seed=s.seed, image_size=s.image_size, users=s.users)
        packaged = default_taxonomy().subcategories
        rename_classes(raw, dict(zip(packaged, unseen_subcategory_names(len(packaged)), strict=True)))
    # A relative --out, as `make demo` passes: Ray workers and Tune trials run in other folders.
    previous = os.getcwd()
    os.chdir(out.parent)
    try:
        result = run_pipeline(config, out.name, raw_dir=f"{out.name}/raw")
    finally:
        os.chdir(previous)
    return config, out, result
