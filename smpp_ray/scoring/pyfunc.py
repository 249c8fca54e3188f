"""The whole scorer as one MLflow ``pyfunc`` model: logged, registered, aliased, loaded anywhere.

The model's artifact is a scorer bundle (:mod:`smpp_ray.scoring.bundle`: checkpoint, backbone
weights when bundled, feature state, GBDT models, feature spec, blend weights). Its input is a
table of posts, one column per SMPD field plus ``image`` (bytes); its output has one row per
input row, in order: the scores, or NaN and ``error`` (``field: reason``) for a post that fails
validation, so a caller never loses track of a row. ``scored_by`` says what scored a row:
``network``, or ``fallback`` (``prior``) for a post whose image alone is unusable, scored by the
bundle's fallback regressor from its metadata (``reason`` says what was wrong with the image).

``mlflow.pyfunc.load_model("models:/smpp-scorer@champion").predict(frame)`` needs this package
installed (the model's requirements name it), nothing of the pipeline folder.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Any

import numpy as np
import pandas as pd

from smpp_ray import storage, tracking

logger = logging.getLogger(__name__)

#: Where the bundle sits inside the logged model folder.
BUNDLE_ARTIFACT = "bundle"
#: Artifact path of the scorer model inside its run.
MODEL_ARTIFACT_PATH = "scorer"
ERROR_COLUMN = "error"
#: What scored a row (network, fallback, prior; null for an error) and why it was not the network.
SCORED_BY_COLUMN = "scored_by"
REASON_COLUMN = "reason"


def _scorer_class():
    import mlflow.pyfunc

    class SMPPScorerModel(mlflow.pyfunc.PythonModel):
        """Posts (SMPD fields + image bytes) -> predicted popularity, subcategory and category."""

        def load_context(self, context: Any) -> None:
            from smpp_ray.scoring.bundle import ScorerBundle
            from smpp_ray.scoring.scorer import Scorer

            bundle = ScorerBundle.from_folder(context.artifacts[BUNDLE_ARTIFACT])
            self.scorer = Scorer(bundle, device="auto")

        def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
            return score_frame(self.scorer, model_input)

    return SMPPScorerModel


def score_frame(scorer: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """One output row per row of ``frame``, in order; rejected rows carry ``error``, rows the
    fallback scored (bundles that have one) ``scored_by`` fallback and the image's ``reason``."""
    from smpp_ray.scoring.fallback import SCORED_BY_NETWORK
    from smpp_ray.scoring.posts import parse_records, records_from_frame

    image = scorer.state.image
    records = records_from_frame(frame)
    parsed = parse_records(records, max_side=int(image.get("max_side", 256)),
                           quality=int(image.get("jpeg_quality", 90)), taxonomy=scorer.state.taxonomy,
                           extra_columns=scorer.state.tabular.extra_columns)
    errors = {r["row_index"]: f"{r['field']}: {r['reason']}" for r in parsed.rejects}
    scores = scorer.score(parsed.rows).reset_index(drop=True)
    scores.index = parsed.rows["row_index"].tolist()
    scores[SCORED_BY_COLUMN] = SCORED_BY_NETWORK
    out = scores.reindex(range(len(records)))
    reasons: dict[int, str] = {}
    if getattr(scorer, "fallback", None) is not None and len(parsed.imageless):
        fallback = scorer.score_imageless(parsed.imageless)
        rows = parsed.imageless["row_index"].tolist()
        for column in ("predicted_popularity", SCORED_BY_COLUMN):
            out.loc[rows, column] = fallback[column].to_numpy()
        reasons = {i: errors.pop(i) for i in rows}
    out["pid"] = [str(r.get("Pid")) if r.get("Pid") is not None else None for r in records]
    out[REASON_COLUMN] = [reasons.get(i) for i in range(len(records))]
    out[ERROR_COLUMN] = [errors.get(i) for i in range(len(records))]
    return out.reset_index(drop=True)


def input_schema():
    """The model's input columns: SMPD field names as text (what the JSON files hold), image bytes;
    only Pid, Uid, Postdate and image are required."""
    from mlflow.types import ColSpec, Schema

    from smpp_ray.scoring.posts import REQUIRED_FIELDS

    names = ["Pid", "Uid", "Title", "Alltags", "Category", "Subcategory", "Concept", "Postdate", "Latitude",
             "Longitude", "Geoaccuracy", "photo_firstdate", "photo_count", "ispro", "canbuypro", "timezone_offset",
             "user_description", "image"]
    return Schema([ColSpec("binary" if name == "image" else "string", name, required=name in REQUIRED_FIELDS)
                   for name in names])


def _requirements() -> list[str]:
    """The packages the model needs, at the versions it was built with."""
    names = ("smpp_ray", "mlflow", "torch", "torchvision", "open_clip_torch", "lightgbm", "catboost", "pandas",
             "pyarrow", "pillow")
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def example_posts(data_dir: str, rows: int = 2) -> pd.DataFrame:
    """An input example: the first ``rows`` posts of a prepared dataset (test split first) as SMPD fields."""
    import pyarrow.parquet as pq

    from smpp_ray.data.dataset import Dataset

    for split in ("test", "val", "train"):
        files = storage.list_parquet_files(Dataset(data_dir).posts(split))
        for location in files:
            fs, path = storage.resolve(location)
            table = pq.read_table(path, filesystem=fs).slice(0, rows)
            if table.num_rows:
                return posts_to_smpd_frame(table.to_pandas())
    raise ValueError(f"an input example needs a post; dataset {data_dir!r} has none")


