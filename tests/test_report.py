"""The HTML report of a real pipeline, rendered in headless Chromium: every section is there,
the numbers are the pipeline's, nothing unreadable (NaN, Unix timestamps) reaches the page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from smpp_ray.report.leaderboard import bootstrap_intervals
from smpp_ray.report.markup import fmt

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian package `chromium`; `make test` installs it "
                             "when run as root, or: apt-get install -y chromium)")


class _Page(HTMLParser):
    """Section ids with their <h2> text, image count and the visible text of a rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self.text: list[str] = []
        self._section: str | None = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs.get("id")
            self.sections[self._section] = ""
        elif tag == "h2":
            self._in_h2 = True
        elif tag == "img":
            self.images.append(attrs.get("src", "")[:40])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2 and self._section:
            self.sections[self._section] += data


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,3000", *args], capture_output=True, text=True, timeout=120,
                          check=True)


@pytest.fixture(scope="module")
def report(smoke_pipeline, tmp_path_factory):
    """The report of the session's smoke pipeline, written to a folder of its own."""
    from smpp_ray.evaluate import load_results, metadata_baseline_predictions
    from smpp_ray.report import write_report
    from smpp_ray.stage_table import pipeline_layout
    from smpp_ray.tracking import resolve_tracking_uri

    config, out, _ = smoke_pipeline
    layout = pipeline_layout(str(out))
    table = load_results(layout["report"])["table"]
    baseline = metadata_baseline_predictions(layout["features"], seed=config.tune.seed)
    layout["report"] = str(tmp_path_factory.mktemp("report"))
    location = write_report(layout, table, resolve_tracking_uri(config.tracking.tracking_uri, str(out)),
                            baseline=baseline)
    return config, out, location


def test_fmt_rounds_and_hides_missing():
    assert fmt(0.6471042471042471) == "0.6471"
    assert fmt(float("nan")) == fmt(None) == "-"
    assert fmt(np.float32(1234.5678)) == "1235"
    assert fmt(36) == "36"


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.normal(size=200)
    p = {"good": y + rng.normal(scale=0.3, size=200), "noise": rng.normal(size=200)}
    first, again = bootstrap_intervals(y, p, resamples=200), bootstrap_intervals(y, p, resamples=200)
    assert first == again
    mae = float(np.mean(np.abs(y - p["good"])))
    assert first["good"]["mae"][0] < mae < first["good"]["mae"][1]
    assert first["good"]["src"][0] > first["noise"]["src"][1]  # a real signal is told apart from noise


def test_bootstrap_spearman_equals_scipy():
    from scipy import stats

    from smpp_ray.report.leaderboard import _rowwise_spearman

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, size=(20, 50)).astype(float), rng.normal(size=(20, 50))  # ties in a
    expected = [stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(_rowwise_spearman(a, b), expected, atol=1e-12)


def test_data_summary_counts_rejects_by_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smpp_ray.data.manifest import DatasetManifest
    from smpp_ray.data.schema import REJECTS_SCHEMA
    from smpp_ray.report.data_summary import data_section

    (tmp_path / "rejects").mkdir()
    rows = [{"source_file": "train_label.txt", "row_index": i, "pid": str(i), "uid": "u", "field": field,
             "reason": reason} for i, (field, reason) in enumerate([("label", "not a number")] * 3
                                                                  + [("image", "unreadable JPEG")])]
    pq.write_table(pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA), tmp_path / "rejects" / "part-00000.parquet")
    manifest = {"counts": {"input_rows": 10, "written": 6, "rejected": 4, "per_split": {"train": 4, "val": 1,
                                                                                         "test": 1}},
                "split": {"method": "time", "boundaries": {"train": {"start": 1446574947, "end": 1479456333}}},
                "time_range": {"start": 1446574947, "end": 1488311391}}
    page = data_section(str(tmp_path), DatasetManifest(manifest))
    assert "<td>label</td><td>not a number</td><td>3</td>" in page
    assert "<td>image</td><td>unreadable JPEG</td><td>1</td>" in page
    assert "2015-11-03" in page and "2017-02-28" in page and "1446574947" not in page
    # data.test_fraction=0 and no unlabelled posts: an empty split, its bounds null in the manifest
    manifest["split"]["boundaries"]["test"] = None
    manifest["counts"]["per_split"]["test"] = 0
    assert "2015-11-03" in data_section(str(tmp_path), DatasetManifest(manifest))


