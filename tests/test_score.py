"""The score stage on a real local Ray cluster with tiny real teachers: exactly once, resumable, S3, bad input,
NRKD round trip, killed actors and drivers, and `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd import storage
from raykd.errors import UserError
from raykd.formats.scores import TripleScores
from raykd.formats.store import TextStore
from raykd.stages.score import (
    ImportNrkdConfig,
    ScoreConfig,
    export_nrkd,
    import_nrkd,
    partition_unique,
    score,
)

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["qid", "pos_pid", "neg_pid"]
SMALL = {"rows_per_part": 250, "bucket_pairs": 128, "batch_size": 32, "max_actors": 1}


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by([(k, "ascending") for k in KEYS])


def _input_triples(store: str) -> pa.Table:
    return TextStore(store).triples().select(KEYS)


@pytest.fixture(scope="module")
def teachers(tiny_models):
    return [tiny_models("bert", "cross_encoder", seed=11), tiny_models("albert", "cross_encoder", seed=12)]


@pytest.fixture(scope="module")
def baseline(ray_cluster, sample_store, teachers, tmp_path_factory):
    """An uninterrupted two-teacher run (weights 1 and 3) that the other tests compare against."""
    out = str(tmp_path_factory.mktemp("score-base") / "scores")
    cfg = ScoreConfig(data=sample_store, teachers=teachers, out=out, weights=[1.0, 3.0], **SMALL)
    manifest = score(cfg)
    return cfg, manifest, TripleScores(out)


def test_every_triple_once_with_weighted_ensemble(baseline, sample_store, teachers):
    cfg, m, s = baseline
    t = s.table()
    inp = _input_triples(sample_store)
    unique_in = inp.group_by(KEYS).aggregate([])
    assert t.num_rows == unique_in.num_rows == m.counts["triples"] == len(s)
    assert m.counts["duplicate_triples"] == inp.num_rows - unique_in.num_rows
    assert t.group_by(KEYS).aggregate([]).num_rows == t.num_rows  # unique keys
    assert _sorted(t.select(KEYS)).equals(_sorted(unique_in))  # none missing, none invented
    a, b = s.teachers
    for side in ("pos", "neg"):
        expect = (t[f"{side}_score__{a}"].to_numpy() + 3 * t[f"{side}_score__{b}"].to_numpy()) / 4
        np.testing.assert_allclose(t[f"{side}_score"].to_numpy(), expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t["margin"].to_numpy(), t["pos_score"].to_numpy() - t["neg_score"].to_numpy())


def test_each_unique_pair_scored_once_and_tokens_counted(baseline, sample_store, teachers):
    from raykd.models.cross_encoder import CrossEncoderTokenizer

    cfg, m, s = baseline
    t = s.table(KEYS)
    pairs = pa.concat_tables([
        pa.table({"qid": t["qid"], "pid": t["pos_pid"]}), pa.table({"qid": t["qid"], "pid": t["neg_pid"]})
    ]).group_by(["qid", "pid"]).aggregate([])
    n_pairs = pairs.num_rows
    assert n_pairs < 2 * t.num_rows * 0.7  # MS MARCO-like repetition of (query, positive)
    assert m.stats["forward_passes"] == {n: n_pairs for n in s.teachers}
    assert m.stats["naive_forward_passes"] == 2 * t.num_rows * len(teachers)
    store = TextStore(sample_store)
    qtext = dict(zip(store.queries("train")["qid"].to_pylist(), store.queries("train")["text"].to_pylist()))
    qs = [qtext[q] for q in pairs["qid"].to_pylist()]
    ps = store.passages(pairs["pid"].to_numpy())
    for name, path in zip(s.teachers, teachers):
        tok = CrossEncoderTokenizer.from_pretrained(path)
        real = sum(len(x) for x in tok.tokenize_unpadded(qs, ps)["input_ids"])
        assert m.stats["real_tokens"][name] == real
        assert real <= m.stats["padded_tokens"][name] < 1.5 * real  # length-sorted buckets pad little


def test_pair_scores_equal_the_triples_scores(baseline):
    """``pair_scores/`` holds each unique (qid, pid) once, per teacher and ensemble, and every triple's pos and
    neg scores are those of its pairs (issue 14: groups of any size train on them without scoring again)."""
    from raykd.formats.pair_scores import read_pair_scores

    cfg, m, s = baseline
    pairs = storage.read_parquet(storage.join(cfg.out, "pair_scores"))
    assert pairs.group_by(["qid", "pid"]).aggregate([]).num_rows == pairs.num_rows == m.counts["pair_scores"]
    assert m.counts["pair_scores"] == m.stats["unique_pairs"]
    t = s.table()
    a, b = s.teachers
    for side in ("pos", "neg"):
        j = t.select(["qid", f"{side}_pid", f"{side}_score", f"{side}_score__{a}", f"{side}_score__{b}"]).join(
            pairs.rename_columns([{"pid": f"{side}_pid"}.get(c, c) for c in pairs.column_names]),
            keys=["qid", f"{side}_pid"], join_type="left outer")
        assert j.num_rows == t.num_rows
        for mine, theirs in ((f"{side}_score", "score"), (f"{side}_score__{a}", f"score__{a}"),
                             (f"{side}_score__{b}", f"score__{b}")):
            np.testing.assert_array_equal(j[mine].to_numpy(), j[theirs].to_numpy())
    # the score output itself is a --pair-scores source; a teacher's column can be picked
    whole = read_pair_scores(cfg.out)
    assert whole.num_rows == pairs.num_rows
    one = read_pair_scores(cfg.out, column=f"score__{b}").sort_by([("qid", "ascending"), ("pid", "ascending")])
    np.testing.assert_allclose(one["score"].to_numpy(), pairs.sort_by(
        [("qid", "ascending"), ("pid", "ascending")])[f"score__{b}"].to_numpy(), rtol=1e-6)


def test_scores_equal_direct_model_scores(baseline, sample_store, teachers):
    """The join of texts and scores is right: a few triples re-scored directly with the teacher agree."""
    from raykd.models.cross_encoder import CrossEncoder

    cfg, m, s = baseline
    t = s.table().slice(0, 40)
    store = TextStore(sample_store)
    qtext = dict(zip(store.queries("train")["qid"].to_pylist(), store.queries("train")["text"].to_pylist()))
    qs = [qtext[q] for q in t["qid"].to_pylist()]
    for name, path in zip(s.teachers, teachers):
        model = CrossEncoder.from_pretrained(path)
        for side in ("pos", "neg"):
            direct = model.score(qs, store.passages(t[f"{side}_pid"].to_numpy())).numpy()
            np.testing.assert_allclose(t[f"{side}_score__{name}"].to_numpy(), direct, rtol=1e-4, atol=1e-5)


def test_analysis_and_manifest(baseline):
    cfg, m, s = baseline
    summary = json.loads(storage.read_bytes(storage.join(cfg.out, "analysis", "teacher_scores.json")))
    png = storage.read_bytes(storage.join(cfg.out, "analysis", "teacher_scores.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    t = s.table()
    for name in s.teachers:
        assert summary[name]["pos"]["count"] == t.num_rows
        assert summary[name]["all"]["max"] == pytest.approx(
            max(t[f"pos_score__{name}"].to_numpy().max(), t[f"neg_score__{name}"].to_numpy().max()))
    assert m.stats["score_summary"] == summary
    assert storage.read_manifest(cfg.out, stage="score")["counts"]["triples"] == t.num_rows


def test_rerun_is_a_noop_and_other_config_is_refused(baseline, teachers):
    cfg, m, s = baseline
    mtimes = {p: os.path.getmtime(p) for p in s.part_uris}
    again = score(cfg)
    assert again.counts == m.counts
    assert {p: os.path.getmtime(p) for p in s.part_uris} == mtimes
    other = ScoreConfig(**{**cfg.__dict__, "weights": [1.0, 1.0]})
    with pytest.raises(UserError, match=r"weights: \[1.0, 3.0\] \(in .*manifest.json\) != \[1.0, 1.0\] \(now\)"):
        score(other)


def test_export_import_nrkd_round_trip(baseline, tmp_path):
    cfg, m, s = baseline
    tsv = str(tmp_path / "t2.tsv.gz")
    assert export_nrkd(cfg.out, tsv) == len(s)
    im = import_nrkd(ImportNrkdConfig(nrkd=tsv, out=str(tmp_path / "imported"), rows_per_part=300))
    back = TripleScores(str(tmp_path / "imported"))
    assert im.stage == "import-nrkd" and back.teachers == ["t2"] and len(back) == len(s)
    cols = KEYS + ["pos_score", "neg_score", "margin"]
    assert _sorted(back.table(cols)).equals(_sorted(s.table(cols)))


def test_cli_export_import(baseline, tmp_path):
    from click.testing import CliRunner

    from raykd.cli import main

    cfg, m, s = baseline
    r = CliRunner().invoke(main, ["export-nrkd", "--scores", cfg.out, "--out", str(tmp_path / "x.tsv"),
                                  "--teacher", s.teachers[1]])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["import-nrkd", "--nrkd", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "i"),
                                  "--teacher-name", "albert"])
    assert r.exit_code == 0, r.output
    t = _sorted(TripleScores(str(tmp_path / "i")).table())
    np.testing.assert_array_equal(t["pos_score__albert"].to_numpy(),
                                  _sorted(s.table())[f"pos_score__{s.teachers[1]}"].to_numpy())


def _compare_teacher(out: str, baseline, teacher_index: int = 0) -> None:
    """``out`` (a one-teacher run) has exactly the baseline's triples and that teacher's scores."""
    _, _, s = baseline
    name = s.teachers[teacher_index]
    got, want = _sorted(TripleScores(out).table()), _sorted(s.table())
    assert got.select(KEYS).equals(want.select(KEYS))
    for side in ("pos", "neg"):
        np.testing.assert_allclose(got[f"{side}_score__{name}"].to_numpy(), want[f"{side}_score__{name}"].to_numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[f"{side}_score"].to_numpy(), want[f"{side}_score__{name}"].to_numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_s3_output(baseline, sample_store, teachers, s3_uri):
    out = f"{s3_uri}/scores"
    m = score(ScoreConfig(data=sample_store, teachers=[teachers[0]], out=out, **SMALL))
    assert storage.read_manifest(out, stage="score")["counts"]["triples"] == m.counts["triples"]
    assert storage.listdir(storage.join(out, "analysis")) == ["teacher_scores.json", "teacher_scores.png"]
    _compare_teacher(out, baseline)


def _model_loads(out: str) -> list[dict]:
    """The model-load records the scoring actors wrote (one per teacher per actor start), all runs."""
    return [json.loads(p.read_text()) for p in sorted(Path(out, "_work", "model_loads").glob("run-*/*.json"))]


def test_twenty_parts_stream_through_actors_that_load_each_teacher_once(baseline, sample_store, teachers, tmp_path):
    """All parts flow through one long-lived pool: each actor loads each teacher once, however many parts."""
    from ray._private import state

    def map_actors() -> dict:  # the scoring pools' actors of this session, as Ray's control store records them
        return {k: a for k, a in state.actors().items() if "EnsembleScorer" in a["ActorClassName"]}

    out = str(tmp_path / "scores")
    cfg = ScoreConfig(data=sample_store, teachers=teachers, out=out, weights=[1.0, 3.0],
                      **{**SMALL, "rows_per_part": 34, "bucket_pairs": 32, "min_actors": 2, "max_actors": 2})
    before = set(map_actors())
    m = score(cfg)
    started = [a for k, a in map_actors().items() if k not in before]
    plan = json.loads(Path(out, "_work", "plan.json").read_text())
    assert m.counts["parts"] == len(plan["parts"]) >= 20
    records = _model_loads(out)
    actors = {r["actor"] for r in records}
    # the actors Ray started for this run (restarts included) are the ones that recorded their loads; a fixed
    # pool, as one that grows near the end of a run may start an actor and stop it before it has loaded
    assert len(actors) == len(started) + sum(a["NumRestarts"] for a in started) == 2
    for name in m.stats["teachers"]:
        # each actor started loaded each teacher exactly once, whatever the number of parts
        assert sorted(r["actor"] for r in records if r["teacher"] == name) == sorted(actors)
    assert m.stats["model_loads"] == m.stats["model_loads_all_runs"] == {n: len(actors) for n in m.stats["teachers"]}
    t = TripleScores(out).table()
    assert t.group_by(KEYS).aggregate([]).num_rows == t.num_rows == len(baseline[2])  # every triple once
    got, want = _sorted(t), _sorted(baseline[2].table())
    assert got.select(KEYS).equals(want.select(KEYS))
    np.testing.assert_allclose(got["pos_score"].to_numpy(), want["pos_score"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert m.stats["forward_passes"] == baseline[1].stats["forward_passes"]  # each unique pair scored once


def test_partition_unique_keeps_the_first_row_of_each_key():
    qid = np.array([5, 3, 5, 3, 5, 9])
    pid = np.array([1, 2, 1, 2, 0, 9])
    row = np.array([4, 5, 2, 1, 0, 3])
    part = (qid > 4).astype(np.int64)
    index, bounds = partition_unique([qid, pid], part, 2, first_by=row)
    assert index.tolist() == [3, 4, 2, 5] and bounds.tolist() == [0, 1, 4]
    index, bounds = partition_unique([qid, pid])
    assert sorted(zip(qid[index], pid[index])) == [(3, 2), (5, 0), (5, 1), (9, 9)] and bounds.tolist() == [0, 4]


class _KillScorerOnce(threading.Thread):
    """Test side of the killed-actor test: once the run has loaded a teacher and committed a part, SIGKILL the
    scoring actor's process (its pid is in its model-load record), once."""

    def __init__(self, out: str):
        super().__init__(daemon=True)
        self.out, self.killed, self.stop = out, None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            records = _model_loads(self.out)
            if records and storage.parquet_parts(storage.join(self.out, "parts")):
                try:
                    os.kill(records[0]["pid"], signal.SIGKILL)
                    self.killed = records[0]["pid"]
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.05)


