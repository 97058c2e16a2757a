"""The train stage on real local Ray (2 workers, DDP), tiny real models, the embedded sample, moto S3.

The teacher is a real (lexical) scorer, written in the scores contract by hand (tests/train_support.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_support import write_scores

from raykd import storage
from raykd.errors import UserError
from raykd.stages.train import TrainConfig, train


@pytest.fixture(scope="module")
def scores_uri(sample_store, tmp_path_factory) -> str:
    return write_scores(sample_store, str(tmp_path_factory.mktemp("scores")))


def _cfg(sample_store, scores, init, out, **kw) -> TrainConfig:
    base = dict(data=sample_store, scores=scores, student="colbert", init=init, out=out, workers=2, batch_size=16,
                steps=30, lr=1e-3, checkpoint_every=10, keep_checkpoints=2, log_every=5, val_queries=20,
                val_negatives=19, max_failures=2)
    base.update(kw)
    return TrainConfig(**base)


def _train_worker_pids() -> list[int]:
    import ray._private.state as state

    return [a["Pid"] for a in state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a.get("Pid")]


def _kill_a_worker_after_first_checkpoint(out: str, done: dict) -> None:
    while not done.get("stop"):
        names = storage.listdir(storage.join(out, "ray_train"))
        # the second checkpoint folder appearing means the first was written and registered long ago
        if sum(n.startswith("checkpoint_20") for n in names) >= 2:
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                done["killed"] = pids[-1]
                return
        time.sleep(0.3)


def test_the_training_stream_holds_every_pass_once(ray_cluster, sample_store, scores_uri):
    """The steps' passes over the triples come as ONE Ray Data stream (started once per run, not per epoch):
    every scored triple appears once per pass, with its texts attached (the lookup's, compared with the store)."""
    from collections import Counter

    from raykd.formats.scores import TripleScores
    from raykd.losses import get_loss
    from raykd.stages.train import _dataset, check_scores

    scores = TripleScores(scores_uri)
    n = check_scores(scores)
    cfg = _cfg(sample_store, scores_uri, "unused", "unused")
    rows = _dataset(cfg, get_loss("margin_mse"), scores, passes=3).take_all()
    assert len(rows) == 3 * n
    counts = Counter((r["qid"], r["pos_pid"], r["neg_pid"]) for r in rows)
    assert all(c % 3 == 0 for c in counts.values())  # a triple listed k times appears 3k times
    assert all(r["query"] and r["positive"] and r["negative"] for r in rows)
    from raykd.formats.store import TextStore

    store = TextStore(sample_store)
    assert [r["positive"] for r in rows[:40]] == store.passages([r["pos_pid"] for r in rows[:40]])
    assert [r["negative"] for r in rows[:40]] == store.passages([r["neg_pid"] for r in rows[:40]])


def _key(r) -> tuple:
    return (int(r["qid"]), int(r["pos_pid"]), int(r["neg_pid"]))


def test_every_epoch_visits_every_triple_once_in_a_shuffled_order(ray_cluster, sample_store, scores_uri):
    """Data order (docs/train.md): an epoch is every triple once; the first batches mix many queries (the parts
    are sorted by qid); the order is a function of (seed, epoch): the same seed gives the same stream, another
    epoch or seed another order; a stream resumed at row r is the rest of the same order."""
    from collections import Counter

    from raykd.formats.scores import TripleScores
    from raykd.formats.store import TextStore
    from raykd.losses import get_loss
    from raykd.stages.train import _dataset, shared_texts

    scores = TripleScores(scores_uri)
    triples = TextStore(sample_store).triples()
    want = Counter(zip(*(triples[c].to_pylist() for c in ("qid", "pos_pid", "neg_pid"))))
    n = triples.num_rows
    cfg = _cfg(sample_store, scores_uri, "unused", "unused")
    texts = shared_texts(cfg)
    rows = _dataset(cfg, get_loss("margin_mse"), scores, passes=2, texts=texts).take_all()
    assert len(rows) == 2 * n
    first, second = [_key(r) for r in rows[:n]], [_key(r) for r in rows[n:]]
    assert Counter(first) == want and Counter(second) == want  # each epoch: every triple exactly once
    assert first != second  # each epoch in its own order
    stored = [tuple(x) for x in zip(*(triples[c].to_pylist() for c in ("qid", "pos_pid", "neg_pid")))]
    qids_in = lambda keys: len({k[0] for k in keys[: 4 * 32]})  # noqa: E731  distinct queries, first 4 batches of 32
    assert qids_in(stored) <= 6 and qids_in(first) >= 30, (qids_in(stored), qids_in(first))
    assert all(r["query"] and r["positive"] and r["negative"] for r in rows[:50])
    again = _dataset(cfg, get_loss("margin_mse"), scores, passes=1, texts=texts).take_all()
    assert [_key(r) for r in again] == first  # same seed, same order
    other = _dataset(_cfg(sample_store, scores_uri, "unused", "unused", seed=7), get_loss("margin_mse"), scores,
                     passes=1, texts=texts).take_all()
    assert [_key(r) for r in other] != first and Counter(_key(r) for r in other) == want
    resumed = _dataset(cfg, get_loss("margin_mse"), scores, passes=2, start_row=n - 100, texts=texts).take_all()
    assert [_key(r) for r in resumed] == (first + second)[n - 100:]  # a resumed run continues the same order


@pytest.mark.slow
def test_two_workers_distil_to_s3_survive_a_killed_worker(ray_cluster, sample_store, scores_uri, tiny_models, s3_uri):
    cfg = _cfg(sample_store, scores_uri, tiny_models("bert", "encoder"), s3_uri)
    done: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(s3_uri, done), daemon=True)
    killer.start()
    try:
        manifest = train(cfg)
    finally:
        done["stop"] = True
        killer.join(5)
    assert done.get("killed"), "the training worker was never killed: the test did not exercise recovery"

    m = storage.read_manifest(s3_uri, stage="train", format="raykd.student")
    assert m["counts"]["steps"] == 30 and manifest.counts["steps"] == 30
    history = [json.loads(x) for x in storage.read_bytes(storage.join(s3_uri, "metrics.jsonl")).decode().splitlines()]
    resumed = [h for h in history if h.get("event") == "resumed"]
    assert resumed and all(h["step"] > 0 and h["step"] % 10 == 0 for h in resumed), resumed
    assert m["stats"]["resumes"] == len(resumed)

    # it learned: Margin-MSE went down, re-ranking MRR@10 went up over the untrained student
    losses = [h["loss"] for h in history if "loss" in h]
    assert sum(losses[-2:]) / 2 < losses[0], losses
    assert m["stats"]["val_mrr@10_final"] > m["stats"]["val_mrr@10_initial"] + 0.1, m["stats"]

    # checkpoints live on S3, only the last keep_checkpoints of them
    ckpts = [n for n in storage.listdir(storage.join(s3_uri, "ray_train")) if n.startswith("checkpoint_20")]
    # (plus at most one orphan: the folder a killed worker was uploading when it died is never registered, so
    # Ray Train does not delete it)
    assert 1 <= len(ckpts) <= 3, ckpts
    newest = storage.join(s3_uri, "ray_train", sorted(ckpts)[-1], "metrics.jsonl")
    assert json.loads(storage.read_bytes(newest).decode().splitlines()[-1])["step"] == 30
    # the final student is an ordinary saved raykd model: download and score with it
    from raykd.models.registry import load_scorer

    local = os.path.join(str(ray_cluster and os.environ.get("TMPDIR", "/tmp")), f"student-{time.time_ns()}")
    for rel in [p for p in m["parts"] if p.startswith("model/")]:
        dst = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(storage.read_bytes(storage.join(s3_uri, rel)))
    student = load_scorer(os.path.join(local, "model"))
    assert student.score(["bafa"], ["bafa kela"]).shape == (1,)

    # re-running a finished output changes nothing
    again = train(cfg)
    assert again.counts == m["counts"]


