"""The scoring actor's batch function (raykd.batching) and the GPU benchmark's CPU run (bench/gpu.py --tiny)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from raykd.batching import Ragged, collate, score_block

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_and_pairs(tiny_models):
    """A tiny BERT_CAT teacher and 70 tokenised pairs of varied lengths (real texts through its tokenizer)."""
    from raykd.models.cross_encoder import CrossEncoder

    path = tiny_models("bert", "cross_encoder", seed=5)
    model = CrossEncoder.from_pretrained(path)
    rng = np.random.default_rng(0)
    words = ["ray", "data", "passage", "ranking", "teacher", "student", "margin", "query", "dense", "index"]
    queries = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(70)]
    passages = [" ".join(rng.choice(words, rng.integers(3, 60))) for _ in range(70)]
    return path, model, queries, passages, model.tokenize_unpadded(queries, passages)


def test_bucketing_does_not_change_scores(teacher_and_pairs):
    _, model, _, _, enc = teacher_and_pairs
    ids, types = enc["input_ids"], enc["token_type_ids"]
    a = score_block(model, ids, types, batch_size=8, bucket=True, device="cpu")
    b = score_block(model, ids, types, batch_size=8, bucket=False, device="cpu")
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5, rtol=0)
    assert a.forward_passes == b.forward_passes == 9
    np.testing.assert_array_equal(a.lengths, [len(x) for x in ids])
    assert (a.padded_lengths % 8 == 0).all() and (a.padded_lengths >= a.lengths).all()
    assert a.padded_lengths.sum() < b.padded_lengths.sum()  # sorted buckets pad less


def test_ragged_inputs_agree(teacher_and_pairs):
    """Lists, an Arrow list column (as the actor gets it, sliced and chunked) and the padded collate agree."""
    _, model, _, _, enc = teacher_and_pairs
    ids, types = enc["input_ids"], enc["token_type_ids"]
    col = pa.chunked_array([pa.array(ids[:30], pa.list_(pa.int32())), pa.array(ids[30:], pa.list_(pa.int32()))])
    r = Ragged.of(col)
    assert [list(r.values[r.offsets[i]:r.offsets[i + 1]]) for i in range(len(r))] == [list(x) for x in ids]
    sliced = Ragged.of(pa.array(ids, pa.list_(pa.int32())).slice(5, 10))
    assert [list(sliced.values[sliced.offsets[i]:sliced.offsets[i + 1]]) for i in range(10)] == ids[5:15]
    batch = collate(ids[:4], types[:4], pad_id=0)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"].sum(1).tolist() == [len(x) for x in ids[:4]]
    with torch.no_grad():
        direct = model(**batch).numpy()
    got = score_block(model, col, pa.chunked_array([pa.array(types, pa.list_(pa.int8()))]), batch_size=16,
                      device="cpu").scores
    np.testing.assert_allclose(got[:4], direct, atol=1e-5, rtol=0)


def test_scoring_actor_body_equals_score_block(teacher_and_pairs):
    """The score stage's actor (called as a plain object, no Ray) returns what score_block computes."""
    from raykd.stages.score import TeacherScorer

    path, model, queries, passages, enc = teacher_and_pairs
    scorer = TeacherScorer("t", path, 30, 200, batch_size=8)
    block = pa.table({"qid": np.arange(len(queries)), "ids__t": pa.array(enc["input_ids"], pa.list_(pa.int32())),
                      "types__t": pa.array(enc["token_type_ids"], pa.list_(pa.int8()))})
    out = scorer(block)
    expect = score_block(model, enc["input_ids"], enc["token_type_ids"], batch_size=8, device="cpu")
    np.testing.assert_array_equal(out["score__t"].to_numpy(), expect.scores)
    np.testing.assert_array_equal(out["len__t"].to_numpy(), expect.lengths)
    np.testing.assert_array_equal(out["padlen__t"].to_numpy(), expect.padded_lengths)
    np.testing.assert_allclose(out["score__t"].to_numpy(), model.score(queries, passages).numpy(), atol=1e-5, rtol=0)


def test_batching_imports_no_ray():
    code = ("import sys, raykd.batching, raykd.models.cross_encoder; "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'raykd.stages', 'raykd.storage'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_gpu_bench_tiny_cpu_run(tmp_path):
    """`python bench/gpu.py --device cpu --tiny` runs every section and writes them all, without Ray."""
    out = tmp_path / "gpu.json"
    # raykd.storage (fsspec, pyarrow: both on the GPU machine) still comes in through raykd.losses.tct's student
    # registration until TCT becomes an ordinary student; Ray, s3fs and the stages must not
    check = ("import sys; bad = [m for m in sys.modules if m in ('ray', 's3fs') or m.startswith(('ray.', "
             "'raykd.stages'))]; assert not bad, bad")
    # run the script as `python bench/gpu.py ...` would, then check in the same process what it imported
    runner = tmp_path / "run.py"
    runner.write_text(
        "import runpy, sys\n"
        f"sys.argv = ['bench/gpu.py', '--device', 'cpu', '--tiny', '--out', {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_path('bench/gpu.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "else:\n"
        "    rc = 0\n"
        f"{check}\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script puts the repo root on sys.path
    proc = subprocess.run([sys.executable, str(runner)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"gpu: score_frac_peak=\d+\.\d{3} train_frac_peak=\d+\.\d{3} search_s=\d+\.\d{2}", last), last
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["info"]["device"] == "cpu" and result["info"]["torch"] == torch.__version__
    assert result["peak"]["tflops"] > 0
    rows = result["score"]["rows"]
    assert {r["teacher"] for r in rows} == {"bert-base", "bert-large", "albert-large"}
    assert {r["bucketing"] for r in rows} == {True, False} and len({r["batch_size"] for r in rows}) >= 2
    assert all(r["pairs_per_s"] > 0 and r["frac_peak"] > 0 and r["settings"] for r in rows)
    assert result["score"]["t2"]["hours_on_8_gpus"] > 0
    assert {r["student"] for r in result["train"]["rows"]} == {"bert_dot", "colbert", "prettr", "tk", "tct"}
    assert all(r["triples_per_s"] > 0 and r["frac_peak"] > 0 for r in result["train"]["rows"])
    assert result["encode"]["passages_per_s"] > 0
    assert result["search"]["torch_s"] > 0 and result["search"]["queries"] == 70
    faiss = result["search"]["faiss"]
    assert "skipped" in faiss or faiss["top10_agreement_with_torch"] >= 0.99
    assert set(result["profile"]) == {"score_block", "bert_dot_step"}
    assert last == result["summary"]
