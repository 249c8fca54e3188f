"""`smpp serve` on the session's Ray: a real Ray Serve app on 127.0.0.1, a real HTTP client.

The endpoint is started through ``cli.main(["serve", ...])`` in a thread (it blocks until
stopped), scored posts must equal the evaluation path's scores, concurrent single-post requests
are answered (batched by ``@serve.batch``), a post whose only problem is its image gets the
fallback regressor's score (flagged), and other bad input gets a 4xx naming the field.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from smpp_ray.cli import EXIT_OK, main

pytestmark = pytest.mark.slow
SMOKE = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(smoke_pipeline):
    from smpp_ray import serve as smpp_serve

    _, out, _ = smoke_pipeline
    port = _free_port()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main([
        "serve", "--pipeline", str(out), "--port", str(port), "--config", SMOKE,
        "--set", "serve.cpus_per_replica=0.5", "--set", "serve.max_batch_size=4",
        "--set", "serve.batch_wait_timeout_s=0.05", "--set", "tracking.enabled=false"])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:  # not listening yet, or the replica still loading
            pass
        assert thread.is_alive(), f"smpp serve exited with {codes}"
        time.sleep(1)
    else:
        pytest.fail("the endpoint did not become healthy in 240 s")
    yield url
    smpp_serve.request_stop()
    thread.join(timeout=120)
    assert codes == [EXIT_OK]


@pytest.fixture(scope="module")
def test_posts(smoke_pipeline):
    import pyarrow.parquet as pq

    from smpp_ray.scoring.pyfunc import posts_to_json, posts_to_smpd_frame

    _, out, _ = smoke_pipeline
    posts = pq.read_table(out / "data" / "posts" / "split=test").to_pandas().head(12)
    predictions = pd.read_parquet(out / "tune" / "predictions.parquet").set_index("pid")
    return posts_to_json(posts_to_smpd_frame(posts)), predictions


def test_healthz_names_the_scorer(endpoint):
    body = requests.get(f"{endpoint}/healthz", timeout=10).json()
    assert body["status"] == "ok" and set(body["families"]) == {"lightgbm", "catboost"}
    assert body["fallback"] == "lightgbm"


def test_posts_scored_online_equal_the_evaluation_path(endpoint, test_posts):
    posts, predictions = test_posts
    response = requests.post(f"{endpoint}/predict", json={"posts": posts[:5]}, timeout=120)
    assert response.status_code == 200, response.text
    scores = response.json()["scores"]
    assert [s["pid"] for s in scores] == [p["Pid"] for p in posts[:5]]
    got = np.array([s["predicted_popularity"] for s in scores])
    np.testing.assert_allclose(got, predictions.loc[[p["Pid"] for p in posts[:5]], "pred_blend"], atol=1e-6)
    assert all(s["predicted_subcategory"] and s["predicted_category"] for s in scores)
    assert {s["scored_by"] for s in scores} == {"network"}


def test_concurrent_single_post_requests_are_all_answered(endpoint, test_posts):
    posts, predictions = test_posts

    def one(post: dict) -> float:
        response = requests.post(f"{endpoint}/predict", json=[post], timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["scores"][0]["predicted_popularity"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, posts))
    np.testing.assert_allclose(got, predictions.loc[[p["Pid"] for p in posts], "pred_blend"], atol=1e-6)


@pytest.mark.parametrize(("change", "status", "field"), [
    ({"Postdate": "0000-00-00 00:00:00"}, 422, "Postdate"),
    ({"Pid": None}, 422, "Pid"),
    ({"Pid": int("9" * 100)}, 422, "Pid"),   # an id too long to keep, not a 500
    ({"Subcategory": "NotAClassOfThisScorer"}, 422, "Subcategory"),   # predict rejects it too
    ("a subcategory under another category", 422, "Category"),
])
def test_a_bad_post_is_a_4xx_naming_the_field(endpoint, test_posts, smoke_pipeline, change, status, field):
    posts, _ = test_posts
    if isinstance(change, str):  # class names come from the pipeline's own (inferred) class list
        change = _mismatched_class(smoke_pipeline[1])
    bad = {k: v for k, v in {**posts[0], **change}.items() if v is not None}
    response = requests.post(f"{endpoint}/predict", json=[posts[1], bad], timeout=60)
    assert response.status_code == status, response.text
    errors = response.json()["errors"]
    assert [e["index"] for e in errors] == [1] and errors[0]["field"] == field and errors[0]["reason"]


def _mismatched_class(pipeline: Path) -> dict[str, str]:
    """A Category/Subcategory pair of the scorer's taxonomy whose category is not the subcategory's parent."""
    import json

    taxonomy = json.loads((pipeline / "features" / "feature_state" / "state.json").read_text())["taxonomy"]
    sub = taxonomy["subcategories"][0]
    other = next(c["name"] for c in taxonomy["categories"] if c["id"] != sub["category_id"])
    return {"Category": other, "Subcategory": sub["name"]}


@pytest.mark.parametrize("image", [
    "not base64!",
    base64.b64encode(b"%!PS-Adobe-3.0 EPSF").decode(),
    None,  # no image at all
    "truncated",
])
def test_a_post_whose_only_problem_is_its_image_gets_the_fallback_score(endpoint, test_posts, smoke_pipeline, image):
    posts, predictions = test_posts
    _, out, _ = smoke_pipeline
    fallback = pd.read_parquet(out / "tune" / "fallback_predictions.parquet").astype({"pid": str}).set_index("pid")
    if image == "truncated":
        image = base64.b64encode(base64.b64decode(posts[0]["image"])[:60]).decode()
    bad = {k: v for k, v in {**posts[0], "image": image}.items() if v is not None}
    response = requests.post(f"{endpoint}/predict", json=[posts[1], bad], timeout=60)
    assert response.status_code == 200, response.text
    good, rescued = response.json()["scores"]
    assert good["scored_by"] == "network" and "reason" not in good
    assert good["predicted_popularity"] == pytest.approx(predictions.loc[posts[1]["Pid"], "pred_blend"], abs=1e-6)
    assert rescued["pid"] == posts[0]["Pid"] and rescued["scored_by"] == "fallback"
    assert rescued["reason"].startswith("image: ") and rescued["predicted_subcategory"] is None
    assert rescued["predicted_popularity"] == pytest.approx(fallback.loc[posts[0]["Pid"], "pred"], abs=1e-6)


def test_a_bad_field_beside_a_bad_image_is_still_422_naming_only_the_field(endpoint, test_posts):
    posts, _ = test_posts
    no_image = {k: v for k, v in posts[0].items() if k != "image"}
    bad_date = {**posts[1], "Postdate": "0000-00-00 00:00:00"}
    response = requests.post(f"{endpoint}/predict", json=[no_image, bad_date], timeout=60)
    assert response.status_code == 422, response.text
    assert [(e["index"], e["field"]) for e in response.json()["errors"]] == [(1, "Postdate")]


def test_malformed_requests_are_4xx(endpoint):
    assert requests.post(f"{endpoint}/predict", data=b"{not json", timeout=30).status_code == 400
    # Python refuses to read an integer of more than 4,300 digits: still the client's error
    huge = b'[{"Pid": ' + b"9" * 5000 + b"}]"
    assert requests.post(f"{endpoint}/predict", data=huge, timeout=30).status_code == 400
    assert requests.post(f"{endpoint}/predict", json={"posts": "x"}, timeout=30).status_code == 400
    assert requests.post(f"{endpoint}/predict", json=[], timeout=30).status_code == 400
    assert requests.post(f"{endpoint}/predict", json=[{}] * 300, timeout=30).status_code == 413
    assert requests.get(f"{endpoint}/predict", timeout=30).status_code == 405
    assert requests.get(f"{endpoint}/nowhere", timeout=30).status_code == 404
