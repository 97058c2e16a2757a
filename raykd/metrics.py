"""Effectiveness metrics exactly as trec_eval computes them (ir-measures over pytrec-eval-terrier).

Measures are named as ir-measures names them (``nDCG@10``, ``RR@10``, ``AP``, ``R@1000``, ``P@10``, or any
other it parses, e.g. ``nDCG@10[rel=2]``, ``Judged@10``), as trec_eval names them (``ndcg_cut_10``,
``recip_rank``, ``map``, ``recall_1000``, ``P_10``), or with the field's aliases ``MRR@10`` (= ``RR@10``, MS MARCO's
MRR@10: reciprocal rank of the first relevant document, 0 below rank 10) and ``MAP`` (= ``AP``). Results are keyed
by the name the caller gave.

Which queries count (trec_eval's rules, made explicit):
- the mean is over the queries that are in the run AND have qrels (trec_eval's default);
- ``complete=True`` also counts qrels queries the run lacks, as 0 (trec_eval ``-c``; the MS MARCO scripts do
  this: they divide by the number of judged queries);
- run queries without any qrels are left out and listed in ``queries_without_qrels``; a run none of whose
  queries has qrels is an error (it would give an empty mean, not a number);
- a query's documents are ordered by score descending, ties by docno descending (trec_eval's order), so file
  order and ranks do not matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import ir_measures

from raykd.errors import UserError

DEFAULT_MEASURES = ("MRR@10", "R@1000", "nDCG@10", "MAP", "P@10")
_ALIASES = {"MRR": "RR", "MAP": "AP", "mrr": "RR", "map": "AP"}


def parse_measure(name: str):
    """The ir-measures measure for ``name`` (ir-measures syntax, trec_eval syntax or an alias)."""
    base, at, cut = name.partition("@")
    canonical = _ALIASES.get(base, base) + at + cut
    try:
        return ir_measures.parse_measure(canonical)
    except (ValueError, NameError, SyntaxError, TypeError, KeyError):
        pass
    try:
        parsed = ir_measures.parse_trec_measure(name)
    except (ValueError, NameError, SyntaxError, TypeError, KeyError):
        parsed = []
    if len(parsed) == 1:
        return parsed[0]
    raise UserError(
        f"unknown measure {name!r}: use an ir-measures name (nDCG@10, RR@10, AP, R@1000, P@10, ...), "
        f"a trec_eval name (ndcg_cut_10, recip_rank, map, ...) or MRR@10 / MAP"
    )


@dataclass
class Evaluation:
    """Mean and per-query values of each measure, keyed by the measure name the caller gave."""

    mean: dict[str, float]
    per_query: dict[str, dict[str, float]]  # qid -> measure -> value
    num_queries: int
    queries_without_qrels: list[str] = field(default_factory=list)
    queries_without_results: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "num_queries": self.num_queries,
            "queries_without_qrels": self.queries_without_qrels,
            "queries_without_results": self.queries_without_results,
            "per_query": self.per_query,
        }


def evaluate(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    complete: bool = False,
) -> Evaluation:
    """Evaluate ``run`` ({qid: {docno: score}}) against ``qrels`` ({qid: {docno: grade}})."""
    return evaluate_blocks([run], qrels, measures, complete)


def evaluate_blocks(
    blocks: Iterable[Mapping[str, Mapping[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    complete: bool = False,
) -> Evaluation:
    """:func:`evaluate` of a run given as blocks of whole queries (each query in one block, e.g.
    :func:`raykd.runs.query_blocks` of a run table), one block held at a time: every measure here is a
    per-query value, so the result is the whole run's."""
    if not measures:
        raise UserError("no measures given")
    parsed = {name: parse_measure(name) for name in measures}
    by_measure: dict = {}
    for name, m in parsed.items():
        by_measure.setdefault(m, []).append(name)
    run_queries: list[str] = []
    per_query: dict[str, dict[str, float]] = {}
    for run in blocks:
        run_queries.extend(run)
        judged_run = {q: dict(docs) for q, docs in run.items() if q in qrels and docs}
        per_query.update({q: {} for q in judged_run})
        if judged_run:
            used_qrels = {q: dict(qrels[q]) for q in judged_run}
            for m in ir_measures.iter_calc(list(by_measure), used_qrels, judged_run):
                for name in by_measure[m.measure]:
                    per_query[m.query_id][name] = float(m.value)
    without_qrels = sorted(q for q in run_queries if q not in qrels)
    missing = sorted(q for q in qrels if q not in per_query)
    if not per_query and not (complete and qrels):
        raise UserError(
            f"none of the run's {len(run_queries)} queries has qrels (e.g. {', '.join(run_queries[:3]) or 'none'}): "
            f"the run and the qrels are for different query sets, or the query ids differ"
        )
    if complete:
        for q in missing:
            per_query[q] = {name: 0.0 for name in parsed}
    for vals in per_query.values():  # a measure undefined for a query (no relevant docs) counts 0, as trec_eval
        for name in parsed:
            vals.setdefault(name, 0.0)
    n = len(per_query)
    mean = {name: sum(v[name] for v in per_query.values()) / n for name in parsed}
    return Evaluation(
        mean=mean,
        per_query=per_query,
        num_queries=n,
        queries_without_qrels=without_qrels,
        queries_without_results=missing,
    )


def paired_randomization_test(a: Mapping[str, float], b: Mapping[str, float], trials: int = 100_000,
                              seed: int = 0) -> dict:
    """Two-sided paired randomisation (sign-flip) test of mean(a) - mean(b) over queries (Smucker, Allan and
    Carterette 2007, the test IR papers use to compare two runs). ``a``/``b``: per-query values of one measure;
    a query missing from one side counts as 0 there (the run found nothing for it). Exact over all 2^n sign
    assignments when 2^n <= ``trials``, else a seeded Monte Carlo estimate with ``trials`` draws.

    Returns ``{"diff", "p_value", "queries", "exact"}``; the p-value counts assignments whose |mean difference|
    reaches the observed one (with a small tolerance for float noise)."""
    import numpy as np

    qids = sorted(set(a) | set(b))
    if not qids:
        raise UserError("paired test: no queries to compare")
    d = np.array([float(a.get(q, 0.0)) - float(b.get(q, 0.0)) for q in qids])
    n = len(d)
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    exact = n < 63 and 2**n <= trials
    if exact:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        hits = int((np.abs(signs @ d) / n >= observed - tol).sum())
        p = hits / 2**n
    else:
        rng = np.random.default_rng(seed)
        hits, done = 0, 0
        while done < trials:
            m = min(10_000, trials - done)
            signs = rng.integers(0, 2, size=(m, n)) * 2 - 1
            hits += int((np.abs(signs @ d) / n >= observed - tol).sum())
            done += m
        p = (hits + 1) / (trials + 1)  # the observed assignment counts as one draw (never p = 0)
    return {"diff": float(d.mean()), "p_value": float(p), "queries": n, "exact": exact}
