"""jobs/<stage>.py's supervisor: a driver that dies on a signal is reported plainly."""

from __future__ import annotations

import json
import logging
import signal
import sys

from smpp_ray.job_entry import describe_signal_death, submission_id, supervise

_ABORT_IN_PROTOTYPES = ("import os, signal\n"
                        "print('stage prepare: starting'); print('stage prepare: done')\n"
                        "print('stage prototypes: starting', flush=True)\n"
                        "os.kill(os.getpid(), signal.SIGABRT)\n")


def test_a_child_killed_by_a_signal_is_named_with_its_stage(capsys, caplog, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"metadata": {"job_submission_id": "smoke-7"}}))
    with caplog.at_level(logging.ERROR, logger="smpp_ray.job_entry"):
        code = supervise([sys.executable, "-c", _ABORT_IN_PROTOTYPES], "pipeline")
    assert code == 128 + signal.SIGABRT
    assert "stage prototypes: starting" in capsys.readouterr().out  # the child's output is echoed
    message = caplog.records[-1].getMessage()
    assert "SIGABRT (6)" in message and "during stage 'prototypes'" in message
    assert "ray job logs smoke-7" in message


def test_exit_codes_pass_through_unchanged():
    assert supervise([sys.executable, "-c", "raise SystemExit(2)"], "prepare") == 2
    assert supervise([sys.executable, "-c", "print('ok')"], "prepare") == 0


def test_messages_outside_a_job_and_before_any_stage(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert submission_id() == ""
    text = describe_signal_death("train", signal.SIGKILL, "", "")
    assert "SIGKILL (9) before any stage started" in text and "out-of-memory" in text
