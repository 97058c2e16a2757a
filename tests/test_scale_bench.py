"""The full-size rehearsal (bench/scale.py) at a tiny fraction: its JSON, its table and its last line.

The fast test runs the Ray-free stages (sample, prepare, texts) at two fractions, so growth is computed; the
`bench`-marked ones add score and train, and index, search and evaluate (a local Ray cluster per stage: 3-9
minutes each on a loaded 2-core machine): rehearsals, not in `make test`; `make bench-test` runs them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^scale: driver_peak_gb=(\d+\.\d+) worker_peak_gb=(\d+\.\d+) growth=(\d+\.\d+|na)$")


def _bench():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scale_bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, *args: str, timeout: int) -> tuple[dict, str]:
    out = tmp_path / "scale.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--root", str(tmp_path / "work"),
                           "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout.strip().splitlines()[-1]


def test_ray_free_stages_at_two_fractions(tmp_path):
    result, last = _run(tmp_path, "--fractions", "0.0001,0.0002", "--stages", "sample,prepare,texts",
                        "--lookup-batches", "3", timeout=90)
    rows = {(r["fraction"], r["stage"]): r for r in result["rows"]}
    assert set(rows) == {(f, s) for f in (0.0001, 0.0002) for s in ("sample", "prepare", "texts")}
    assert rows[(0.0001, "texts")]["work"] == 884  # passages at 1/10,000 of 8,841,823
    assert rows[(0.0002, "texts")]["work"] == 1768
    for r in result["rows"]:
        assert r["work"] > 0 and r["wall_s"] >= 0 and r["driver_peak_gb"] > 0
    assert set(result["growth"]) == {"sample", "prepare", "texts"}
    m = LAST_LINE.match(last)
    assert m, last
    big = [r for r in result["rows"] if r["fraction"] == 0.0002]
    assert float(m.group(1)) == pytest.approx(max(r["driver_peak_gb"] for r in big), abs=1e-3)
    assert float(m.group(3)) == pytest.approx(max(result["growth"].values()), abs=1e-3)
    assert not (tmp_path / "work" / "f0.0001").exists()  # deleted without --keep


def test_growth_is_time_ratio_over_work_ratio():
    bench = _bench()
    rows = [{"fraction": 0.1, "stage": "score", "work": 100, "wall_s": 10.0},
            {"fraction": 1.0, "stage": "score", "work": 1000, "wall_s": 50.0},
            {"fraction": 0.01, "stage": "score", "work": 10, "wall_s": 9.0}]
    assert bench.growth(rows, [0.01, 0.1, 1.0]) == {"score": 0.5}
    assert bench.growth(rows, [1.0]) == {}


def test_sampler_reads_this_process():
    bench = _bench()
    assert bench._uss(os.getpid()) > 10 * 2**20
    s = bench.Sampler(0.05)
    s.begin_stage()
    sum(i * i for i in range(300_000))
    p = s.end_stage()
    assert p.driver_uss > 0 and p.cpu_s > 0


@pytest.mark.bench
def test_score_and_train_stages(tmp_path):
    result, last = _run(tmp_path, "--fractions", "0.0001", "--stages", "sample,prepare,score,train",
                        "--train-steps", "5", timeout=1200)
    rows = {r["stage"]: r for r in result["rows"]}
    assert rows["score"]["work"] == rows["score"]["notes"]["triples"] > 0
    assert rows["train"]["work"] == 5 * 32 * 2
    assert rows["score"]["worker_peak_gb"] > 0 and rows["train"]["worker_peak_gb"] > 0
    assert LAST_LINE.match(last) and last.endswith("growth=na")


RETRIEVAL = ("index", "search_dense", "search_bm25", "search_rerank", "search_hybrid", "evaluate")


@pytest.mark.bench
def test_retrieval_stages(tmp_path):
    """index -> dense, BM25, re-rank, hybrid search -> evaluate at 1/10,000: 884 passages, 1 dev query."""
    result, last = _run(tmp_path, "--fractions", "0.0001", "--stages", ",".join(("sample", "prepare", *RETRIEVAL)),
                        "--tune-queries", "5", "--keep", timeout=1500)
    rows = {r["stage"]: r for r in result["rows"]}
    assert set(RETRIEVAL) <= set(rows)
    for name in RETRIEVAL:
        assert rows[name]["work"] > 0 and rows[name]["wall_s"] > 0, rows[name]
    assert rows["index"]["work"] == rows["index"]["notes"]["passages"] == 884
    assert rows["index"]["notes"]["driver_bytes"] > 0 and rows["index"]["worker_peak_gb"] > 0
    assert rows["search_rerank"]["notes"]["k"] == 20
    assert rows["search_hybrid"]["notes"]["tune_queries"] == 5
    assert set(rows["evaluate"]["notes"]) == {"dense", "bm25", "rerank", "hybrid"}
    assert rows["evaluate"]["work"] == sum(n["queries"] for n in rows["evaluate"]["notes"].values())
    assert LAST_LINE.match(last) and last.endswith("growth=na")


def test_a_stage_without_its_input_names_the_stage_to_run(tmp_path):
    bench = _bench()
    args = bench.argparse.Namespace(root=str(tmp_path), search_k=10, rerank_k=5, torch_threads=1)
    r = bench.Rehearsal(0.001, str(tmp_path / "f0.001"), args)
    with pytest.raises(SystemExit, match="run the index stage first"):
        bench.run_search_dense(r)
    with pytest.raises(SystemExit, match="run the search_bm25 stage first"):
        bench.run_search_rerank(r)
    with pytest.raises(SystemExit, match="holds no run: run a search stage first"):
        bench.run_evaluate(r)