@pytest.mark.slow
def test_killed_scoring_actor_then_rerun_equals_uninterrupted(baseline, sample_store, teachers, tmp_path):
    # small blocks and one pair per forward pass: the run lasts long enough to be killed midway
    cfg = ScoreConfig(data=sample_store, teachers=[teachers[0]], out=str(tmp_path / "scores"),
                      **{**SMALL, "rows_per_part": 50, "bucket_pairs": 8, "batch_size": 1})
    killer = _KillScorerOnce(cfg.out)
    killer.start()
    try:
        score(cfg)  # Ray Data restarts the actor and retries its block
    except Exception as e:  # or gives up on the block; the re-run must then finish the job
        print(f"first run failed as the actor died: {type(e).__name__}")
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed and killer.killed != os.getpid(), "the run ended before its actor could be killed"
    parts_before = {p: os.path.getmtime(p) for p in storage.parquet_parts(storage.join(cfg.out, "parts"))}
    m = score(cfg)
    assert {p: os.path.getmtime(p) for p in parts_before} == parts_before  # committed parts never rewritten
    assert len(_model_loads(cfg.out)) >= 2  # the killed actor's load, and its replacement's
    assert sum(m.stats["model_loads_all_runs"].values()) == len(_model_loads(cfg.out))
    _compare_teacher(cfg.out, baseline)


