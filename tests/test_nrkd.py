"""The NRKD tsv reader/writer and the scores format helpers (no Ray)."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pytest

from raykd.errors import FormatError
from raykd.formats import nrkd
from raykd.formats import scores as fmt

LINES = [
    "11.5\t-3.25\t100\t7\t8\n",
    "0.1\t0.2\t101\t9\t10\n",
    "\n",
    "-1e-3\t4\t102\t11\t12\n",
]


def test_read_plain_and_gzip(tmp_path):
    plain = tmp_path / "t.tsv"
    plain.write_text("".join(LINES))
    gz = tmp_path / "t.tsv.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(LINES))
    for p in (plain, gz):
        t = nrkd.read(str(p))
        assert t.schema == nrkd.SCHEMA
        assert t["qid"].to_pylist() == [100, 101, 102]
        assert t["neg_pid"].to_pylist() == [8, 10, 12]
        np.testing.assert_allclose(t["pos_score"].to_numpy(), [11.5, 0.1, -1e-3], rtol=1e-6)


def test_write_read_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    table = pa.table({
        "pos_score": rng.normal(size=n).astype(np.float32) * 10,
        "neg_score": rng.normal(size=n).astype(np.float32),
        "qid": rng.integers(0, 10**9, n), "pos_pid": rng.integers(0, 10**7, n), "neg_pid": rng.integers(0, 10**7, n),
    }).cast(nrkd.SCHEMA)
    for name in ("out.tsv", "out.tsv.gz"):
        uri = str(tmp_path / name)
        assert nrkd.write(uri, table.to_batches(max_chunksize=64)) == n
        assert nrkd.read(uri).equals(table)  # float32 scores survive the text form bit for bit


@pytest.mark.parametrize(
    "line,match",
    [
        ("1.0\t2.0\t3\t4\n", "expected 5 tab-separated columns, found 4"),
        ("high\t2.0\t3\t4\t5\n", "scores must be floats"),
        ("1.0\t2.0\tq3\t4\t5\n", "ids must be integers"),
        ("nan\t2.0\t3\t4\t5\n", "scores must be finite"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, match):
    p = tmp_path / "bad.tsv"
    p.write_text(LINES[0] + LINES[1] + line)
    with pytest.raises(FormatError, match=match) as e:
        nrkd.read(str(p))
    assert e.value.line == 3 and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nrkd.read(str(tmp_path / "nope.tsv"))


def test_ensemble_is_weighted_mean_and_table_schema():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([3.0, 6.0, -3.0], np.float32)
    np.testing.assert_allclose(fmt.ensemble([a, b], [1, 3]), (a + 3 * b) / 4)
    with pytest.raises(ValueError, match="one weight per teacher"):
        fmt.ensemble([a, b], [1])
    with pytest.raises(ValueError, match="positive sum"):
        fmt.ensemble([a, b], [0, 0])
    t = fmt.make_table([1, 1, 2], [5, 5, 6], [7, 8, 9], {"x": (a, b), "y": (b, a)}, [1, 1])
    assert t.schema == fmt.schema(["x", "y"])
    np.testing.assert_allclose(t["margin"].to_numpy(), t["pos_score"].to_numpy() - t["neg_score"].to_numpy())


def test_teacher_names_are_unique_and_column_safe():
    assert fmt.teacher_names(["/m/bert-base/", "org/ALBERT.large", "/x/bert-base"]) == [
        "bert_base", "albert_large", "bert_base_2"]
    # a raykd training output's model folder is named after its run
    assert fmt.teacher_names(["s3://b/teachers/T-Wide/model", "/out/narrow/model/", "model"]) == [
        "t_wide", "narrow", "model"]
