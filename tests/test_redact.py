"""Credentials in a location never reach what a run writes."""

from __future__ import annotations

import pandas as pd
import pytest

from smpp_ray.redact import redact_uri, redact_values


@pytest.mark.parametrize(("text", "expected"), [
    ("http://smpp-admin:s3cret@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("postgresql://mlflow:pa%40ss@db.internal:5432/mlflow", "postgresql://***@db.internal:5432/mlflow"),
    ("https://tok3n@mlflow.example/x and s3://bucket/key", "https://***@mlflow.example/x and s3://bucket/key"),
    ("sqlite:////tmp/run/mlruns.db", "sqlite:////tmp/run/mlruns.db"),
    ("user@example.com wrote s3://b/k", "user@example.com wrote s3://b/k"),
])
def test_redact_uri_removes_userinfo_only(text, expected):
    assert redact_uri(text) == expected


def test_redact_values_leaves_non_strings_alone():
    assert redact_values({"a": "http://u:p@h", "b": 3, "c": None}) == {"a": "http://***@h", "b": 3, "c": None}


def test_results_console_never_shows_a_password(capsys):
    from smpp_ray.evaluate import print_results

    table = pd.DataFrame({"model": ["blend"], "src": [0.5]})
    print_results({"table": table, "report": "/tmp/report.html",
                   "tracking_uri": "http://smpp-admin:s3cret@127.0.0.1:5000"})
    shown = capsys.readouterr().out
    assert "s3cret" not in shown and "http://***@127.0.0.1:5000" in shown