def test_a_booster_scores_an_empty_split_as_no_rows():
    """data.test_fraction=0: the refit predicts the empty test split (the boosters refuse it)."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from smpp_ray.gbdt.trainables import predict

    X = pd.DataFrame({"a": np.arange(50, dtype=np.float32), "b": np.ones(50, dtype=np.float32)})
    booster = lgb.train({"verbosity": -1, "min_data_in_leaf": 5}, lgb.Dataset(X, np.arange(50.0)), num_boost_round=3)
    assert predict(booster, X.iloc[:0]).shape == (0,)
    assert predict(booster, X.iloc[:2]).shape == (2,)


def test_mlflow_links_point_at_the_server_without_its_credentials(monkeypatch):
    from smpp_ray.report import facts

    monkeypatch.setattr(facts, "_experiment_ids", lambda summaries, uri: {"abc123": "7"})
    from smpp_ray.summary import StageSummary

    tune = StageSummary.from_dict("runs/x/tune", {"stage": "tune", "status": "complete", "mlflow_run_id": "abc123",
                                                  "seconds": 61.0})
    rows, how = facts.mlflow_rows({"tune": tune},
                                  "https://ml:s3cret@mlflow.example:5000/")
    cell = rows[0][1]
    assert 'href="https://***@mlflow.example:5000/#/experiments/7/runs/abc123"' in cell
    assert "s3cret" not in cell + how and rows[0][2] == "1 min 1 s"
    _, local = facts.mlflow_rows({}, "sqlite:////tmp/x/mlruns.db")
    assert "mlflow ui --backend-store-uri sqlite:////tmp/x/mlruns.db" in local


def test_git_commit_comes_from_the_job_when_set(monkeypatch):
    from smpp_ray.report import facts

    monkeypatch.setenv(facts.GIT_COMMIT_ENV, "0123abcd")
    assert facts.git_commit() == "0123abcd"


@pytest.mark.slow
@needs_chromium
def test_report_renders_every_section_in_chromium(report, tmp_path):
    from smpp_ray.report import SECTIONS
    from smpp_ray.summary import read_summary

    config, out, location = report
    dom = _chromium("--dump-dom", f"file://{location}").stdout
    page = _Page()
    page.feed(dom)
    for anchor, title in SECTIONS:
        assert page.sections.get(anchor) == title, f"section #{anchor} ({title!r}) missing from the rendered page"
    text = " ".join(page.text)
    assert "randomly initialised" in text  # the smoke config has model.pretrained empty
    assert "NaN" not in text and "nan " not in text
    assert not re.search(r"\b1[3-9]\d{8}\b", text), "a Unix timestamp reached the page"
    assert "mlflow ui --backend-store-uri" in text
    for stage in ("prepare", "train", "extract", "tune"):
        assert read_summary(str(out / {"prepare": "data", "extract": "features"}.get(stage, stage))).mlflow_run_id \
            in text
    # The leaderboard's numbers are the tune stage's, recomputed from its saved predictions.
    tune = read_summary(str(out / "tune")).metrics
    for model in ("lightgbm", "catboost", "blend"):
        assert f"{fmt(tune[model]['test_src'])} [" in text and fmt(tune[model]["val_mae"]) in text
    assert len([src for src in page.images if src.startswith("data:image/png")]) >= 5
    assert len([src for src in page.images if src.startswith("data:image/jpeg")]) == 8  # worst posts

    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", f"file://{location}")
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] == 1400
        colours = image.convert("RGB").resize((350, 750)).getcolors(maxcolors=1 << 20)
    assert shot.stat().st_size > 50_000 and len(colours) > 200, "the screenshot is (nearly) blank"


@pytest.mark.slow
def test_stage_summaries_are_strict_json(smoke_pipeline):
    """summary.json is read by other tools too: no NaN or Infinity, which JSON does not have."""
    _, out, _ = smoke_pipeline

    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} in a summary.json")

    for summary in sorted(out.glob("*/summary.json")):
        json.loads(summary.read_text(), parse_constant=refuse)
