"""Dense-sparse hybrid retrieval, TCT-ColBERT Eq. 7 (Lin et al. 2020).

For a query q and a passage p in the union of the dense top-k list D and the sparse top-k list S::

    score(q, p) = alpha * s_sparse(q, p) + s_dense(q, p)

where a passage missing from a list takes that list's minimum score for q (the paper's rule: it was not
retrieved, so it is at most as good as the list's last entry). A query that one run lacks altogether
contributes a constant 0 from that run (its ranking is the other run's). ``alpha`` weighs BM25 against the
dense inner product, whose scales differ per model (BM25 ~10-40; a normalised encoder's cosine ~0.3-0.9; TCT
ColBERT's unnormalised dot ~100), so it is tuned on training queries (:func:`tune_alpha`) by a grid search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from raykd import metrics

Run = Mapping[str, Mapping[str, float]]

# 0 plus a geometric grid: the useful alpha depends on the two score scales (see the module docstring)
DEFAULT_ALPHA_GRID = (0.0, *np.round(np.geomspace(1e-3, 10.0, 41), 6).tolist())


def hybrid(dense: Run, sparse: Run, alpha: float, k: int | None = 1000) -> dict[str, dict[str, float]]:
    """Fuse two runs by Eq. 7 over the union of their lists; keep the best ``k`` per query (None: all)."""
    out: dict[str, dict[str, float]] = {}
    for q in list(dense) + [q for q in sparse if q not in dense]:
        d, s = dense.get(q, {}), sparse.get(q, {})
        d_min = min(d.values()) if d else 0.0
        s_min = min(s.values()) if s else 0.0
        fused = {p: alpha * s.get(p, s_min) + d.get(p, d_min) for p in set(d) | set(s)}
        if k is not None and len(fused) > k:
            fused = dict(sorted(fused.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k])
        out[q] = fused
    return out


def tune_alpha(
    dense: Run,
    sparse: Run,
    qrels: Mapping[str, Mapping[str, int]],
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    measure: str = "nDCG@10",
    k: int | None = 1000,
) -> tuple[float, list[tuple[float, float]]]:
    """The alpha of ``grid`` with the best mean ``measure`` on these (training) queries, and the whole curve
    ``[(alpha, value), ...]``. Ties go to the smaller alpha."""
    if not grid:
        raise ValueError("empty alpha grid")
    curve = []
    for a in sorted(float(x) for x in grid):
        value = metrics.evaluate(hybrid(dense, sparse, a, k), qrels, [measure]).mean[measure]
        curve.append((a, value))
    best = max(curve, key=lambda av: (av[1], -av[0]))[0]
    return best, curve
