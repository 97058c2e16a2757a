"""Storage: URIs to filesystems (local, file://, s3:// on a real moto server), atomic parts, manifests, secrets."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from raykd import storage


@pytest.fixture(params=["local", "file", "s3"])
def out_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return f"file://{tmp_path}/out"
    return request.getfixturevalue("s3_uri")


def test_bytes_and_parquet_round_trip(out_uri):
    storage.makedirs(out_uri)
    storage.write_bytes_atomic(storage.join(out_uri, "a", "b.txt"), b"hello")
    assert storage.read_bytes(storage.join(out_uri, "a/b.txt")) == b"hello"
    t = pa.table({"pid": pa.array([3, 1, 2], pa.int64()), "text": ["c", "a", "b"]})
    storage.write_parquet_atomic(t, storage.join(out_uri, "parts", "part-00000.parquet"))
    storage.write_parquet_atomic(t, storage.join(out_uri, "parts", "part-00001.parquet"))
    assert storage.parquet_parts(storage.join(out_uri, "parts"))[-1].endswith("part-00001.parquet")
    back = storage.read_parquet(storage.join(out_uri, "parts"))
    assert back.num_rows == 6 and back["pid"].to_pylist() == [3, 1, 2, 3, 1, 2]
    batches = list(storage.iter_parquet_batches(storage.join(out_uri, "parts"), batch_size=2))
    assert sum(b.num_rows for b in batches) == 6


def test_local_commit_leaves_no_temporary_files(tmp_path):
    uri = str(tmp_path / "x" / "part.bin")
    storage.write_bytes_atomic(uri, b"1")
    storage.write_bytes_atomic(uri, b"22")
    assert os.listdir(tmp_path / "x") == ["part.bin"]
    assert storage.read_bytes(uri) == b"22"


def test_reader_refuses_output_without_manifest(out_uri):
    storage.write_bytes_atomic(storage.join(out_uri, "part-00000.parquet"), b"x")
    with pytest.raises(storage.IncompleteOutputError, match="no manifest.json found.*did not finish"):
        storage.read_manifest(out_uri, stage="score")
    storage.write_manifest(out_uri, "score", format="raykd.triple_scores", counts={"rows": 1})
    m = storage.read_manifest(out_uri, stage="score")
    assert m["counts"] == {"rows": 1} and m["complete"] is True
    with pytest.raises(storage.IncompleteOutputError, match="expected the output of stage `train`"):
        storage.read_manifest(out_uri, stage="train")


def test_secrets_never_reach_manifests(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    cfg = {
        "out": "s3://user:pa55word@bucket/x",
        "aws_secret_access_key": "s3cr3t-value-xyz",
        "note": "uses key AKIAABCDEFGHIJKLMNOP and s3cr3t-value-xyz",
        "nested": [{"hf_token": "hf_abcdef"}],
    }
    storage.write_manifest(str(tmp_path), "prepare", format="x", config=cfg)
    text = (tmp_path / "manifest.json").read_text()
    for secret in ("s3cr3t-value-xyz", "pa55word", "AKIAABCDEFGHIJKLMNOP", "hf_abcdef"):
        assert secret not in text
    assert json.loads(text)["config"]["out"] == "s3://***@bucket/x"


def test_s3_uses_endpoint_from_environment(s3_server, s3_uri):
    fs, path = storage.filesystem(s3_uri)
    assert fs.client_kwargs["endpoint_url"] == s3_server["endpoint"]
    storage.write_bytes_atomic(storage.join(s3_uri, "x"), b"1")
    afs, apath = storage.arrow_filesystem(storage.join(s3_uri, "x"))
    with afs.open_input_stream(apath) as f:
        assert f.read() == b"1"


def test_redaction_keeps_statistics_named_like_tokens():
    stats = {"tokens": 3, "padded_tokens": 5, "real_tokens": 2, "hf_token": "hf_x", "api_key": "k"}
    assert storage.redact(stats) == {"tokens": 3, "padded_tokens": 5, "real_tokens": 2, "hf_token": "***", "api_key": "***"}
