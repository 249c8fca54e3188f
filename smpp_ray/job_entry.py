"""What ``jobs/<stage>.py`` runs under ``ray job submit``: the stage in a supervised child process.

A job driver that dies on a signal (a native library aborting, the kernel's OOM killer) reaches
the user as Ray's bare "exit code 134" or "-9". Running the stage in a child lets this process
outlive it and say plainly which stage died, on which signal, and where the whole log is. The
child inherits the job's environment (``RAY_ADDRESS``), so it joins the cluster as the job driver
would, and the process group, so ``ray job stop`` still reaches it. A stop that reaches only this
process is forwarded; the stopped child's exit code (128 + the signal) is this job's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)

#: The line every stage logs first (``stages._run_stage``); the last one seen names the stage.
_STAGE_STARTED = re.compile(r"stage (\w+): starting")


def submission_id() -> str:
    """The ``ray job submit`` submission id of this job, or '' outside a job."""
    try:
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return ""
    return str(job_config.get("metadata", {}).get("job_submission_id", ""))


def describe_signal_death(command: str, signum: int, stage: str, job_id: str) -> str:
    """The message for a child that died on ``signum`` while ``stage`` ran."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    where = f"during stage {stage!r}" if stage else "before any stage started"
    if job_id:
        log = f"the whole driver log: `ray job logs {job_id}` (on the head node: logs/job-driver-{job_id}.log)"
    else:
        log = "the whole log is the output above"
    hint = {
        signal.SIGABRT: "a native library aborted (its message is just above)",
        signal.SIGKILL: "killed from outside: the kernel's out-of-memory killer or `ray job stop`",
        signal.SIGSEGV: "a native library crashed (the Python stack is just above)",
        signal.SIGTERM: "asked to stop (`ray job stop`, or the node shutting down)",
    }.get(signum, "")
    return (f"smpp {command}: the driver process died on {name} ({signum}) {where}"
            + (f"; {hint}" if hint else "") + f"; {log}")


def supervise(child: Sequence[str], command: str) -> int:
    """Run ``child``, echo its output, and return its exit code (128 + N for signal N)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stage = ""
    process = subprocess.Popen(list(child), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               text=True, errors="replace", bufsize=1)
    forwarded: list[int] = []

    def forward_signal(num: int, _frame: object) -> None:
        forwarded.append(num)
        process.send_signal(num)

    # A stop request that reaches only this process is passed on, so the child ends cleanly too:
    # it marks its MLflow runs KILLED and exits with 128 + the signal (smpp_ray.tracking).
    forward = {s: signal.signal(s, forward_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            match = _STAGE_STARTED.search(line)
            if match:
                stage = match.group(1)
        code = process.wait()
    finally:
        for s, previous in forward.items():
            signal.signal(s, previous)
    if code < 0:
        logger.error("%s", describe_signal_death(command, -code, stage, submission_id()))
        return 128 - code
    if forwarded and code == 128 + forwarded[0]:
        where = f"during stage {stage!r}" if stage else "before any stage started"
        logger.error("smpp %s: stopped by %s %s; rerun the same job to resume", command,
                     signal.Signals(forwarded[0]).name, where)
    return code


def run_job(command: str, argv: Sequence[str]) -> int:
    """``smpp <command> <argv>`` as a supervised child of this job driver."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return supervise([sys.executable, "-m", "smpp_ray.cli", command, *argv], command)
