"""`raykd import-scores`: published teacher-score files in their real formats (sentence-transformers' pickle +
hard negatives, lightonai lists, NRKD tsv) become a scores output that training reads, with ids checked
against a real text store, bad rows named or quarantined, and the pair scores written beside the triples."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from raykd import storage
from raykd.cli import main
from raykd.formats import published as pub
from raykd.formats.pair_scores import read_pair_scores
from raykd.formats.scores import TripleScores
from raykd.formats.store import TextStore


def _invoke(*args: str):
    return CliRunner().invoke(main, ["import-scores", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def st_files(sample_store, tmp_path_factory):
    """Hard negatives for the store's first 10 train queries (two systems, overlapping) and a pickle that
    scores every listed (qid, pid) by a fixed formula."""
    store = TextStore(sample_store)
    qr = store.qrels("train")
    pids = store.corpus(["pid"])["pid"].to_numpy()
    rows, scores = [], {}
    rng = np.random.default_rng(0)
    for i, (q, p) in enumerate(zip(qr["qid"].to_pylist()[:10], qr["pid"].to_pylist()[:10])):
        a, b = rng.choice(pids, 6, replace=False).tolist(), rng.choice(pids, 4, replace=False).tolist()
        rows.append(pub.HardNegatives(i + 1, q, [p], {"bm25": a, "tas-b": b}))
        scores[q] = {x: float(q % 7 - (x % 5)) for x in {p, *a, *b}}
    d = tmp_path_factory.mktemp("st")
    s, h = str(d / "ce-scores.pkl.gz"), str(d / "hard.jsonl.gz")
    pub.write_st_scores(s, scores)
    pub.write_hard_negatives(h, rows)
    return s, h, rows, scores


def test_st_import_scores_every_triple_from_the_pickle(sample_store, st_files, tmp_path):
    s, h, rows, scores = st_files
    out = str(tmp_path / "st")
    base = ["--format", "st", "--scores", s, "--hard-negatives", h, "--data", sample_store, "--out", out,
            "--negatives-per-query", "3", "--seed", "5"]
    refused = CliRunner().invoke(main, ["import-scores", *base])
    assert refused.exit_code != 0 and "--trust-pickle" in refused.output  # a pickle is never loaded unasked
    r = _invoke(*base, "--trust-pickle")
    assert r.exit_code == 0, r.output
    t = TripleScores(out).table()
    expect = {(hn.qid, p, n) for hn in rows for p in hn.pos for n in pub.sample_negatives(hn, 3, 5)}
    got = set(zip(t["qid"].to_pylist(), t["pos_pid"].to_pylist(), t["neg_pid"].to_pylist()))
    assert got == expect and t.num_rows == len(expect)
    for q, p, n, ps, ns in zip(*(t[c].to_pylist() for c in ("qid", "pos_pid", "neg_pid", "pos_score", "neg_score"))):
        assert (ps, ns) == (pytest.approx(scores[q][p]), pytest.approx(scores[q][n]))
    m = storage.read_manifest(out)
    assert m["stage"] == "import-scores" and m["counts"]["triples"] == len(expect)
    back = str(tmp_path / "back.pkl.gz")  # exported as the published pickle: the pairs' scores, as read
    assert CliRunner().invoke(main, ["export-scores", "--format", "st", "--scores", out, "--out", back]).exit_code == 0
    exported = pub.read_st_scores(back, trust_pickle=True)
    assert all(v == pytest.approx(scores[q][p]) for q, row in exported.items() for p, v in row.items())
    assert sum(len(r) for r in exported.values()) == len({(q, p) for q, p, _ in expect} | {(q, n) for q, _, n in expect})
    lists = str(tmp_path / "lists.parquet")  # no lists kept: one list per query of its scored documents
    assert CliRunner().invoke(main, ["export-scores", "--format", "lightonai", "--scores", out, "--out", lists]
                              ).exit_code == 0
    as_lists, _ = pub.read_lightonai(lists)
    assert {(q, p): v for q, ps, vs in zip(*(as_lists[c].to_pylist() for c in ("qid", "pids", "scores")))
            for p, v in zip(ps, vs)} == pytest.approx({(q, p): v for q, row in exported.items() for p, v in row.items()})
    pairs = read_pair_scores(out)  # the output is a --pair-scores source too
    assert pairs.num_rows == len({(q, p) for q, p, _ in expect} | {(q, n) for q, _, n in expect})
    for q, p, sc in zip(*(pairs[c].to_pylist() for c in ("qid", "pid", "score"))):
        assert sc == pytest.approx(scores[q][p])


def test_st_unknown_ids_named_or_quarantined(sample_store, st_files, tmp_path):
    s, h, rows, scores = st_files
    bad_pid = int(TextStore(sample_store).corpus(["pid"])["pid"].to_numpy().max()) + 1000
    q0 = rows[0].qid
    scores = {**scores, q0: {**scores[q0], bad_pid: 0.5}}
    rows = [pub.HardNegatives(1, q0, rows[0].pos, {"bm25": [bad_pid]}), *rows[1:]]
    s2, h2 = str(tmp_path / "s.pkl.gz"), str(tmp_path / "h.jsonl.gz")
    pub.write_st_scores(s2, scores)
    pub.write_hard_negatives(h2, rows)
    args = ["--format", "st", "--scores", s2, "--hard-negatives", h2, "--data", sample_store, "--trust-pickle"]
    strict = _invoke(*args, "--out", str(tmp_path / "strict"))
    assert strict.exit_code != 0 and f"unknown pid {bad_pid}" in strict.output and "h.jsonl.gz" in strict.output
    r = _invoke(*args, "--out", str(tmp_path / "lenient"), "--lenient")
    assert r.exit_code == 0, r.output
    m = storage.read_manifest(str(tmp_path / "lenient"))
    q = storage.read_parquet(str(tmp_path / "lenient" / "quarantine"))
    assert m["counts"]["quarantined_total"] == q.num_rows == 1 and q["neg_pid"][0].as_py() == bad_pid
    assert m["counts"]["triples"] + 1 == m["counts"]["triples_in"]  # nothing silently lost


def test_lightonai_lists_kept_and_triples_from_qrels(sample_store, tmp_path):
    store = TextStore(sample_store)
    queries = store.queries("train")
    qr = store.qrels("train")
    corpus = store.corpus(["pid", "doc_id"])
    doc_of = dict(zip(corpus["pid"].to_pylist(), corpus["doc_id"].to_pylist()))
    qid_of = dict(zip(queries["qid"].to_pylist(), queries["query_id"].to_pylist()))
    judged = {}
    for q, p in zip(qr["qid"].to_pylist(), qr["pid"].to_pylist()):
        judged.setdefault(q, set()).add(p)
    rows = []
    others = [p for p in corpus["pid"].to_pylist() if all(p not in v for v in judged.values())]
    for i, q in enumerate(sorted(judged)[:5]):
        pos = sorted(judged[q])[0]
        lst = [others[i * 4 + j] for j in range(3)] + [pos]
        rows.append({"query_id": qid_of[q], "document_ids": [doc_of[p] for p in lst],
                     "scores": [0.5, -1.0, 2.0, 1.5]})  # the positive is not the top-scored: qrels decide
    f = tmp_path / "lightonai.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "lo")
    r = _invoke("--format", "lightonai", "--scores", str(f), "--data", sample_store, "--out", out)
    assert r.exit_code == 0, r.output
    lists = storage.read_parquet(str(tmp_path / "lo" / "lists"))
    assert lists.num_rows == 5 and [len(x) for x in lists["pids"].to_pylist()] == [4] * 5
    t = TripleScores(out).table()
    assert t.num_rows == 15  # per list: the judged positive x the 3 others
    assert set(t["pos_score"].to_pylist()) == {1.5}
    assert sorted(set(t["neg_score"].to_pylist())) == [-1.0, 0.5, 2.0]
    assert storage.read_manifest(out)["counts"]["lists"] == 5
    back = str(tmp_path / "back.jsonl")  # exported: the same rows, in the store's original ids
    r = CliRunner().invoke(main, ["export-scores", "--format", "lightonai", "--scores", out, "--data", sample_store,
                                  "--out", back])
    assert r.exit_code == 0, r.output
    got = sorted((json.loads(x) for x in open(back)), key=lambda x: x["query_id"])
    assert got == sorted(rows, key=lambda x: x["query_id"])


def test_nrkd_through_import_scores_equals_import_nrkd(tmp_path):
    from raykd.formats import nrkd
    from raykd.stages.score import ImportNrkdConfig, import_nrkd

    f = str(tmp_path / "t.tsv")
    rows = pa.table({"pos_score": pa.array([3.5, 1.25, 3.5, 0.5], pa.float32()),
                     "neg_score": pa.array([-1.0, 0.0, -1.0, 0.25], pa.float32()),
                     "qid": [1, 1, 1, 2], "pos_pid": [10, 10, 10, 20], "neg_pid": [11, 12, 11, 21]})
    nrkd.write(f, [rows])
    a = _invoke("--format", "nrkd", "--scores", f, "--out", str(tmp_path / "a"))
    assert a.exit_code == 0, a.output
    import_nrkd(ImportNrkdConfig(nrkd=f, out=str(tmp_path / "b")))
    ta, tb = TripleScores(str(tmp_path / "a")).table(), TripleScores(str(tmp_path / "b")).table()
    assert ta.equals(tb) and ta.num_rows == 3  # the repeated line dropped, counted
    assert storage.read_manifest(str(tmp_path / "a"))["counts"]["duplicate_triples"] == 1
