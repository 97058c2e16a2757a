"""`raykd demo` end to end, writing everything to the moto S3 server, at a small size (the README's `make demo`
runs the same code at full size).

Every stage runs for real: the sample, prepare, two teachers fine-tuned with Ray Train, Ray Data scoring,
three Margin-MSE/labels students and TCT-ColBERT on 2 Ray Train workers, sharded + merged Faiss indexes, BM25,
dense, re-ranking and hybrid search, evaluation and the report."""

from __future__ import annotations

import json
import os

import pytest

from raykd import storage
from raykd.stages.demo import DemoConfig, demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"bm25", "dense bert_dot_margin_mse", "dense bert_dot_labels", "dense tct_colbert",
        "rerank bm25 > colbert_margin_mse", "rerank bm25 > teacher_bert_wide", "hybrid bm25 + bert_dot_margin_mse"}


@pytest.mark.slow
def test_demo_to_s3_end_to_end_and_resumes(ray_cluster, s3_uri, tmp_path):
    cfg = DemoConfig(out=s3_uri, train_queries=60, dev_queries=20, passages=600, negatives=5, workers=2,
                     teacher_steps=16, student_steps=8, batch_size=8, hidden=32, shards=2, k=20,
                     local_cache=str(tmp_path / "init"), teacher_min_val=1.01)  # over any MRR: every teacher retries
    summary = demo(cfg)

    # the report landed in object storage, with every run evaluated
    for name in ("report.md", "metrics.json", "efficiency.png", "demo.json", "demo.md"):
        assert storage.exists(storage.join(s3_uri, "report", name)), name
    stored = json.loads(storage.read_bytes(storage.join(s3_uri, "report", "demo.json")))
    assert set(stored["mrr10"]) == RUNS
    assert all(0.0 <= v <= 1.0 for v in stored["mrr10"].values()), stored["mrr10"]
    # BM25 finds the planted positives far above random, whatever the tiny students learnt in 8 steps
    assert stored["mrr10"]["bm25"] > 20 * stored["random_mrr10"]
    md = storage.read_bytes(storage.join(s3_uri, "report", "demo.md")).decode()
    assert "no distillation" in md and "Random ranking" in md
    # the comparison with the baseline is a paired test over the dev queries, and the teachers' quality is shown
    assert "paired randomisation test over 20 dev queries" in md, md
    assert 0.0 < stored["distillation_p_value"] <= 1.0
    assert stored["distillation_verdict"] in {"no significant difference", "significantly better", "significantly worse"}
    assert set(stored["teachers_val_mrr10"]) == {"teacher_bert_wide", "teacher_bert_narrow"}
    assert "Teachers' validation MRR@10" in md
    # the tiny teachers show the pipeline; the report sends a reader to the real-data reproduction for the method
    assert "docs/reproduction.md" in md and os.path.exists(os.path.join(ROOT, "docs", "reproduction.md"))
    # a teacher under the bar is trained once more from a fresh initialisation; the better run scores the triples
    scored = []
    for name, runs in stored["teacher_runs"].items():
        assert [r["out"] for r in runs] == [storage.join(s3_uri, "teachers", name),
                                            storage.join(s3_uri, "teachers", "retry1", name)]
        assert runs[0]["init"] != runs[1]["init"]
        assert all(storage.has_manifest(r["out"]) for r in runs)
        best = max(runs, key=lambda r: r["val_mrr10"])
        assert [r["scored"] for r in runs] == [r is best for r in runs]
        assert stored["teachers_val_mrr10"][name] == best["val_mrr10"]
        scored.append(storage.join(best["out"], "model"))
    assert "the best of 2 runs" in md and "Weak teacher(s), under 1.010" in md, md
    score_manifest = storage.read_manifest(storage.join(s3_uri, "scores"), stage="score")
    assert score_manifest["stats"]["teacher_paths"] == scored
    # the ensemble's columns keep the teachers' names whichever run scored
    assert score_manifest["stats"]["teachers"] == ["teacher_bert_wide", "teacher_bert_narrow"]
    assert summary["distillation_gain_mrr10"] == pytest.approx(
        stored["mrr10"]["dense bert_dot_margin_mse"] - stored["mrr10"]["dense bert_dot_labels"])

    # every stage's output is finished (manifest last) on S3
    for sub in ("store", "teachers/teacher_bert_wide", "teachers/teacher_bert_narrow", "scores",
                "students/bert_dot_margin_mse", "students/bert_dot_labels", "students/colbert_margin_mse",
                "students/tct_colbert", "index/bert_dot_margin_mse", "runs/bm25"):
        assert storage.has_manifest(storage.join(s3_uri, sub)), sub
    counts = score_manifest["counts"]  # every training triple scored once (repeated triples counted, not lost)
    assert counts["triples_in"] == 60 * 5 and counts["triples"] + counts["duplicate_triples"] == 60 * 5, counts

    # a re-run with the same --out resumes: every finished stage is skipped, its manifest untouched
    before = {sub: storage.read_bytes(storage.join(s3_uri, sub, storage.MANIFEST))
              for sub in ("scores", "students/tct_colbert", "index/tct_colbert")}
    again = demo(cfg)
    assert set(again["mrr10"]) == RUNS
    assert again["mrr10"] == pytest.approx(summary["mrr10"])
    for sub, data in before.items():
        assert storage.read_bytes(storage.join(s3_uri, sub, storage.MANIFEST)) == data, sub


def test_training_chains_share_the_machine_only_when_it_has_a_core_per_worker(monkeypatch):
    from raykd.stages.demo import _side_by_side

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _side_by_side(DemoConfig(workers=2)) is False  # 2 cores: one run after the other (measured faster)
    assert _side_by_side(DemoConfig(workers=1)) is True
    assert _side_by_side(DemoConfig(workers=2, side_by_side="yes")) is True
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert _side_by_side(DemoConfig(workers=2)) is True
    assert _side_by_side(DemoConfig(workers=2, side_by_side="no")) is False
    with pytest.raises(ValueError, match="side_by_side must be yes, no or auto, got 'sometimes'"):
        _side_by_side(DemoConfig(side_by_side="sometimes"))
