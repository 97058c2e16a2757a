"""TCT Eq. 7 hybrid fusion and its alpha grid search."""

from __future__ import annotations

import numpy as np
import pytest

from raykd import fusion
from raykd.fusion import hybrid, tune_alpha


def test_union_with_missing_scores_taking_the_list_minimum():
    dense = {"q": {"a": 0.9, "b": 0.5}}
    sparse = {"q": {"b": 20.0, "c": 10.0}}
    fused = hybrid(dense, sparse, alpha=0.1, k=None)["q"]
    assert fused == pytest.approx({"a": 0.1 * 10.0 + 0.9, "b": 0.1 * 20.0 + 0.5, "c": 0.1 * 10.0 + 0.5})


def test_alpha_zero_is_dense_ranking_and_k_cuts():
    dense = {"q": {"a": 3.0, "b": 2.0, "c": 1.0}}
    sparse = {"q": {"c": 50.0, "d": 40.0}}
    fused = hybrid(dense, sparse, alpha=0.0, k=2)["q"]
    assert sorted(fused, key=fused.get, reverse=True) == ["a", "b"]


def test_query_missing_from_one_run_keeps_the_other_ranking():
    fused = hybrid({"q": {"a": 1.0, "b": 2.0}}, {}, alpha=0.5)
    assert fused["q"]["b"] > fused["q"]["a"]
    fused = hybrid({}, {"q": {"a": 1.0, "b": 2.0}}, alpha=0.5)
    assert fused["q"]["b"] > fused["q"]["a"]


def test_tune_alpha_finds_the_mix_that_beats_both_runs():
    # dense gets q1 right and q2 wrong; sparse the opposite, with a margin that a small alpha cannot flip for q1
    dense = {"q1": {"r1": 1.0, "n1": 0.9}, "q2": {"n2": 1.0, "r2": 0.2}}
    sparse = {"q1": {"n1": 11.0, "r1": 10.0}, "q2": {"r2": 30.0, "n2": 10.0}}
    qrels = {"q1": {"r1": 1}, "q2": {"r2": 1}}
    best, curve = tune_alpha(dense, sparse, qrels, grid=[0.0, 0.01, 0.05, 0.5, 5.0], measure="RR@10")
    values = dict(curve)
    assert values[0.0] == 0.75 and values[5.0] == 0.75
    assert best == 0.05 and values[0.05] == 1.0
    with pytest.raises(ValueError, match="empty alpha grid"):
        tune_alpha(dense, sparse, qrels, grid=[])


def _eq7_reference(dense, sparse, alpha, k):
    """The pure-Python Eq. 7 raykd used before fusion was vectorised: the vectorised one must equal it."""
    out = {}
    for q in list(dense) + [q for q in sparse if q not in dense]:
        d, s = dense.get(q, {}), sparse.get(q, {})
        d_min = min(d.values()) if d else 0.0
        s_min = min(s.values()) if s else 0.0
        fused = {p: alpha * s.get(p, s_min) + d.get(p, d_min) for p in set(d) | set(s)}
        if k is not None and len(fused) > k:
            fused = dict(sorted(fused.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k])
        out[q] = fused
    return out


def test_vectorised_fusion_equals_the_reference_with_ties_and_missing_queries():
    rng = np.random.default_rng(7)
    docs = [f"d{i}" for i in range(60)]

    def run(queries, n):  # scores rounded to 1 decimal: many ties, at the cut too
        return {q: {d: float(round(rng.normal(), 1)) for d in rng.choice(docs, n, replace=False)} for q in queries}

    dense, sparse = run(["q1", "q2", "q3"], 30), run(["q2", "q3", "q4"], 25)
    for alpha in (0.0, 0.3, 1.0, 7.5):
        for k in (None, 10, 40):
            assert fusion.hybrid(dense, sparse, alpha, k) == _eq7_reference(dense, sparse, alpha, k), (alpha, k)


def test_fused_table_is_the_fused_run_in_trec_eval_order():
    """ListUnion.table (what search writes) holds hybrid()'s run: queries in id order, each in trec_eval's order."""
    from raykd.formats import trec

    rng = np.random.default_rng(5)
    docs = [f"d{i}" for i in range(40)]
    dense = {q: {d: float(round(rng.normal(), 1)) for d in rng.choice(docs, 20, replace=False)} for q in ("q2", "q1")}
    sparse = {q: {d: float(round(rng.normal(), 1)) for d in rng.choice(docs, 15, replace=False)} for q in ("q3", "q1")}
    for alpha, k in ((0.0, None), (0.7, 10)):
        t = fusion.ListUnion(fusion.run_table(dense), fusion.run_table(sparse)).table(alpha, k)
        want = hybrid(dense, sparse, alpha, k)
        assert list(zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist(), t["score"].to_pylist())) == [
            (q, d, s) for q in sorted(want) for d, s in trec.trec_order(want[q])]
