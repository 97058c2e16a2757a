"""Dense-sparse hybrid retrieval, TCT-ColBERT Eq. 7 (Lin et al. 2020).

For a query q and a passage p in the union of the dense top-k list D and the sparse top-k list S::

    score(q, p) = alpha * s_sparse(q, p) + s_dense(q, p)

where a passage missing from a list takes that list's minimum score for q (the paper's rule: it was not
retrieved, so it is at most as good as the list's last entry). A query that one run lacks altogether
contributes a constant 0 from that run (its ranking is the other run's). ``alpha`` weighs BM25 against the
dense inner product, whose scales differ per model (BM25 ~10-40; a normalised encoder's cosine ~0.3-0.9; TCT
ColBERT's unnormalised dot ~100), so it is tuned on training queries (:func:`tune_alpha`) by a grid search.

Fusion is vectorised: one Arrow full outer join of the two runs on (query, doc) (:class:`ListUnion`), then each
alpha is a numpy expression and a sort; the search stage hands it Arrow tables and takes the fused run back as
one (:meth:`ListUnion.table`), and runs the alpha sweep in parallel Ray tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd import metrics

Run = Mapping[str, Mapping[str, float]]

# 0 plus a geometric grid: the useful alpha depends on the two score scales (see the module docstring)
DEFAULT_ALPHA_GRID = (0.0, *np.round(np.geomspace(1e-3, 10.0, 41), 6).tolist())


def run_table(run: Run) -> pa.Table:
    """A run as an Arrow table ``query_id, doc_id, score`` (float64)."""
    qs, ds, ss = [], [], []
    for q, docs in run.items():
        qs.extend([q] * len(docs))
        ds.extend(docs.keys())
        ss.extend(docs.values())
    return pa.table({"query_id": pa.array(qs, pa.string()), "doc_id": pa.array(ds, pa.string()),
                     "score": pa.array(ss, pa.float64())})


class ListUnion:
    """The union of two runs' lists (tables ``query_id``, ``doc_id``, ``score``; other columns are ignored) as
    aligned columns (an Arrow full outer join on (query, doc)), each
    side's score filled by Eq. 7's rule: missing from the list -> the list's minimum for the query; query
    missing from the run -> 0. Built once, fused for any alpha."""

    def __init__(self, dense: pa.Table, sparse: pa.Table):
        dense, sparse = (t.select(["query_id", "doc_id"]).append_column("score", t["score"].cast(pa.float64()))
                         for t in (dense, sparse))
        j = dense.join(sparse, keys=["query_id", "doc_id"], join_type="full outer",
                       left_suffix="_dense", right_suffix="_sparse")
        for side, t in (("dense", dense), ("sparse", sparse)):
            mins = t.group_by("query_id").aggregate([("score", "min")]).rename_columns(["query_id", f"min_{side}"])
            j = j.join(mins, keys="query_id", join_type="left outer")
        self.query_id = j["query_id"].combine_chunks()
        self.doc_id = j["doc_id"].combine_chunks()
        self.dense = self._filled(j, "dense")
        self.sparse = self._filled(j, "sparse")
        # row order by query, then doc_id descending: a stable sort by score then gives Eq. 7's tie rule
        codes = pc.rank(self.query_id, sort_keys="ascending", tiebreaker="dense").to_numpy()
        order = pc.sort_indices(pa.table({"q": codes, "d": self.doc_id}),
                                sort_keys=[("q", "ascending"), ("d", "descending")]).to_numpy()
        self.query_id, self.doc_id = self.query_id.take(order), self.doc_id.take(order)
        self.dense, self.sparse, self.codes = self.dense[order], self.sparse[order], codes[order]

    @staticmethod
    def _filled(j: pa.Table, side: str) -> np.ndarray:
        v = pc.coalesce(j[f"score_{side}"], j[f"min_{side}"], pa.scalar(0.0))
        return v.to_numpy().astype(np.float64)

    def fuse(self, alpha: float, k: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, fused scores)`` of each query's best ``k`` (None: all), rows ordered by query then score."""
        fused = alpha * self.sparse + self.dense
        order = np.lexsort((-fused, self.codes))  # stable: equal scores keep doc_id descending
        if k is not None and len(order):
            c = self.codes[order]
            starts = np.r_[0, np.flatnonzero(c[1:] != c[:-1]) + 1]
            rank = np.arange(len(c)) - np.repeat(starts, np.diff(np.r_[starts, len(c)]))
            order = order[rank < k]
        return order, fused[order]

    def table(self, alpha: float, k: int | None) -> pa.Table:
        """The fused run as a ranked run table ``query_id``, ``doc_id``, ``score`` (float64): queries in query_id
        order, each query's best ``k`` (None: all) in trec_eval's order."""
        rows, fused = self.fuse(alpha, k)
        return pa.table({"query_id": self.query_id.take(rows), "doc_id": self.doc_id.take(rows),
                         "score": pa.array(fused, pa.float64())})

    def run(self, alpha: float, k: int | None) -> dict[str, dict[str, float]]:
        rows, fused = self.fuse(alpha, k)
        out: dict[str, dict[str, float]] = {}
        for q, d, v in zip(self.query_id.take(rows).to_pylist(), self.doc_id.take(rows).to_pylist(),
                           fused.tolist()):
            out.setdefault(q, {})[d] = v
        return out


def hybrid(dense: Run, sparse: Run, alpha: float, k: int | None = 1000) -> dict[str, dict[str, float]]:
    """Fuse two runs by Eq. 7 over the union of their lists; keep the best ``k`` per query (None: all); ties
    at the cut go to the larger doc id (trec_eval's order)."""
    return ListUnion(run_table(dense), run_table(sparse)).run(alpha, k)


def sweep(dense: pa.Table, sparse: pa.Table, qrels: Mapping[str, Mapping[str, int]], alphas: Sequence[float],
          measure: str = "nDCG@10", k: int | None = 1000) -> list[tuple[float, float]]:
    """``[(alpha, mean measure)]`` of the fused runs (tables of :func:`run_table`); one join for all alphas."""
    u = ListUnion(dense, sparse)
    return [(float(a), metrics.evaluate(u.run(float(a), k), qrels, [measure]).mean[measure]) for a in alphas]


def best_alpha(curve: Sequence[tuple[float, float]]) -> float:
    """The alpha with the best value; ties go to the smaller alpha."""
    return max(curve, key=lambda av: (av[1], -av[0]))[0]


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
    curve = sweep(run_table(dense), run_table(sparse), qrels, sorted(float(x) for x in grid), measure, k)
    return best_alpha(curve), curve
