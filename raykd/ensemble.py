"""Heterogeneous teacher ensembles: per-teacher score normalisation over the run, then the weighted mean.

Teachers of different kinds score on different scales (a BERT_CAT logit around ±10, a ColBERT MaxSim sum
around 100, BM25 0..40, an LLM's log-odds). Before they are averaged each teacher's scores may be put on one
scale, with statistics of that teacher over the whole run:

    none     s'_t = s_t                                  (the paper's T2: the mean of raw scores)
    zscore   s'_t = (s_t - mean_t) / std_t               (std_t = 0: s'_t = 0)
    minmax   s'_t = (s_t - min_t) / (max_t - min_t)      (max_t = min_t: s'_t = 0)

    ensemble(q, p) = Σ_t w_t s'_t(q, p) / Σ_t w_t

mean_t, std_t (population), min_t and max_t are taken over the teacher's **unique (qid, pid) pair scores** of the
run, each scored pair once: a positive repeated in ~100 triples counts once, as it was scored once. A margin
pos - neg is unchanged by the shift and divided by std_t (zscore) or the range (minmax).

Two passes, so a streaming stage can wire it: (1) as pair scores are produced, fold them into a
:class:`ScoreStats` per teacher (``update``; stats of parts ``merge``; they are JSON-able for a manifest);
(2) once every pair is scored, :func:`normalize` / :func:`ensemble` each part with the finished stats.
Pure numpy; nothing here knows about Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

NORMALIZATIONS = ("none", "zscore", "minmax")


@dataclass
class ScoreStats:
    """Count, mean, sum of squared deviations (``m2``), min and max of one teacher's scores, in float64;
    ``update`` and ``merge`` combine them exactly (Chan et al.'s pairwise update, no large-number cancellation)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")

    def merge(self, other: ScoreStats) -> ScoreStats:
        n = self.count + other.count
        if n == 0:
            return ScoreStats()
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return ScoreStats(n, mean, m2, min(self.min, other.min), max(self.max, other.max))

    def update(self, scores: np.ndarray) -> ScoreStats:
        """Fold ``scores`` in (in place); returns self."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        if s.size:
            if not np.isfinite(s).all():
                raise ValueError("teacher scores must be finite to enter the run's statistics")
            mean = float(s.mean())
            part = ScoreStats(int(s.size), mean, float(((s - mean) ** 2).sum()), float(s.min()), float(s.max()))
            merged = self.merge(part)
            self.count, self.mean, self.m2, self.min, self.max = (merged.count, merged.mean, merged.m2, merged.min,
                                                                  merged.max)
        return self

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "std": self.std}

    @classmethod
    def from_dict(cls, d: Mapping) -> ScoreStats:
        return cls(int(d["count"]), float(d["mean"]), float(d["m2"]), float(d["min"]), float(d["max"]))

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreStats:
        return cls().update(scores)


def check_normalization(name: str) -> str:
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown score normalisation {name!r}; expected one of {', '.join(NORMALIZATIONS)}")
    return name


def normalize(scores: np.ndarray, stats: ScoreStats, method: str) -> np.ndarray:
    """One teacher's scores put on the ensemble's scale (see the module docstring), float64."""
    check_normalization(method)
    s = np.asarray(scores, dtype=np.float64)
    if method == "none":
        return s
    if stats.count == 0:
        raise ValueError(f"{method} normalisation needs the run's statistics of the teacher; they are empty")
    if method == "zscore":
        std = stats.std
        return (s - stats.mean) / std if std > 0 else np.zeros_like(s)
    span = stats.max - stats.min
    return (s - stats.min) / span if span > 0 else np.zeros_like(s)


def ensemble(scores: Mapping[str, np.ndarray], weights: Sequence[float], method: str = "none",
             stats: Mapping[str, ScoreStats] | None = None) -> np.ndarray:
    """``Σ_t w_t normalize(s_t) / Σ_t w_t`` over the teachers of ``scores`` (in its order), float32.
    ``stats``: each teacher's :class:`ScoreStats` over the run (needed unless ``method == "none"``)."""
    check_normalization(method)
    names = list(scores)
    if len(names) != len(weights) or not names:
        raise ValueError(f"need one weight per teacher, got {len(weights)} weights for {len(names)} teachers")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
    if method != "none" and (stats is None or any(t not in stats for t in names)):
        missing = [t for t in names if not stats or t not in stats]
        raise ValueError(f"{method} normalisation needs the run's statistics of teachers {missing}")
    acc = sum(wi * normalize(scores[t], stats[t] if stats else ScoreStats(), method) for wi, t in zip(w, names))
    return (acc / w.sum()).astype(np.float32)
