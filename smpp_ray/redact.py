"""Keep credentials out of what a run writes: console lines, logs, MLflow params, reports.

A location may carry a password in its userinfo (``http://user:PASSWORD@mlflow:5000``,
``postgresql://mlflow:PASSWORD@db/mlflow``); everything that shows a location shows it
through :func:`redact_uri`, and config values reach MLflow through :func:`redact_values`.
"""

from __future__ import annotations

import re
from typing import Any

#: ``scheme://user:password@`` or ``scheme://token@``: the userinfo part of a URI
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
REDACTED = "***"


def redact_uri(text: str) -> str:
    """``text`` with the userinfo of every URI in it replaced: ``http://***@host:5000``."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact_values(values: dict[str, Any]) -> dict[str, Any]:
    """The same mapping with every string value passed through :func:`redact_uri`."""
    return {key: redact_uri(value) if isinstance(value, str) else value for key, value in values.items()}
