"""The console a user reads: a small real `raykd train` run prints raykd's events once each and none of Ray's or
transformers' known noise; `--verbose` (or ``RAYKD_VERBOSE=1``) brings Ray's own lines back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from raykd.log import NOISE, worker_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what a run printed before raykd had one console (issue 15): none of it may come back by default
NOISE_LINES = [
    "Failed to query Ray Train Controller actor state",
    "core_worker.cc",
    "LOAD REPORT",
    "Progress bars disabled",
    "Reporting training result",
    "Loading weights",
    "Writing model shards",
]


def _train(tmp_path, store: str, init: str, name: str, verbose: bool) -> str:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  log_every: 5\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAYKD_VERBOSE", None)
    cmd = [sys.executable, "-m", "raykd.cli", *(["--verbose"] if verbose else []), "train", "--data", store, "--init", init, "--loss", "labels",
           "--student", "bert_dot", "--out", str(tmp_path / name), "--steps", "10", "--batch-size", "8",
           "--val-queries", "5", "--workers", "2", "--config", str(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    # a console shows stdout and stderr together: count events over both
    return proc.stdout + proc.stderr


def _count(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text))


def test_train_console_quiet_by_default_and_verbose_brings_ray_back(tmp_path, sample_store, tiny_models):
    init = tiny_models("bert", "encoder", seed=3)
    quiet = _train(tmp_path, sample_store, init, "quiet", verbose=False)
    for noise in NOISE_LINES:
        assert noise not in quiet, f"{noise!r} is on the console:\n{quiet}"
    # raykd's own events, once each (a step line used to come twice: stdout and Ray Train's root logger)
    assert _count(quiet, r"raykd\.train INFO training bert_dot on") == 1, quiet
    assert _count(quiet, r"raykd\.train INFO step 0 validation MRR@10") == 1, quiet
    assert _count(quiet, r"raykd\.train INFO step 5/10 loss") == 1, quiet
    assert _count(quiet, r"raykd\.train INFO step 10/10 loss") == 1, quiet
    # Ray Train's controller bookkeeping is gone (its errors, if any, still show)
    assert "Started training worker group" not in quiet, quiet

    loud = _train(tmp_path, sample_store, init, "loud", verbose=True)
    # Ray's own lines are back: its controller's bookkeeping and its per-report INFO lines
    assert "Started training worker group" in loud, loud
    assert "Reporting training result" in loud, loud
    assert _count(loud, r"raykd\.train INFO step 10/10 loss") == 1, loud


def test_worker_line_filter():
    """The rule applied to lines Ray forwards from workers: noise goes, errors stay whole, raykd's lines pass."""
    assert worker_lines(["Failed to query Ray Train Controller actor state. State API ..."], "PlacementGroupCleaner") == []
    assert worker_lines(["Requesting resources: {'CPU': 0.5} * 2"], "TrainController") == []
    trace = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: boom"]
    assert worker_lines(trace, "TrainController") == trace
    ours = ["12:00:00 raykd.train INFO step 5/10 loss 0.5 100 triples/s"]
    assert worker_lines(ours, "RayTrainWorker") == ours
    assert worker_lines(["[2026 E 1 2] core_worker.cc:2465: Actor with class name: 'X' has constructor arguments in "
                         "the object store and max_restarts > 0. If the arguments"], "SplitCoordinator") == []
    assert NOISE.search("Progress bars disabled. To enable, set `x`")
