"""``smpp serve``: the scorer online, as a Ray Serve application.

Routes (HTTP on ``serve.host:serve.port``, 127.0.0.1 by default):

- ``POST /predict`` with a JSON list of posts, or ``{"posts": [...]}``: each post an object of
  SMPD fields and ``image``, the JPEG base64-encoded. 200: ``{"scores": [...], "model": ...}``,
  one score per post in order, each with ``scored_by``: ``network``, or ``fallback`` (``prior``
  for a prior-only fallback) with the ``reason`` when the post's image alone is unusable (missing,
  not base64, corrupt, not an image) and the scorer has a fallback regressor: its metadata is
  scored instead. Any other bad field answers 422 with ``errors`` naming each such post's index,
  Pid, field and reason (nothing is scored then); bad JSON 400; too many posts 413.
- ``GET /healthz``: 200 with the scorer's families and fallback once the replica has loaded it.

Posts of concurrent requests are scored together (``@serve.batch``, up to
``serve.max_batch_size``); replicas, CPUs and GPUs per replica come from ``serve.*``. Each replica
resolves the scorer itself (a registered model is downloaded from MLflow onto its own node; a
pipeline folder is read from its location), so replicas on any node of a cluster work alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

from ray import serve

from smpp_ray.config import Config

logger = logging.getLogger(__name__)

APP_NAME = "smpp-scorer"
_STOP = threading.Event()


def request_stop() -> None:
    """Make a running :func:`serve_scorer` shut the application down and return."""
    _STOP.set()


class ScorerEndpoint:
    """The Serve deployment's class (wrapped by :func:`build_app`); one scorer per replica."""

    def __init__(self, source: str, model: str, tracking_uri: str, max_posts: int, max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        from smpp_ray.predict import resolve_bundle
        from smpp_ray.scoring.scorer import Scorer

        self.bundle = resolve_bundle(source, stage_dir=None, tracking_uri=tracking_uri)
        self.scorer = Scorer(self.bundle, model=model, device="auto")
        self.model = model
        self.max_posts = max_posts
        image = self.scorer.state.image
        self.max_side, self.quality = int(image.get("max_side", 256)), int(image.get("jpeg_quality", 90))
        self.score_rows.set_max_batch_size(max_batch_size)
        self.score_rows.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("scorer replica %d ready (%s, %s)", os.getpid(), source, model)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if path.endswith("/healthz") and request.method == "GET":
            fallback = self.scorer.fallback
            return JSONResponse({"status": "ok", "model": self.model, "families": self.bundle.families(),
                                 "fallback": None if fallback is None else (fallback.facts.family or "prior")})
        if not path.endswith("/predict"):
            return JSONResponse({"error": f"no route {request.method} {request.url.path}; "
                                          "use POST /predict or GET /healthz"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "POST posts to /predict"}, status_code=405)
        status, body = await self.predict(await request.body())
        return JSONResponse(body, status_code=status)

    async def predict(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of one /predict request body."""
        from smpp_ray.scoring.fallback import SCORED_BY_NETWORK
        from smpp_ray.scoring.posts import parse_records

        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, an int past 4,300 digits
            return 400, {"error": f"body is not JSON this endpoint can read: {err}"}
        posts = payload.get("posts") if isinstance(payload, dict) else payload
        if not isinstance(posts, list):
            return 400, {"error": 'send a JSON list of posts, or {"posts": [...]}'}
        if not posts:
            return 400, {"error": "no posts to score"}
        if len(posts) > self.max_posts:
            return 413, {"error": f"{len(posts)} posts in one request; at most {self.max_posts} "
                                  "(serve.max_posts_per_request): send bigger jobs to `smpp predict`"}
        # Off the event loop: validation decodes every image, and other requests must keep arriving.
        parsed = await asyncio.to_thread(parse_records, posts, max_side=self.max_side, quality=self.quality,
                                         taxonomy=self.scorer.state.taxonomy)
        # Without a fallback in the scorer (older bundles) an unusable image is a bad post as before.
        imageless = parsed.imageless if self.scorer.fallback is not None else parsed.imageless.iloc[:0]
        rescued = set(imageless["row_index"].tolist())
        errors = [r for r in parsed.rejects if r["row_index"] not in rescued]
        if errors:
            return 422, {"errors": [{"index": r["row_index"], "pid": r["pid"], "field": r["field"],
                                     "reason": r["reason"]} for r in errors]}
        network = await asyncio.gather(*(self.score_rows(row) for row in parsed.rows.to_dict(orient="records")))
        by_index = {i: {**score, "scored_by": SCORED_BY_NETWORK}
                    for i, score in zip(parsed.rows["row_index"].tolist(), network, strict=True)}
        if len(imageless):
            reasons = {r["row_index"]: f"{r['field']}: {r['reason']}" for r in parsed.rejects}
            fallback = await asyncio.to_thread(self.scorer.score_imageless, imageless)
            for i, score in zip(imageless["row_index"].tolist(), _json_rows(fallback), strict=True):
                by_index[i] = {**score, "reason": reasons[i]}
        return 200, {"scores": [by_index[i] for i in range(len(posts))], "model": self.model}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # sizes set per replica from serve.*
    async def score_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Posts of concurrent requests, scored in one forward pass."""
        import pandas as pd

        frame = pd.DataFrame(rows)
        scores = await asyncio.to_thread(self.scorer.score, frame)
        return _json_rows(scores)


def _json_rows(scores: Any) -> list[dict[str, Any]]:
    """Score rows as JSON objects (NaN as null)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in scores.to_dict(orient="records")]


def build_app(source: str, config: Config, *, model: str = "blend", tracking_uri: str = ""):
    """The Serve application of the scorer at ``source`` (pipeline folder, bundle or models:/ URI)."""
    cfg = config.serve
    # Enough requests in flight per replica for @serve.batch to fill a batch from single-post requests.
    deployment = serve.deployment(name="scorer", num_replicas=cfg.replicas,
                                  max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
                                  ray_actor_options={"num_cpus": cfg.cpus_per_replica,
                                                     "num_gpus": cfg.gpus_per_replica})(ScorerEndpoint)
    return deployment.bind(source, model, tracking_uri, cfg.max_posts_per_request, cfg.max_batch_size,
                           cfg.batch_wait_timeout_s)


def serve_scorer(source: str, *, config: Config, model: str = "blend", duration_s: float = 0.0) -> dict[str, Any]:
    """Run the endpoint until Ctrl+C, :func:`request_stop`, or ``duration_s`` seconds; then shut it down."""
    from smpp_ray import storage
    from smpp_ray.predict import MLFLOW_SOURCES
    from smpp_ray.runtime import init_ray
    from smpp_ray.tracking import resolve_tracking_uri

    cfg = config.serve
    if not source.startswith(MLFLOW_SOURCES):
        source = storage.normalize(source)
    tracking_uri = resolve_tracking_uri(config.tracking.tracking_uri, os.getcwd()) \
        if source.startswith(MLFLOW_SOURCES) else ""
    init_ray(config.ray.address, config.ray.num_cpus, config.ray.object_store_memory_mb)
    _STOP.clear()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    started = time.perf_counter()
    serve.run(build_app(source, config, model=model, tracking_uri=tracking_uri), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    logger.info("serving %s (%s) at %s: POST %s/predict, GET %s/healthz", source, model, url, url, url)
    try:
        while not _STOP.wait(0.5):
            if duration_s and time.perf_counter() - started >= duration_s:
                break
    except KeyboardInterrupt:
        logger.info("serve: interrupted")
    finally:
        serve.shutdown()
    return {"url": url, "source": source, "model": model, "seconds": round(time.perf_counter() - started, 1)}
