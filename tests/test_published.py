"""Published teacher-score files (raykd.formats.published): round trips in the real formats, bad rows named or
quarantined. No Ray, no models."""

from __future__ import annotations

import gzip
import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from raykd.errors import FormatError, UserError
from raykd.formats import published as pub

SCORES = {1: {10: 9.5, 11: -2.0, 12: 0.25, 13: 1.0}, 2: {20: 3.0, 21: -1.5}}
HARD = [pub.HardNegatives(1, 1, [10], {"bm25": [11, 12, 10], "tas-b": [13, 11]}),
        pub.HardNegatives(2, 2, [20], {"bm25": [21]})]


def _st_files(tmp_path):
    scores, hard = str(tmp_path / "ce-scores.pkl.gz"), str(tmp_path / "msmarco-hard-negatives.jsonl.gz")
    pub.write_st_scores(scores, SCORES)
    pub.write_hard_negatives(hard, HARD)
    return scores, hard


def test_st_pickle_needs_trust_and_round_trips(tmp_path):
    scores, hard = _st_files(tmp_path)
    with gzip.open(scores, "rb") as f:  # the published layout: a gzip'd pickle of {qid: {pid: score}}
        assert pickle.load(f) == SCORES
    with pytest.raises(UserError, match="can run arbitrary code.*--trust-pickle"):
        pub.read_st_scores(scores)
    assert pub.read_st_scores(scores, trust_pickle=True) == SCORES
    assert [h.qid for h in pub.iter_hard_negatives(hard)] == [1, 2]
    assert list(pub.iter_hard_negatives(hard))[0].neg == HARD[0].neg


def test_st_triples_union_of_systems_capped_and_seeded(tmp_path):
    scores, hard = _st_files(tmp_path)
    s = pub.read_st_scores(scores, trust_pickle=True)
    full, missing = pub.st_triples(hard, s, negatives_per_query=None)
    assert not missing
    assert full.to_pylist()[:3] == [  # bm25 then tas-b, first occurrence kept, the positive left out
        {"qid": 1, "pos_pid": 10, "neg_pid": n, "pos_score": 9.5, "neg_score": SCORES[1][n]} for n in (11, 12, 13)]
    capped, _ = pub.st_triples(hard, s, negatives_per_query=2, seed=3)
    again, _ = pub.st_triples(hard, s, negatives_per_query=2, seed=3)
    assert capped.equals(again) and capped.num_rows == 3
    assert set(capped.filter(pa.compute.equal(capped["qid"], 1))["neg_pid"].to_pylist()) <= {11, 12, 13}


def test_st_missing_score_named_or_quarantined(tmp_path):
    scores, hard = _st_files(tmp_path)
    s = pub.read_st_scores(scores, trust_pickle=True)
    del s[1][13]
    with pytest.raises(FormatError, match=r"msmarco-hard-negatives.jsonl.gz, line 1: no teacher score for qid 1, pid 13"):
        pub.st_triples(hard, s, None)
    kept, missing = pub.st_triples(hard, s, None, lenient=True)
    assert kept.num_rows == 3 and missing == [(1, 10, 13, 1, "no teacher score for qid 1, pid 13 in the score file")]


def test_st_bad_rows_are_named(tmp_path):
    bad = str(tmp_path / "bad.pkl")
    with open(bad, "wb") as f:
        pickle.dump({1: {10: float("nan")}}, f)
    with pytest.raises(FormatError, match=r"bad.pkl: qid 1, pid 10: the score must be finite"):
        pub.read_st_scores(bad, trust_pickle=True)
    hn = tmp_path / "hn.jsonl"
    hn.write_text('{"qid": 1, "pos": [10], "neg": {"bm25": [11]}}\n{"qid": "x1", "pos": [10]}\n')
    with pytest.raises(FormatError, match=r"hn.jsonl, line 2: qid must be an integer id"):
        list(pub.iter_hard_negatives(str(hn)))


@pytest.mark.parametrize("name", ["kd.parquet", "kd.jsonl", "kd.jsonl.gz"])
def test_lightonai_round_trip_keeps_lists(tmp_path, name):
    lists = pa.Table.from_pydict({"qid": [5, 6], "pids": [[50, 51, 52], [60, 61]],
                                  "scores": [[0.1, 0.9, 0.3], [2.0, 1.0]]}, schema=pub.LIST_SCHEMA)
    qid_of, pid_of = {"q5": 5, "q6": 6}, {f"d{p}": p for p in (50, 51, 52, 60, 61)}
    uri = str(tmp_path / name)
    assert pub.write_lightonai(uri, lists, {v: k for k, v in qid_of.items()}, {v: k for k, v in pid_of.items()}) == 2
    back, bad = pub.read_lightonai(uri, qid_of, pid_of)
    assert back.equals(lists) and not bad
    top = pub.list_triples(back)  # no qrels: the top-scored document is the positive
    assert top.to_pylist()[0] == {"qid": 5, "pos_pid": 51, "neg_pid": 50, "pos_score": pytest.approx(0.9),
                                  "neg_score": pytest.approx(0.1)}
    assert top.num_rows == 3
    judged = pub.list_triples(back, {5: {50}, 6: {61}})
    assert judged["pos_pid"].to_pylist() == [50, 50, 61]


def test_lightonai_bad_rows(tmp_path):
    f = tmp_path / "kd.jsonl"
    f.write_text(json.dumps({"query_id": "1", "document_ids": ["7", "8"], "scores": [1.0]}) + "\n")
    with pytest.raises(FormatError, match=r"kd.jsonl, line 1: document_ids \(2\) and scores \(1\)"):
        pub.read_lightonai(str(f))
    f.write_text(json.dumps({"query_id": "1", "document_ids": ["7"], "scores": ["nan"]}) + "\n")
    with pytest.raises(FormatError, match=r"line 1: query 1: a score must be finite"):
        pub.read_lightonai(str(f))
    f.write_text(json.dumps({"query_id": "1", "document_ids": ["7"], "scores": [1.0]}) + "\n"
                 + json.dumps({"query_id": "2", "document_ids": ["9"], "scores": [1.0]}) + "\n")
    with pytest.raises(FormatError, match=r"line 2: unknown id '9'"):
        pub.read_lightonai(str(f), {"1": 1, "2": 2}, {"7": 7})
    kept, bad = pub.read_lightonai(str(f), {"1": 1, "2": 2}, {"7": 7}, lenient=True)
    assert kept.num_rows == 1 and bad == [(2, "2", "unknown id '9' (not in the text store)")]


def test_unknown_ids_against_the_store():
    t = pa.Table.from_pydict({"qid": [1, 1, 9], "pos_pid": [10, 10, 10], "neg_pid": [11, 99, 11],
                              "pos_score": [1.0, 1.0, 1.0], "neg_score": [0.0, 0.0, 0.0]}, schema=pub.TRIPLE_SCHEMA)
    qids, pids = np.array([1, 2]), np.array([10, 11])
    with pytest.raises(FormatError, match=r"f.tsv: triple 2 \(qid 1, pos 10, neg 99\): unknown pid 99"):
        pub.split_unknown(t, qids, pids, "f.tsv", lenient=False)
    kept, q = pub.split_unknown(t, qids, pids, "f.tsv", lenient=True)
    assert kept.num_rows == 1 and q["reason"].to_pylist() == ["unknown pid 99", "unknown qid 9"]
