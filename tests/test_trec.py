"""TREC run and qrels files: read, write, round trip, clear errors with file and line."""

from __future__ import annotations

import pytest

from raykd.errors import FormatError
from raykd.formats import trec


def test_run_round_trip_in_trec_eval_order(tmp_path):
    run = {"q1": {"d1": 0.5, "d2": 2.0, "d3": 0.5}, "q2": {"x": -1.25}}
    path = str(tmp_path / "run.trec")
    trec.write_run(run, path, tag="my run")
    lines = open(path).read().splitlines()
    assert lines[:3] == ["q1 Q0 d2 1 2 my_run", "q1 Q0 d3 2 0.5 my_run", "q1 Q0 d1 3 0.5 my_run"]
    assert trec.read_run(path) == run
    trec.write_run(run, path, k=1)
    assert trec.read_run(path) == {"q1": {"d2": 2.0}, "q2": {"x": -1.25}}


def test_reads_trec_eval_reference_run_and_qrels(shared):
    d = shared("trec_eval_ref")
    run = trec.read_run(str(d / "results.test"))
    qrels = trec.read_qrels(str(d / "qrels.test"))
    assert sorted(run) == ["301", "302", "303"] and all(len(v) == 500 for v in run.values())
    assert sorted(qrels) == ["301", "302", "303"] and {r for d in qrels.values() for r in d.values()} >= {0, 1}


def test_msmarco_three_column_run_keeps_rank_order(tmp_path):
    p = tmp_path / "run.tsv"
    p.write_text("5\t100\t1\n5\t7\t2\n")
    run = trec.read_run(str(p))
    assert [d for d, _ in trec.trec_order(run["5"])] == ["100", "7"]


def test_beir_qrels_with_header(tmp_path):
    p = tmp_path / "test.tsv"
    p.write_text("query-id\tcorpus-id\tscore\n1\tA\t1\n1\tB\t0\n")
    assert trec.read_qrels(str(p)) == {"1": {"A": 1, "B": 0}}


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("q Q0 d 1 0.5 t\nq Q0 d2 1 0.4\n", 2, "expected 6 columns"),
        ("q Q0 d one 0.5 t\n", 1, "rank 'one' is not an integer"),
        ("q Q0 d 1 high t\n", 1, "score 'high' is not a number"),
        ("q Q0 d 1 1 t\n\nq Q0 d 2 0.5 t\n", 3, "document d appears twice for query q"),
    ],
)
def test_bad_run_lines_name_file_and_line(tmp_path, content, line, message):
    p = tmp_path / "bad.trec"
    p.write_text(content)
    with pytest.raises(FormatError, match=message) as e:
        trec.read_run(str(p))
    assert e.value.line == line and e.value.file == str(p)
    assert f"{p}, line {line}" in str(e.value)


def test_bad_qrels_lines(tmp_path):
    p = tmp_path / "q.txt"
    p.write_text("1 0 A 1\n1 0 B x\n")
    with pytest.raises(FormatError, match=r"line 2: relevance 'x' is not an integer"):
        trec.read_qrels(str(p))
    p.write_text("1 0 A 1\n1 0 A 2\n")
    with pytest.raises(FormatError, match="judged twice"):
        trec.read_qrels(str(p))


def test_write_refuses_ids_with_whitespace(tmp_path):
    with pytest.raises(ValueError, match="free of whitespace"):
        trec.write_run({"q 1": {"d": 1.0}}, str(tmp_path / "r.trec"))


def test_printed_scores_are_what_a_run_file_reads_back():
    """The vectorised %.8g round trip equals Python's formatting and parsing, score by score: float32 scores of
    every scale (the exact path), ties at the 8th digit, powers of ten and their neighbours, float64 scores."""
    import numpy as np

    rng = np.random.default_rng(3)
    f32 = np.concatenate([rng.normal(size=20000), rng.normal(size=20000) * 40, rng.random(20000) * 1e-4,
                          10.0 ** rng.integers(-9, 10, 2000), [0.0, -0.0, 1e-30, 3e38, 99999999.5, 1.5, 0.125, 1e8]])
    f32 = f32.astype(np.float32)
    f32 = np.concatenate([f32, np.nextafter(f32[-2000:], np.float32(np.inf))]).astype(np.float64)
    scores = np.concatenate([f32, rng.normal(size=2000) * 10])
    want = np.array([float(f"{s:.8g}") for s in scores.tolist()])
    got = trec.printed_scores(scores)
    assert got.tobytes() == want.tobytes()
