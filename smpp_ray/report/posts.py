"""The worst-predicted test posts, with their thumbnails from the prepared dataset's shards."""

from __future__ import annotations

import base64

import pandas as pd
import pyarrow.parquet as pq

from smpp_ray import storage
from smpp_ray.data.dataset import Dataset
from smpp_ray.report.markup import esc, fmt, img

WORST = 8


def worst_posts(test: pd.DataFrame, count: int = WORST) -> pd.DataFrame:
    """The ``count`` labelled rows with the largest |pred - label|, worst first."""
    errors = (test["pred"] - test["label"]).abs()
    return test.assign(error=test["pred"] - test["label"]).loc[errors.sort_values(ascending=False).index[:count]]


def read_posts(data_dir: str, pids: list[str]) -> pd.DataFrame:
    """``pid, image, title, tags`` of the given test posts (JPEG bytes as the prepare stage wrote them)."""
    fs, path = storage.resolve(Dataset(data_dir).posts("test"))
    frame = pq.read_table(path, columns=["pid", "image", "title", "tags"], filesystem=fs,
                          filters=[("pid", "in", pids)]).to_pandas()
    return frame.assign(pid=frame["pid"].astype(str))


def worst_posts_html(data_dir: str, test: pd.DataFrame, model: str) -> str:
    worst = worst_posts(test)
    if worst.empty:
        return "<p>No labelled test posts.</p>"
    try:
        posts = read_posts(data_dir, worst["pid"].tolist()).set_index("pid")
    except Exception as err:  # the dataset moved: the table is still worth showing
        posts = pd.DataFrame(columns=["image", "title", "tags"])
        missing = f"<p>Thumbnails not read from the prepared dataset ({esc(type(err).__name__)}).</p>"
    else:
        missing = ""
    cards = []
    for row in worst.itertuples():
        post = posts.loc[row.pid] if row.pid in posts.index else None
        thumb = img(base64.b64encode(post["image"]).decode(), f"post {row.pid}", "image/jpeg", cls="thumb") \
            if post is not None and post["image"] else "<p>(no image)</p>"
        title = (post["title"] or "(no title)") if post is not None else "-"
        cards.append(f'<div class="post">{thumb}<div><b>pid {esc(row.pid)}</b> · {esc(row.category)}</div>'
                     f"<div>true {fmt(row.label)} · predicted {fmt(row.pred)} · error <b>{fmt(row.error)}</b></div>"
                     f"<div>{esc(str(title)[:80])}</div></div>")
    return (f"<p>The {len(worst)} test posts with the largest |error| of <b>{esc(model)}</b> "
            "(error = predicted - true, in log views); thumbnails as stored in the prepared dataset.</p>"
            + missing + '<div class="posts">' + "".join(cards) + "</div>")
