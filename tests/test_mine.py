"""mine on real data (SciFact-mini, BM25 top-100): positives never among the negatives, depth / skip / sample
honoured, the margin filter drops planted false negatives, groups and triples agree, resume and refusal."""

from __future__ import annotations

import collections
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd import storage
from raykd.errors import UserError
from raykd.formats.store import TextStore
from raykd.stages.mine import MineConfig, mine


@pytest.fixture(scope="module")
def mini(shared, tmp_path_factory, ray_cluster) -> dict:
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.search import SearchConfig, search

    root = tmp_path_factory.mktemp("mine")
    store, run = str(root / "store"), str(root / "bm25-train")
    prepare(PrepareConfig(beir=str(shared("scifact-mini")), out=store))
    search(SearchConfig(data=store, bm25=True, split="train", k=100, out=run))
    ranked = pq.read_table(os.path.join(run, "run.parquet"))
    qrels = TextStore(store).qrels("train")
    return {"root": root, "store": store, "run": run,
            "rank": {(q, p): r for q, p, r in zip(*(ranked[c].to_pylist() for c in ("qid", "pid", "rank")))},
            "judged": {(q, p) for q, p in zip(qrels["qid"].to_pylist(), qrels["pid"].to_pylist())},
            "positives": {(q, p) for q, p, r in zip(*(qrels[c].to_pylist() for c in ("qid", "pid", "relevance")))
                          if r >= 1}}


def _cfg(mini, out, **kw) -> MineConfig:
    base = {"data": mini["store"], "run": mini["run"], "split": "train", "out": out, "depth": 30, "skip": 3,
            "negatives": 5, "queries_per_task": 60}
    return MineConfig(**{**base, **kw})


def _exploded(groups: pa.Table) -> list[tuple[int, int, int]]:
    return [(q, p, n) for q, p, ns in zip(*(groups[c].to_pylist() for c in ("qid", "pos_pid", "neg_pids")))
            for n in ns]


