"""HTML pieces of the report: numbers as a reader wants them, tables, images, sections.

Every value shown goes through :func:`fmt` (4 significant digits, ``-`` for missing or NaN) and
every text through :func:`html.escape`; locations go through :func:`smpp_ray.redact.redact_uri`
before they reach here.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

MISSING = "-"


def fmt(value: Any, digits: int = 4) -> str:
    """``0.6471``, ``1234``, ``-`` for None / NaN; booleans as yes/no; text unchanged."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        if value == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_seconds(seconds: Any) -> str:
    """``42.1 s``, ``3 min 5 s``, ``-``."""
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def esc(text: Any) -> str:
    return html.escape(str(text))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False, cls: str = "",
          caption: str = "") -> str:
    """A table of already formatted cells (escaped unless ``raw``: cells holding markup)."""
    cell = (lambda v: str(v)) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    title = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def png_of(fig) -> str:
    """A matplotlib figure as base64 PNG (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def img(data: str, alt: str, mime: str = "image/png", cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{esc(alt)}" src="data:{mime};base64,{data}"/>'


def note(text: str, kind: str = "note") -> str:
    """A boxed paragraph: ``note`` (grey) or ``warning`` (amber); ``text`` is markup."""
    return f'<div class="{kind}">{text}</div>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1360px;margin:0 auto;padding:0 20px 40px;
     color:#1d1d1f;line-height:1.45;font-size:15px}
h1{margin-top:24px} h2{margin-top:36px;border-bottom:2px solid #e5e5e5;padding-bottom:4px}
h3{margin-bottom:6px}
nav{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #e5e5e5;z-index:1}
nav a{margin-right:16px;text-decoration:none;color:#0a58ca}
table{border-collapse:collapse;margin:8px 0 14px}
caption{text-align:left;font-weight:600;padding:4px 0} td,th{padding:4px 12px;border-bottom:1px solid #ddd;text-align:left;
      vertical-align:top} th{background:#f6f6f6} td.num,th.num{text-align:right}
img.plot{width:100%;max-width:1320px;display:block;margin:8px 0} img.narrow{max-width:1150px}
.warning{background:#fff4d6;border-left:5px solid #e0a800;padding:10px 14px;margin:10px 0}
.note{background:#f3f5f7;border-left:5px solid #9aa5b1;padding:8px 14px;margin:10px 0}
.posts{display:grid;grid-template-columns:repeat(4,1fr);gap:14px}
.post{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.post img{width:100%;image-rendering:pixelated;aspect-ratio:1/1;object-fit:contain;background:#fafafa}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:13px}
code{background:#f3f3f3;padding:1px 4px;white-space:nowrap}
pre code{white-space:pre}
details{margin:8px 0} summary{cursor:pointer;font-weight:600}
"""


def page(title: str, nav: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><nav>{links}</nav>\n"
            + "\n".join(sections) + "</body></html>")
