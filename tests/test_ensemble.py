"""Ensemble normalisation (raykd.ensemble): the documented formulas, streaming statistics equal one pass."""

from __future__ import annotations

import numpy as np
import pytest

from raykd.ensemble import ScoreStats, ensemble, normalize


def test_stats_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    s = rng.normal(100.0, 0.01, 1000)  # ColBERT-like: large mean, small spread
    parts = ScoreStats()
    for chunk in np.array_split(s, 7):
        parts.update(chunk)
    assert parts.count == 1000 and parts.mean == pytest.approx(s.mean(), abs=1e-9)
    assert parts.std == pytest.approx(s.std(), rel=1e-9)
    assert (parts.min, parts.max) == (s.min(), s.max())
    assert ScoreStats.from_dict(parts.to_dict()) == parts


def test_normalisations_and_weighted_mean():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])
    stats = {"a": ScoreStats.of(a), "b": ScoreStats.of(b)}
    np.testing.assert_allclose(normalize(a, stats["a"], "minmax"), [0, 0.5, 1])
    np.testing.assert_allclose(normalize(b, stats["b"], "zscore"), (b - b.mean()) / b.std())
    np.testing.assert_allclose(ensemble({"a": a, "b": b}, [1, 1]), (a + b) / 2)  # the paper's T2: raw mean
    got = ensemble({"a": a, "b": b}, [3, 1], "minmax", stats)
    np.testing.assert_allclose(got, (3 * np.array([0, 0.5, 1]) + np.array([0, 1, 0.5])) / 4, atol=1e-6)
    assert (normalize(np.ones(3), ScoreStats.of(np.ones(3)), "zscore") == 0).all()
    with pytest.raises(ValueError, match="needs the run's statistics"):
        ensemble({"a": a}, [1], "zscore")
    with pytest.raises(ValueError, match="unknown score normalisation"):
        ensemble({"a": a}, [1], "rank")
