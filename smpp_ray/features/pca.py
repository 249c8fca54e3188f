"""A small, deterministic PCA fitted from streamed sufficient statistics.

Embeddings are reduced with a PCA fitted on the *train* split only: the statistics are
accumulated batch by batch (``n``, ``sum x``, ``sum x xᵀ`` in float64), so fitting never holds
the split in memory and the components cannot depend on val/test rows. Component signs are
fixed (largest loading positive) so refits on the same data give identical projections.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PCAProjection:
    """``transform(x) = (x - mean) @ components.T``; ``components`` is (k, D)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows of ``x`` (N, D) to (N, k) float32; NaN rows stay NaN."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"PCA expects (N, {self.mean.shape[0]}) inputs, got shape {x.shape}")
        return ((x - self.mean) @ self.components.T).astype(np.float32)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez`` under ``prefix``."""
        return {f"{prefix}_mean": self.mean, f"{prefix}_components": self.components,
                f"{prefix}_explained_variance": self.explained_variance}


class PCAAccumulator:
    """Streaming sufficient statistics of a PCA (rows with any NaN are skipped)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.total = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"PCA accumulator of dim {self.dim} got a batch of shape {x.shape}")
        x = x[~np.isnan(x).any(axis=1)]
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def fit(self, n_components: int) -> PCAProjection:
        """Top ``n_components`` principal directions; rows beyond the data's rank are zero."""
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        components = np.zeros((n_components, self.dim), dtype=np.float64)
        variance = np.zeros(n_components, dtype=np.float64)
        if self.count == 0:
            logger.warning("PCA fitted on 0 rows: every projection is 0")
            return PCAProjection(np.zeros(self.dim), components, variance)
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / max(self.count - 1, 1)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)  # ascending
        order = np.argsort(values)[::-1]
        keep = min(n_components, self.dim, max(self.count - 1, 0))
        top = vectors[:, order[:keep]].T  # (keep, D)
        # Fix each component's sign so that its largest-magnitude loading is positive.
        signs = np.sign(top[np.arange(keep), np.abs(top).argmax(axis=1)])
        signs[signs == 0] = 1.0
        components[:keep] = top * signs[:, None]
        variance[:keep] = np.clip(values[order[:keep]], 0.0, None)
        return PCAProjection(mean, components, variance)


def fit_pca(x: np.ndarray, n_components: int) -> PCAProjection:
    """Fit on an in-memory matrix (N, D); equals streaming the same rows through PCAAccumulator."""
    x = np.asarray(x, dtype=np.float64)
    accumulator = PCAAccumulator(x.shape[1])
    accumulator.add(x)
    return accumulator.fit(n_components)