def test_positives_never_negatives_and_depth_skip_sample_honoured(mini):
    m = mine(_cfg(mini, "bm25-hn"))
    store = TextStore(mini["store"])
    assert store.triples_sets() == ["bm25-hn"]
    triples, groups = store.triples("bm25-hn"), store.groups("bm25-hn")
    rows = list(zip(*(triples[c].to_pylist() for c in ("qid", "pos_pid", "neg_pid"))))
    assert rows and len(set(rows)) == len(rows)
    for q, pos, neg in rows:
        assert (q, pos) in mini["positives"]
        assert (q, neg) not in mini["judged"]  # never a positive, never judged at all
        assert 3 < mini["rank"][(q, neg)] <= 30  # skip < rank <= depth
    # sample: min(negatives, unjudged candidates at ranks 4..30) per (query, positive)
    available = collections.Counter()
    for (q, p), r in mini["rank"].items():
        if 3 < r <= 30 and (q, p) not in mini["judged"]:
            available[q] += 1
    per_positive = collections.Counter((q, pos) for q, pos, _ in rows)
    ranked_queries = {q for q, _ in mini["rank"]}
    for q, pos in mini["positives"]:
        if q in ranked_queries:
            assert per_positive[(q, pos)] == min(5, available[q])
    short = {q for q, pos in mini["positives"] if q in ranked_queries and available[q] < 5}
    assert m.counts["queries_with_fewer_negatives"] == len(short)
    assert m.counts["triples"] == len(rows) and m.counts["groups"] == groups.num_rows
    # groups and triples agree, negatives in run order (hardest first)
    assert _exploded(groups) == rows
    for q, ns in zip(groups["qid"].to_pylist(), groups["neg_pids"].to_pylist()):
        ranks = [mini["rank"][(q, n)] for n in ns]
        assert ranks == sorted(ranks)
    # the schema is prepare's triples schema
    assert triples.schema.equals(pa.schema([("qid", pa.int64()), ("pos_pid", pa.int64()), ("neg_pid", pa.int64())]))
    # seeded: another partitioning (one task) into an out URI samples the same negatives; group_size cuts groups
    other = str(mini["root"] / "one-task")
    m2 = mine(_cfg(mini, other, queries_per_task=1000, group_size=2))
    again = storage.read_parquet(storage.join(other, "triples"))
    assert list(zip(*(again[c].to_pylist() for c in ("qid", "pos_pid", "neg_pid")))) == rows
    g2 = storage.read_parquet(storage.join(other, "groups"))
    assert _exploded(g2) == rows and max(len(ns) for ns in g2["neg_pids"].to_pylist()) == 2
    assert m2.counts["groups"] == sum((n + 1) // 2 for n in per_positive.values())


def test_margin_filter_drops_planted_false_negatives(mini):
    # teacher: every positive 10, every other candidate 0, except two planted unjudged candidates of one query:
    # one scored above its positive, one within the margin (9.5 > 10 - 1)
    q0 = sorted({q for q, _ in mini["positives"]})[0]
    unjudged = sorted((r, p) for (q, p), r in mini["rank"].items() if q == q0 and (q, p) not in mini["judged"])
    above, within = unjudged[0][1], unjudged[1][1]
    rows = {(q, p): 0.0 for (q, p) in mini["rank"]}
    rows.update({qp: 10.0 for qp in mini["positives"]})
    rows[(q0, above)], rows[(q0, within)] = 11.0, 9.5
    scores = str(mini["root"] / "teacher.parquet")
    pq.write_table(pa.table({"qid": pa.array([k[0] for k in rows], pa.int64()),
                             "pid": pa.array([k[1] for k in rows], pa.int64()),
                             "score": pa.array(list(rows.values()), pa.float32())}), scores)
    common = {"skip": 0, "depth": 20, "negatives": 100}
    plain = mine(_cfg(mini, "plain", **common))
    t = TextStore(mini["store"]).triples("plain")
    kept = set(zip(t["qid"].to_pylist(), t["neg_pid"].to_pylist()))
    assert {(q0, above), (q0, within)} <= kept  # without the filter both are negatives
    n_pos_q0 = sum(1 for q, _ in mini["positives"] if q == q0)
    filtered = mine(_cfg(mini, "filtered", scores=scores, margin=1.0, **common))
    t = TextStore(mini["store"]).triples("filtered")
    negs = set(zip(t["qid"].to_pylist(), t["neg_pid"].to_pylist()))
    assert (q0, above) not in negs and (q0, within) not in negs
    assert filtered.counts["dropped_false_negatives"] == 2 * n_pos_q0
    assert filtered.counts["unscored_dropped"] == 0
    assert filtered.counts["triples"] == plain.counts["triples"] - 2 * n_pos_q0
    # with margin 0 only the one scored above its positive goes
    zero = mine(_cfg(mini, "margin0", scores=scores, **common))
    assert zero.counts["dropped_false_negatives"] == n_pos_q0
    # relative margin: 9.5 > 10 * (1 - 0.1) drops the second as well
    rel = mine(_cfg(mini, "relative", scores=scores, relative_margin=0.1, **common))
    assert rel.counts["dropped_false_negatives"] == 2 * n_pos_q0


def test_finished_resume_and_refusal(mini):
    out = str(mini["root"] / "resume")
    cfg = _cfg(mini, out)
    first = mine(cfg)
    assert first.counts["resumed_parts"] == 0
    assert mine(cfg).created_at == first.created_at  # finished: nothing recomputed
    with pytest.raises(UserError, match=r"negatives: 5 .* != 6 \(now\)"):
        mine(_cfg(mini, out, negatives=6))
    # parts 1 and 2 lost (and the plan's run parts, deleted at the end, gone): the re-run plans again and mines
    # only those, with the same result
    triples = storage.read_parquet(storage.join(out, "triples"))
    os.remove(os.path.join(out, "manifest.json"))
    for name in ("triples/part-00001.parquet", "groups/part-00001.parquet", "_parts/part-00001.json",
                 "triples/part-00002.parquet", "groups/part-00002.parquet", "_parts/part-00002.json"):
        os.remove(os.path.join(out, name))
    again = mine(cfg)
    assert again.counts["resumed_parts"] == 2  # 200 queries in parts of 60: 4 parts, 2 kept
    assert storage.read_parquet(storage.join(out, "triples")).equals(triples)
    assert again.counts["triples"] == first.counts["triples"]
    with pytest.raises(UserError, match="skip < depth"):
        mine(_cfg(mini, str(mini["root"] / "bad"), skip=30))


def test_run_table_reads_trec_and_msmarco_runs_and_names_a_bad_line(tmp_path):
    from raykd.errors import FormatError
    from raykd.runs import run_table

    trec = tmp_path / "run.trec"
    trec.write_text("q1 Q0 d1 1 2.5 bm25\nq1 Q0 d2 2 1.5 bm25\nq2 Q0 d1 1 0.5 bm25\n")
    t = run_table(str(trec))
    assert t.to_pydict() == {"query_id": ["q1", "q1", "q2"], "doc_id": ["d1", "d2", "d1"], "score": [2.5, 1.5, 0.5]}
    msmarco = tmp_path / "run.tsv"
    msmarco.write_text("7\t100\t1\n7\t200\t2\n")
    assert run_table(str(msmarco))["score"].to_pylist() == [-1.0, -2.0]
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1 1 2.5 bm25\nq1 Q0 d2 2 x bm25\n")
    with pytest.raises(FormatError, match="line 2.*score 'x'"):
        run_table(str(bad))