@pytest.mark.slow
def test_killed_driver_then_rerun_equals_uninterrupted(baseline, sample_store, teachers, tmp_path, ray_cluster):
    out = tmp_path / "scores"
    flags = ["--data", sample_store, "--teacher", teachers[0], "--out", str(out), "--rows-per-part", "50",
             "--bucket-pairs", "8", "--batch-size", "1", "--max-actors", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "score_teachers.py"), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not storage.parquet_parts(str(out / "parts")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the driver finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = {p: os.path.getmtime(p) for p in storage.parquet_parts(str(out / "parts"))}
    assert committed and not storage.has_manifest(str(out))
    plan = json.loads((out / "_work" / "plan.json").read_text())
    assert len(committed) < len(plan["parts"])
    cfg = ScoreConfig(data=sample_store, teachers=[teachers[0]], out=str(out),
                      **{**SMALL, "rows_per_part": 50, "bucket_pairs": 8, "batch_size": 1})
    m = score(cfg)
    assert {p: os.path.getmtime(p) for p in committed} == committed  # committed parts were skipped
    assert m.counts["parts"] == len(plan["parts"])
    _compare_teacher(str(out), baseline)


# ----------------------------------------------------------------------------------------------- bad input


def _store_copy(sample_store: str, dst: Path, extra_triples: pa.Table | None = None, empty: bool = False) -> str:
    shutil.copytree(sample_store, dst)
    if empty:
        for p in (dst / "triples").glob("*.parquet"):
            pq.write_table(pq.read_table(p).slice(0, 0), p)
    if extra_triples is not None:
        pq.write_table(extra_triples, dst / "triples" / "part-99999.parquet")
    return str(dst)


def _bad_triples(store: str) -> pa.Table:
    t = TextStore(store).triples().slice(0, 3)
    return pa.table({"qid": [t["qid"][0].as_py(), 424242424], "pos_pid": [t["pos_pid"][0].as_py()] * 2,
                     "neg_pid": [999999999, t["neg_pid"][1].as_py()]}).cast(t.schema)


def test_unknown_ids_fail_strict_with_row(ray_cluster, sample_store, teachers, tmp_path):
    store = _store_copy(sample_store, tmp_path / "store", extra_triples=_bad_triples(sample_store))
    n = TextStore(store).triples().num_rows
    with pytest.raises(UserError, match=rf"row {n - 2} .*neg_pid 999999999 is not in the corpus.*2 triple"):
        score(ScoreConfig(data=store, teachers=[teachers[0]], out=str(tmp_path / "o")))
    assert not (tmp_path / "o" / "_work").exists()  # nothing planned: a re-run with --lenient starts afresh


def test_empty_triples_and_missing_teacher(sample_store, teachers, tmp_path):
    store = _store_copy(sample_store, tmp_path / "store", empty=True)
    with pytest.raises(UserError, match="empty"):
        score(ScoreConfig(data=store, teachers=[teachers[0]], out=str(tmp_path / "o1")))
    with pytest.raises(UserError, match="does not exist"):
        score(ScoreConfig(data=sample_store, teachers=[str(tmp_path / "no-teacher")], out=str(tmp_path / "o2")))
    with pytest.raises(UserError, match="2 weight"):
        score(ScoreConfig(data=sample_store, teachers=[teachers[0]], weights=[1, 2], out=str(tmp_path / "o3")))


def test_a_headless_checkpoint_is_refused_as_a_teacher(sample_store, teachers, tiny_models, tmp_path):
    headless = tiny_models("bert", "encoder", seed=5)
    with pytest.raises(UserError, match=rf"teacher {headless} has no trained scoring head: its weights lack "
                                        r"classifier\.weight, classifier\.bias"):
        score(ScoreConfig(data=sample_store, teachers=[teachers[0], headless], out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def nan_teacher(tiny_models, sample_store, tmp_path_factory):
    """A real tiny teacher whose embedding of one frequent passage word is NaN: pairs with that word score NaN."""
    from collections import Counter

    from raykd.models.cross_encoder import CrossEncoder

    m = CrossEncoder.from_pretrained(tiny_models("bert", "cross_encoder", seed=11))
    store = TextStore(sample_store)
    words = Counter(w for p in store.passages(store.corpus(["pid"])["pid"].to_numpy()[:200]) for w in set(p.split()))
    word = [w for w, c in words.most_common() if c < 25][0]  # in some passages, not most
    emb = m.model.get_input_embeddings().weight
    with __import__("torch").no_grad():
        emb[m.tokenizer.convert_tokens_to_ids(word)] = float("nan")
    out = str(tmp_path_factory.mktemp("nan-teacher") / "nan_teacher")
    m.save_pretrained(out)
    return out


def test_lenient_quarantines_unknown_ids_and_nan_scores(ray_cluster, sample_store, nan_teacher, tmp_path):
    store = _store_copy(sample_store, tmp_path / "store", extra_triples=_bad_triples(sample_store))
    out = str(tmp_path / "o")
    m = score(ScoreConfig(data=store, teachers=[nan_teacher], out=out, lenient=True, **SMALL))
    q = m.counts["quarantined"]
    assert q["unknown_ids"] == 2 and q["nan_scores"] > 0
    quarantine = storage.read_parquet(storage.join(out, "quarantine"))
    assert quarantine.num_rows == 2 + q["nan_scores"]
    unique_in = TextStore(store).triples().group_by(KEYS).aggregate([]).num_rows
    assert m.counts["triples"] + m.counts["quarantined_total"] == unique_in  # nothing silently lost
    t = TripleScores(out).table()
    assert np.isfinite(t["pos_score"].to_numpy()).all() and np.isfinite(t["neg_score"].to_numpy()).all()
    pairs = storage.read_parquet(storage.join(out, "pair_scores"))  # NaN pairs left out, the rest kept
    assert np.isfinite(pairs["score"].to_numpy()).all() and 0 < pairs.num_rows < m.stats["unique_pairs"]


def test_strict_nan_scores_fail_clearly(ray_cluster, sample_store, nan_teacher, tmp_path):
    with pytest.raises(UserError, match=r"gave a NaN/inf score for triple .*--lenient"):
        score(ScoreConfig(data=sample_store, teachers=[nan_teacher], out=str(tmp_path / "o"), **SMALL))


def test_normalized_run_with_nan_scores_strict_and_lenient(ray_cluster, sample_store, teachers, nan_teacher, tmp_path):
    """--normalization zscore: strict mode refuses a NaN in the first pass; lenient mode quarantines its triples
    and takes each teacher's statistics over the pairs every teacher scored finite (those pair_scores/ keeps)."""
    both = [teachers[0], nan_teacher]
    with pytest.raises(UserError, match=r"gave a NaN/inf score for triple .*--lenient"):
        score(ScoreConfig(data=sample_store, teachers=both, out=str(tmp_path / "s"), normalization="zscore", **SMALL))
    out = str(tmp_path / "l")
    m = score(ScoreConfig(data=sample_store, teachers=both, out=out, normalization="zscore", lenient=True, **SMALL))
    assert m.counts["quarantined"]["nan_scores"] > 0
    pairs = storage.read_parquet(storage.join(out, "pair_scores"))
    names = m.stats["teachers"]
    stats = m.stats["normalization"]["teachers"]
    expect = 0.0
    for n in names:
        raw = pairs[f"score__{n}"].to_numpy().astype(np.float64)
        assert stats[n]["count"] == pairs.num_rows < m.stats["unique_pairs"]
        assert stats[n]["mean"] == pytest.approx(raw.mean(), rel=1e-6) and stats[n]["std"] == pytest.approx(raw.std(), rel=1e-6)
        expect = expect + (raw - stats[n]["mean"]) / stats[n]["std"]
    np.testing.assert_allclose(pairs["score"].to_numpy(), expect / len(names), rtol=1e-5, atol=1e-5)
    t = TripleScores(out).table()
    assert np.isfinite(t["pos_score"].to_numpy()).all() and np.isfinite(t["neg_score"].to_numpy()).all()


# ----------------------------------------------------------------------------------------------- ray job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_default_sample(tmp_path):
    """`ray start --head`, then `ray job submit --working-dir . -- python jobs/score_teachers.py` without
    data/teacher arguments: it scores the embedded sample (made smaller here) with the default tiny ensemble,
    and the output is complete."""
    bindir = Path(sys.executable).parent
    port, dash, agent = _free_port(), _free_port(), _free_port()
    # the head (and so the job's `python`) must run this environment's interpreter, as a cluster's nodes do
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS")
    temp = f"/tmp/rk{os.getpid()}"  # ray's socket paths must stay short
    work = tmp_path / "work"
    start = subprocess.run(
        [str(bindir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         f"--temp-dir={temp}", "--include-dashboard=true", f"--dashboard-port={dash}",
         # its own agent port: the default (52365) is held by any other Ray instance on the machine, e.g. the
         # test session's cluster, and a head whose agent cannot bind accepts no jobs ("No available agent")
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        runtime_env = {"env_vars": {"RAYKD_SCORE_WORK": str(work), "HF_HUB_OFFLINE": "1"}}
        cmd = [str(bindir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
               "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/score_teachers.py",
               "--sample-train-queries", "30", "--sample-negatives", "20"]
        deadline = time.time() + 90
        while True:  # a fresh head's job agent can take a while to register ("No available agent")
            sub = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
            if sub.returncode == 0 or "No available agent" not in sub.stderr + sub.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-2000:]
        s = TripleScores(str(work / "scores"))
        store = TextStore(str(work / "store"))
        assert len(s) == store.triples().group_by(KEYS).aggregate([]).num_rows > 0
        assert s.teachers == ["tiny_bert_teacher", "tiny_albert_teacher"]
    finally:
        _stop_head(temp)


def _stop_head(temp: str) -> None:
    """Stop the head this test started, and only it: `ray stop` would stop every Ray on the machine (other
    test sessions' too), so end the processes whose command line names this head's temp dir, by pid."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if temp.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    shutil.rmtree(temp, ignore_errors=True)
