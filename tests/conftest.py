"""Shared fixtures: one real local Ray for the whole session (start-up costs ~6 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 4 logical CPUs shared by every test that needs one."""
    import ray

    from smpp_ray.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
