"""Where a run came from: the code's git commit, the user, how it was started.

One owner for these facts, read by MLflow tagging (:mod:`smpp_ray.tracking`) and the report.
A job submitted with ``jobs/submit.sh`` runs from an uploaded copy without ``.git``, so the
client's commit travels as ``SMPP_GIT_COMMIT`` in the job's runtime env.
"""

from __future__ import annotations

import functools
import getpass
import os
import shlex
import subprocess
import sys
from pathlib import Path

#: Set by jobs/submit.sh from the client's checkout; wins over a local git lookup.
GIT_COMMIT_ENV = "SMPP_GIT_COMMIT"


def git_commit() -> str:
    """The commit of the code: ``$SMPP_GIT_COMMIT``, else that of the checkout this package runs
    from ('' when there is none: an installed wheel, an uploaded job folder, no git binary)."""
    return os.environ.get(GIT_COMMIT_ENV, "").strip() or _checkout_commit()


@functools.cache
def _checkout_commit() -> str:
    package_dir = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        return str(os.getuid())


def in_ray_job() -> bool:
    """True inside a ``ray job submit`` driver (Ray sets the job's config in its environment)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def command_line() -> str:
    """How this process was started, e.g. ``smpp pipeline --config jobs/configs/demo.yaml``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return shlex.join([name, *sys.argv[1:]])


def run_source_tags() -> dict[str, str]:
    """MLflow's own provenance tags, which its fluent API sets and an explicit client does not:
    the UI's User, Source and Version columns."""
    tags = {"mlflow.user": user(), "mlflow.source.name": command_line()[:500],
            "mlflow.source.type": "JOB" if in_ray_job() else "LOCAL"}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
