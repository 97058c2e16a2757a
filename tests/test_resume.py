"""One finished-output contract for every stage (:mod:`raykd.finished`).

A re-run into the same output with the same settings returns the finished output (nothing recomputed) or resumes
an unfinished one (committed parts kept); one changed setting is refused with a message naming the field and both
values; ``overwrite=True`` replaces the output. Unit tests on a local folder and on moto S3, then every stage
called directly with its config dataclass, on tiny models and the small embedded sample."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from train_support import write_scores

from raykd import finished, storage
from raykd.config import field
from raykd.errors import UserError
from raykd.finished import State


def _manifest_bytes(out: str) -> bytes:
    return storage.read_bytes(storage.join(out, storage.MANIFEST))


def _mtimes(folder: str) -> dict:
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
            if f != finished.STARTED}


# ------------------------------------------------------------------------------------------- the contract


@dataclasses.dataclass
class _Cfg:
    out: str = field("", help="Output.", fingerprint=False)
    lr: float = field(7e-6, help="Learning rate.")
    steps: int = field(10, help="Steps.")
    workers: int = field(2, help="Workers.", fingerprint=False)


def _contract(out: str) -> None:
    fp = finished.fingerprint(_Cfg(out=out))
    assert fp == {"lr": 7e-6, "steps": 10}  # out and workers are declared fingerprint=False

    assert finished.claim(out, "train", fp).state is State.FRESH
    storage.write_bytes_atomic(storage.join(out, "part-0.txt"), b"x")
    assert finished.claim(out, "train", fp).state is State.RESUME  # started marker, same fingerprint
    other = finished.fingerprint(_Cfg(out=out, lr=1e-3, workers=8))
    with pytest.raises(UserError) as e:  # an unfinished run is protected too
        finished.claim(out, "train", other)
    assert f"lr: 7e-06 (in {storage.join(out, finished.STARTED)}) != 0.001 (now)" in str(e.value)
    assert "steps" not in str(e.value) and "--overwrite" in str(e.value) and "another --out" in str(e.value)

    storage.write_manifest(out, "train", format="t", fingerprint=fp)
    c = finished.claim(out, "train", finished.fingerprint(_Cfg(out=out, workers=8)))
    assert c.state is State.FINISHED and c.manifest.fingerprint == fp and c.manifest.stage == "train"
    with pytest.raises(UserError) as e:
        finished.claim(out, "train", finished.fingerprint(_Cfg(out=out, lr=1e-3, steps=20)))
    msg = str(e.value)
    assert f"lr: 7e-06 (in {storage.join(out, storage.MANIFEST)}) != 0.001 (now)" in msg
    assert "steps: 10 (in" in msg and "!= 20 (now)" in msg
    with pytest.raises(UserError, match=r"stage: \"train\" \(in .*\) != \"index\" \(now\)"):
        finished.claim(out, "index", fp)

    c = finished.claim(out, "train", other, overwrite=True)
    assert c.state is State.FRESH and storage.listdir(out) == [finished.STARTED]
    # a run that failed before committing anything leaves only its marker: another fingerprint may start there
    assert finished.claim(out, "train", fp).state is State.FRESH


def test_contract_on_a_local_folder(tmp_path):
    _contract(str(tmp_path / "out"))
    # a folder that is not a raykd output is neither written into nor deleted, even with overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    fp = finished.fingerprint(_Cfg())
    for overwrite in (False, True):
        with pytest.raises(UserError, match="no raykd output"):
            finished.claim(str(mine), "train", fp, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"
    # a manifest from before fingerprints were recorded cannot be checked: refused, --overwrite replaces it
    old = str(tmp_path / "old")
    storage.write_manifest(old, "train", format="t")
    with pytest.raises(UserError, match="records no fingerprint"):
        finished.claim(old, "train", fp)
    assert finished.claim(old, "train", fp, overwrite=True).state is State.FRESH


def test_contract_on_s3_and_overwrite_stays_under_its_prefix(s3_server, s3_uri):
    out = storage.join(s3_uri, "out")
    sibling = storage.join(s3_uri, "out-2")  # shares the key prefix "out" but is another output
    storage.write_bytes_atomic(storage.join(sibling, "keep.txt"), b"keep")
    _contract(out)
    storage.write_bytes_atomic(storage.join(out, "nested", "deep.txt"), b"x")
    assert finished.claim(out, "train", finished.fingerprint(_Cfg()), overwrite=True).state is State.FRESH
    assert storage.read_bytes(storage.join(sibling, "keep.txt")) == b"keep"
    assert not storage.exists(storage.join(out, "nested", "deep.txt"))


# ------------------------------------------------------------------------------------------- prepare


def test_prepare(sample_raw, tmp_path):
    from raykd.stages.prepare import PrepareConfig, prepare

    out = str(tmp_path / "store")
    cfg = PrepareConfig(msmarco=sample_raw, out=out, part_rows=5000)
    m = prepare(cfg)
    assert m.fingerprint["part_rows"] == 5000 and "out" not in m.fingerprint and "overwrite" not in m.fingerprint
    before, mtimes = _manifest_bytes(out), _mtimes(out)
    assert prepare(cfg).created_at == m.created_at
    assert _manifest_bytes(out) == before and _mtimes(out) == mtimes  # nothing recomputed
    with pytest.raises(UserError, match=r"part_rows: 5000 \(in .*manifest.json\) != 4000 \(now\)"):
        prepare(dataclasses.replace(cfg, part_rows=4000))
    # unfinished (manifest gone): resumes, committed parts are skipped
    os.remove(os.path.join(out, storage.MANIFEST))
    again = prepare(cfg)
    assert again.counts["corpus_parts_resumed"] == 1 and again.counts["triples_parts_resumed"] == 1
    os.remove(os.path.join(out, storage.MANIFEST))
    with pytest.raises(UserError, match=r"lenient: false \(in .*_started.json\) != true \(now\)"):
        prepare(dataclasses.replace(cfg, lenient=True))
    m2 = prepare(dataclasses.replace(cfg, part_rows=4000, overwrite=True))
    assert m2.fingerprint["part_rows"] == 4000 and m2.counts.get("corpus_parts_resumed") == 0


# ------------------------------------------------------------------------------------------- score, import-nrkd


def test_score_and_import_nrkd(ray_cluster, sample_store, tiny_models, tmp_path):
    from raykd.stages.score import ImportNrkdConfig, ScoreConfig, export_nrkd, import_nrkd, score

    out = str(tmp_path / "scores")
    cfg = ScoreConfig(data=sample_store, teachers=[tiny_models("bert", "cross_encoder", seed=11)], out=out,
                      rows_per_part=500, bucket_pairs=256, max_actors=1, query_max_length=16, passage_max_length=48)
    m = score(cfg)
    assert m.fingerprint["data.created_at"] == storage.read_manifest(sample_store)["created_at"]
    before, mtimes = _manifest_bytes(out), _mtimes(out)
    assert score(dataclasses.replace(cfg, batch_size=7, max_actors=2)).created_at == m.created_at  # no-result fields
    assert _manifest_bytes(out) == before and _mtimes(out) == mtimes
    with pytest.raises(UserError, match=r"passage_max_length: 48 \(in .*manifest.json\) != 64 \(now\)"):
        score(dataclasses.replace(cfg, passage_max_length=64))
    # unfinished: the committed parts are kept (their files untouched), the manifest rewritten
    os.remove(os.path.join(out, storage.MANIFEST))
    parts = {p: t for p, t in mtimes.items() if "/parts/" in p}
    again = score(cfg)
    assert again.counts == m.counts and {p: os.path.getmtime(p) for p in parts} == parts
    with pytest.raises(UserError, match=r"weights: \[1.0\] \(in .*\) != \[2.0\] \(now\)"):
        score(dataclasses.replace(cfg, weights=[2.0]))

    tsv = str(tmp_path / "t.tsv")
    export_nrkd(out, tsv)
    nout = str(tmp_path / "nrkd")
    icfg = ImportNrkdConfig(nrkd=tsv, out=nout, teacher_name="t2")
    im = import_nrkd(icfg)
    assert import_nrkd(icfg).created_at == im.created_at
    with pytest.raises(UserError, match=r'teacher_name: "t2" \(in .*\) != "t3" \(now\)'):
        import_nrkd(dataclasses.replace(icfg, teacher_name="t3"))
    assert import_nrkd(dataclasses.replace(icfg, teacher_name="t3", overwrite=True)).stats["teachers"] == ["t3"]


# ------------------------------------------------------------------------------------------- train


def test_train_with_another_lr_is_refused_not_returned(ray_cluster, sample_store, tiny_models, tmp_path):
    from raykd.stages.train import TrainConfig, train

    scores = write_scores(sample_store, str(tmp_path / "scores"))
    out = str(tmp_path / "student")
    cfg = TrainConfig(data=sample_store, scores=scores, student="bert_dot", init=tiny_models("bert", "encoder"),
                      out=out, workers=1, batch_size=8, steps=2, lr=7e-6, checkpoint_every=2, val_queries=0)
    m = train(cfg)
    assert m.fingerprint["lr"] == 7e-6 and "workers" in m.fingerprint and "log_every" not in m.fingerprint
    before, mtimes = _manifest_bytes(out), _mtimes(out)
    assert train(dataclasses.replace(cfg, log_every=1, max_failures=0)).created_at == m.created_at
    assert _manifest_bytes(out) == before and _mtimes(out) == mtimes  # the finished model, nothing retrained
    with pytest.raises(UserError) as e:
        train(dataclasses.replace(cfg, lr=1e-3))
    assert f"lr: 7e-06 (in {storage.join(out, storage.MANIFEST)}) != 0.001 (now)" in str(e.value)
    assert "--overwrite" in str(e.value)
    m2 = train(dataclasses.replace(cfg, lr=1e-3, overwrite=True))
    assert m2.fingerprint["lr"] == 1e-3 and m2.created_at != m.created_at
    assert storage.read_manifest(out)["config"]["lr"] == 1e-3


# ------------------------------------------------------------------------------------------- index


def test_index(ray_cluster, sample_store, tiny_models, tmp_path):
    from raykd.stages.index import IndexConfig, index

    out = str(tmp_path / "idx")
    cfg = IndexConfig(data=sample_store, encoder=tiny_models("bert", "encoder", seed=3), shards=2, out=out,
                      chunk_rows=256)
    m = index(cfg)
    assert m.fingerprint["pooling"] == "cls" and m.fingerprint["shards"] == 2  # resolved from the checkpoint
    before, mtimes = _manifest_bytes(out), _mtimes(out)
    # an explicit value equal to the resolved default, and other actor counts: the same fingerprint
    assert index(dataclasses.replace(cfg, pooling="cls", actors=2, batch_size=4)).created_at == m.created_at
    assert _manifest_bytes(out) == before and _mtimes(out) == mtimes
    with pytest.raises(UserError, match=r"shards: 2 \(in .*manifest.json\) != 3 \(now\)"):
        index(dataclasses.replace(cfg, shards=3))
    with pytest.raises(UserError, match=r'precision: "auto" \(in .*\) != "fp32" \(now\)'):
        index(dataclasses.replace(cfg, precision="fp32"))
    os.remove(os.path.join(out, storage.MANIFEST))  # unfinished: every shard's vectors are kept
    again = index(cfg)
    assert again.stats["resumed_shards"] == 2 and "encode_seconds" not in again.stats


# ------------------------------------------------------------------------------------------- search, evaluate


def test_search_and_evaluate(sample_store, tmp_path):
    from raykd.stages.evaluate import EvaluateConfig, evaluate
    from raykd.stages.search import SearchConfig, search

    out = str(tmp_path / "bm25")
    cfg = SearchConfig(data=sample_store, bm25=True, split="dev", k=10, out=out)
    m = search(cfg)
    before, mtimes = _manifest_bytes(out), _mtimes(out)
    assert search(dataclasses.replace(cfg, batch_size=3)).created_at == m.created_at
    assert _manifest_bytes(out) == before and _mtimes(out) == mtimes
    with pytest.raises(UserError, match=r"k: 10 \(in .*manifest.json\) != 20 \(now\)"):
        search(dataclasses.replace(cfg, k=20))
    assert search(dataclasses.replace(cfg, k=20, overwrite=True)).counts["k"] == 20

    ev_out = str(tmp_path / "eval")
    ecfg = EvaluateConfig(run=[out], data=sample_store, split="dev", metrics=["MRR@10"], out=ev_out)
    results = evaluate(ecfg)
    before, mtimes = _manifest_bytes(ev_out), _mtimes(ev_out)
    assert evaluate(ecfg) == json.loads(json.dumps(results))
    assert _manifest_bytes(ev_out) == before and _mtimes(ev_out) == mtimes
    with pytest.raises(UserError, match=r'metrics: \["MRR@10"\] \(in .*\) != \["nDCG@10"\] \(now\)'):
        evaluate(dataclasses.replace(ecfg, metrics=["nDCG@10"]))
    # the run it read was made again (k=20 above, now k=10): another input, refused
    search(dataclasses.replace(cfg, overwrite=True))
    with pytest.raises(UserError, match=r"run.created_at"):
        evaluate(ecfg)
    assert "nDCG@10" in evaluate(dataclasses.replace(ecfg, metrics=["nDCG@10"], overwrite=True))[os.path.basename(out)]["mean"]
