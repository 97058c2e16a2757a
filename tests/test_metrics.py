"""Metrics equal trec_eval's own expected outputs (trec_eval's regression files in ../shared/data/trec_eval_ref)."""

from __future__ import annotations

import pytest

from raykd import metrics
from raykd.errors import UserError
from raykd.formats import trec

# trec_eval measure names checked per query and over all queries (counts such as num_ret are sums in
# trec_eval's `all` line, means here, so they are not in this list)
CHECKED = [
    "map", "recip_rank", "ndcg_cut_10", "recall_1000", "P_10", "bpref", "Rprec", "ndcg", "success_10",
    "iprec_at_recall_0.50", "recall_10", "map_cut_10", "ndcg_cut_100", "P_200", "set_F", "infAP",
]


def _expected(path) -> dict[str, dict[str, float]]:
    """{measure: {qid or 'all': value}} from a trec_eval output file."""
    out: dict[str, dict[str, float]] = {}
    for line in open(path):
        name, qid, value = line.split()
        try:
            out.setdefault(name, {})[qid] = float(value)
        except ValueError:
            pass
    return out


@pytest.fixture(scope="module")
def ref(shared):
    d = shared("trec_eval_ref")
    return trec.read_run(str(d / "results.test")), trec.read_qrels(str(d / "qrels.test")), d


def test_default_measures_match_trec_eval_summary(ref):
    run, qrels, d = ref
    expected = _expected(d / "out.test")
    ev = metrics.evaluate(run, qrels, ["map", "recip_rank", "Rprec", "bpref", "P_10", "P_1000", "iprec_at_recall_0.00"])
    for name, value in ev.mean.items():
        assert round(value, 4) == expected[name]["all"], name
    assert ev.num_queries == int(expected["num_q"]["all"])


def test_every_checked_measure_matches_trec_eval_per_query_and_mean(ref):
    run, qrels, d = ref
    expected = _expected(d / "out.test.aq")
    ev = metrics.evaluate(run, qrels, CHECKED)
    qids = sorted(q for q in expected["map"] if q != "all")
    assert sorted(ev.per_query) == qids
    for name in CHECKED:
        assert round(ev.mean[name], 4) == pytest.approx(expected[name]["all"], abs=1e-9), name
        for q in qids:
            assert round(ev.per_query[q][name], 4) == pytest.approx(expected[name][q], abs=1e-9), (name, q)


def test_field_names_equal_trec_eval_names(ref):
    run, qrels, _ = ref
    a = metrics.evaluate(run, qrels, ["nDCG@10", "AP", "MAP", "R@1000", "P@10", "RR"]).mean
    b = metrics.evaluate(run, qrels, ["ndcg_cut_10", "map", "recall_1000", "P_10", "recip_rank"]).mean
    assert a["nDCG@10"] == b["ndcg_cut_10"] and a["AP"] == a["MAP"] == b["map"]
    assert a["R@1000"] == b["recall_1000"] and a["P@10"] == b["P_10"] and a["RR"] == b["recip_rank"]


def test_mrr10_is_reciprocal_rank_cut_at_10(ref):
    run, qrels, _ = ref
    ev = metrics.evaluate(run, qrels, ["MRR@10", "recip_rank"])
    for vals in ev.per_query.values():
        rr = vals["recip_rank"]
        assert vals["MRR@10"] == pytest.approx(rr if rr >= 0.1 else 0.0)
    assert any(v["recip_rank"] > 0 and v["MRR@10"] == 0 for v in ev.per_query.values())


def test_ties_ordered_by_docno_descending_not_file_order():
    qrels = {"1": {"a": 1}}
    # a and b tie; trec_eval ranks b (docno descending) first whatever the file order or ranks say
    ev = metrics.evaluate({"1": {"a": 1.0, "b": 1.0}}, qrels, ["RR"])
    assert ev.mean["RR"] == 0.5
    assert trec.trec_order({"a": 1.0, "b": 1.0, "c": 2.0}) == [("c", 2.0), ("b", 1.0), ("a", 1.0)]


def test_queries_without_qrels_are_listed_and_complete_counts_missing_as_zero():
    qrels = {"1": {"a": 1}, "2": {"b": 1}}
    run = {"1": {"a": 3.0, "x": 1.0}, "9": {"a": 1.0}}
    ev = metrics.evaluate(run, qrels, ["RR@10"])
    assert ev.mean["RR@10"] == 1.0 and ev.num_queries == 1
    assert ev.queries_without_qrels == ["9"] and ev.queries_without_results == ["2"]
    ev_c = metrics.evaluate(run, qrels, ["RR@10"], complete=True)
    assert ev_c.mean["RR@10"] == 0.5 and ev_c.num_queries == 2


def test_run_with_no_judged_query_and_unknown_measure_are_errors():
    with pytest.raises(UserError, match="none of the run's 1 queries has qrels"):
        metrics.evaluate({"7": {"a": 1.0}}, {"1": {"a": 1}}, ["AP"])
    with pytest.raises(UserError, match="unknown measure 'nDGC@10'"):
        metrics.evaluate({"1": {"a": 1.0}}, {"1": {"a": 1}}, ["nDGC@10"])


def test_paired_randomization_test_matches_scipy_exactly_and_by_monte_carlo():
    import numpy as np
    from scipy import stats

    from raykd.metrics import paired_randomization_test

    rng = np.random.default_rng(1)
    x, y = rng.random(12), rng.random(12) * 0.7
    a = {f"q{i}": float(v) for i, v in enumerate(x)}
    b = {f"q{i}": float(v) for i, v in enumerate(y)}
    ref = stats.permutation_test((x, y), lambda u, v: np.mean(u - v), permutation_type="samples",
                                 n_resamples=10**6).pvalue  # exact: 2^12 sign assignments
    exact = paired_randomization_test(a, b)
    assert exact["exact"] and exact["queries"] == 12
    assert exact["p_value"] == pytest.approx(ref, abs=1e-12)
    assert exact["diff"] == pytest.approx(float(np.mean(x - y)))
    mc = paired_randomization_test(a, b, trials=2000, seed=3)
    assert not mc["exact"] and mc["p_value"] == pytest.approx(ref, abs=0.015)
    # identical runs: nothing to see; a query one run lacks counts as 0 there
    assert paired_randomization_test(a, dict(a))["p_value"] == 1.0
    missing = paired_randomization_test({"q1": 1.0}, {"q1": 1.0, "q2": 1.0})
    assert missing["queries"] == 2 and missing["diff"] == -0.5
    with pytest.raises(UserError, match="no queries"):
        paired_randomization_test({}, {})