def posts_to_smpd_frame(posts: pd.DataFrame) -> pd.DataFrame:
    """Prepared rows -> the model's input table (SMPD field names; what a client sends)."""
    def listed(value: Any) -> str | None:
        return None if value is None else ",".join(f"{float(v):g}" for v in value)

    return pd.DataFrame({
        "Pid": posts["pid"].astype(str), "Uid": posts["uid"].astype(str),
        "Title": posts["title"].fillna(""), "Alltags": posts["tags"].fillna(""),
        "Category": posts["category"], "Subcategory": posts["subcategory"], "Concept": posts["concept"],
        "Postdate": posts["postdate"].astype("int64").astype(str),
        "Latitude": posts["latitude"].map(_number_text), "Longitude": posts["longitude"].map(_number_text),
        "Geoaccuracy": posts["geoaccuracy"].map(_number_text),
        "photo_firstdate": posts["photo_firstdate"].astype("Int64").astype(str).replace("<NA>", None),
        "photo_count": posts["photo_count"].astype("Int64").astype(str).replace("<NA>", None),
        "ispro": posts["ispro"].astype("Int64").astype(str).replace("<NA>", None),
        "canbuypro": posts["canbuypro"].astype("Int64").astype(str).replace("<NA>", None),
        "timezone_offset": posts["timezone_offset"].map(_offset_text),
        "user_description": posts["user_description"].map(listed),
        "image": posts["image"].map(bytes),
    })


def posts_to_json(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The model's input table as the JSON posts a client sends to ``smpp serve`` (image base64, no nulls)."""
    import base64

    posts = []
    for row in frame.to_dict(orient="records"):
        post = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
        post["image"] = base64.b64encode(row["image"]).decode()
        posts.append(post)
    return posts


def _number_text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else repr(float(value))


def _offset_text(hours: Any) -> str | None:
    if hours is None or (isinstance(hours, float) and np.isnan(hours)):
        return None
    sign = "-" if hours < 0 else "+"
    minutes = int(round(abs(hours) * 60))
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def log_scorer(tracking_uri: str, run_id: str, bundle: Any, *, name: str, alias: str,
               input_example: pd.DataFrame, scratch: str) -> dict[str, str]:
    """Save the bundle as a pyfunc model (signature, input example), log it to ``run_id``,
    register it as a new version of ``name`` and point ``alias`` at that version."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from smpp_ray.scoring.bundle import ScorerBundle
    from smpp_ray.scoring.scorer import Scorer

    local_bundle = bundle.write(os.path.join(scratch, "bundle"))
    output = score_frame(Scorer(ScorerBundle.from_folder(local_bundle)), input_example)
    signature = infer_signature(input_example, output)
    signature.inputs = input_schema()
    model_dir = os.path.join(scratch, MODEL_ARTIFACT_PATH)
    mlflow.pyfunc.save_model(model_dir, python_model=_scorer_class()(), artifacts={BUNDLE_ARTIFACT: local_bundle},
                             signature=signature, input_example=input_example, pip_requirements=_requirements())
    client = tracking.client(tracking_uri)
    client.log_artifacts(run_id, model_dir, MODEL_ARTIFACT_PATH)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    try:
        client.get_registered_model(name)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: the first version of this name
        client.create_registered_model(name, description="The whole SMPP scorer: prompt-tuned CLIP checkpoint, "
                                       "feature state, LightGBM/CatBoost and blend weights (smpp_ray).")
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          description=f"scores {', '.join(bundle.families())}")
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    logger.info("registered the scorer as %s version %s (%s)", name, version.version, uri)
    return {"name": name, "version": str(version.version), "alias": alias, "uri": uri, "source": source,
            "run_id": run_id}


def registered_source(uri: str, tracking_uri: str = "") -> str:
    """The artifact location of ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or
    ``models:/<name>`` (its latest version), resolved with an explicit client (no global MLflow state)."""
    from smpp_ray.gbdt import registry

    reference = uri[len("models:/"):].strip("/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return tracking.client(tracking_uri).get_model_version_by_alias(name, alias).source
    name, _, version = reference.partition("/")
    return registry.registered_source(tracking_uri, name, None if version in ("", "latest") else version)


def download_bundle(uri: str, dst: str, *, tracking_uri: str = "") -> str:
    """The bundle folder of the scorer model at ``uri`` (``models:/...``, ``runs:/...``), downloaded into ``dst``."""
    import mlflow.artifacts

    try:
        source = registered_source(uri, tracking_uri) if uri.startswith("models:/") else uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri or None)
    except Exception as err:  # MlflowException: unknown model, alias or run
        raise ValueError(f"cannot fetch scorer model {uri!r} from MLflow ({tracking_uri or 'MLFLOW_TRACKING_URI'}): "
                         f"{err}") from err
    folder = os.path.join(local, "artifacts", BUNDLE_ARTIFACT)
    if not os.path.isdir(folder):
        raise ValueError(f"{uri!r} is not an smpp scorer model: no artifacts/{BUNDLE_ARTIFACT} in it")
    return folder