@pytest.mark.slow
def test_killed_driver_then_rerun_resumes_from_the_latest_checkpoint(ray_cluster, sample_store, scores_uri,
                                                                     tiny_models, tmp_path):
    """`python jobs/train_student.py` as its own driver process on the test's cluster, SIGKILLed once its first
    checkpoint is registered; the same command's config run again resumes from that checkpoint and finishes."""
    out = str(tmp_path / "student")
    init = tiny_models("bert", "encoder")
    flags = ["--data", sample_store, "--scores", scores_uri, "--student", "colbert", "--init", init, "--out", out,
             "--workers", "2", "--batch-size", "16", "--steps", "60", "--lr", "1e-3", "--checkpoint-every", "10",
             "--keep-checkpoints", "2", "--val-queries", "0", "--max-failures", "0"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    root = Path(__file__).resolve().parent.parent
    log = open(tmp_path / "driver.log", "w+")
    proc = subprocess.Popen([sys.executable, str(root / "jobs" / "train_student.py"), *flags], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    ckpts: list = []
    # kill once Ray Train has registered a checkpoint: its controller writes the checkpoint manager's snapshot
    # (what a new driver restores from) after the checkpoint folder, so a folder alone is not enough
    snapshot = os.path.join(out, "ray_train", "checkpoint_manager_snapshot.json")
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(snapshot) as f:
                ckpts = sorted(set(re.findall(r"checkpoint_20[0-9_.-]+", f.read())))
        except (OSError, ValueError):
            ckpts = []
        if ckpts:
            break
        time.sleep(0.1)
    log.seek(0)
    driver_log = log.read()[-3000:]
    assert proc.poll() is None, f"the driver finished before it could be killed:\n{driver_log}"
    assert ckpts, f"no registered checkpoint within 300 s\n{driver_log}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not storage.has_manifest(out), "a killed run must not look finished"

    # the killed command's settings (the CLI's val_negatives default): the same fingerprint resumes
    m = train(_cfg(sample_store, scores_uri, init, out, steps=60, val_queries=0, val_negatives=29, max_failures=0))
    assert m.counts["steps"] == 60
    history = [json.loads(x) for x in storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()]
    resumed = [h for h in history if h.get("event") == "resumed"]
    # resumed from a checkpoint the killed driver's workers wrote (a multiple of 10 below 60), not from scratch
    assert len(resumed) == 1 and resumed[0]["step"] in (10, 20, 30, 40, 50), (ckpts, history)
    assert m.stats["resumes"] == 1
    steps = [h["step"] for h in history if "loss" in h]
    assert steps[-1] == 60 and steps == sorted(steps), (ckpts, history)


def test_nan_teacher_scores_are_refused_with_the_row(sample_store, tiny_models, tmp_path):
    scores = write_scores(sample_store, str(tmp_path / "scores"), max_triples=50, nan_row=7)
    with pytest.raises(UserError, match=r"part-00000.parquet, row 7: pos_score is nan.*finite"):
        train(_cfg(sample_store, scores, tiny_models("bert", "encoder"), str(tmp_path / "out")))


def test_scores_without_manifest_are_refused(sample_store, tiny_models, tmp_path):
    scores = write_scores(sample_store, str(tmp_path / "scores"), max_triples=50, manifest=False)
    with pytest.raises(storage.IncompleteOutputError, match="no manifest.json found"):
        train(_cfg(sample_store, scores, tiny_models("bert", "encoder"), str(tmp_path / "out")))


def test_unknown_student_and_loss_are_refused(sample_store, scores_uri, tiny_models, tmp_path):
    init = tiny_models("bert", "encoder")
    with pytest.raises(UserError, match="unknown student 'bert_doot'; known students: bert_cat, bert_dot"):
        train(_cfg(sample_store, scores_uri, init, str(tmp_path / "o"), student="bert_doot"))
    with pytest.raises(UserError, match="unknown loss 'kl'; known losses: .*margin_mse"):
        train(_cfg(sample_store, scores_uri, init, str(tmp_path / "o"), loss="kl"))
    with pytest.raises(UserError, match="give --scores"):
        train(_cfg(sample_store, None, init, str(tmp_path / "o")))
