"""Training on mined groups of 1+k (``raykd train --groups``): the group data functions without Ray, then the
stage on real local Ray: BM25 on the sample's train queries -> ``raykd mine`` groups -> teacher pair scores (a
real lexical teacher over every mined pair) -> a tiny BERT_DOT trained with listwise KL on 2 workers."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from train_support import overlap_teacher

from raykd import storage
from raykd.errors import UserError
from raykd.formats.pair_scores import SCHEMA as PAIR_SCHEMA
from raykd.formats.store import TextStore
from raykd.stages.train import TrainConfig, train
from raykd.stages.train_groups import attach_teacher_scores, sample_negatives


def test_sample_negatives_keeps_k_in_run_order_seeded():
    lists = pa.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23], [30, 31, 32, 33, 34]], pa.list_(pa.int64()))
    a = sample_negatives(lists, 4, np.random.default_rng([1, 0]))
    assert a.shape == (3, 4)
    assert a[1].tolist() == [20, 21, 22, 23]  # exactly k: all of them
    for row, src in zip(a, lists.to_pylist()):
        assert set(row) <= set(src) and list(row) == sorted(row)  # a subset, in run order
    assert (sample_negatives(lists, 4, np.random.default_rng([1, 0])) == a).all()  # seeded
    draws = {tuple(sample_negatives(lists, 4, np.random.default_rng([1, e]))[0]) for e in range(20)}
    assert len(draws) > 3  # another draw each epoch


def test_teacher_scores_join_by_pair_and_a_missing_pair_is_named():
    scores = pa.table({"qid": [1, 1, 1, 2, 2], "pid": [5, 6, 7, 5, 8], "score": [3.0, 2.0, 1.0, 9.0, 8.0]})
    t = attach_teacher_scores(np.array([2, 1]), np.array([[5, 8], [7, 5]]), scores, "scores.parquet")
    assert t.tolist() == [[9.0, 8.0], [1.0, 3.0]] and t.dtype == np.float32
    with pytest.raises(UserError, match=r"scores.parquet: no teacher score for \(qid 2, pid 6\)"):
        attach_teacher_scores(np.array([2]), np.array([[5, 6]]), scores, "scores.parquet")


@pytest.fixture(scope="module")
def mined(ray_cluster, sample_store, tmp_path_factory) -> dict:
    from raykd.stages.mine import MineConfig, mine
    from raykd.stages.search import SearchConfig, search

    root = tmp_path_factory.mktemp("groups")
    run = str(root / "bm25-train")
    search(SearchConfig(data=sample_store, bm25=True, split="train", k=50, out=run))
    mine(MineConfig(data=sample_store, run=run, split="train", depth=50, skip=0, negatives=8, out="bm25-groups"))
    store = TextStore(sample_store)
    groups = store.groups("bm25-groups")
    q = store.queries("train")
    qtext = dict(zip(q["qid"].to_pylist(), q["text"].to_pylist()))
    pairs = sorted({(qd, p) for qd, pos, negs in zip(*(groups[c].to_pylist() for c in ("qid", "pos_pid", "neg_pids")))
                    for p in [pos, *negs]})
    texts = store.passages([p for _, p in pairs])
    table = pa.table({"qid": [a for a, _ in pairs], "pid": [b for _, b in pairs],
                      "score": [overlap_teacher(qtext[a], t) for (a, _), t in zip(pairs, texts)]}, schema=PAIR_SCHEMA)
    scores = str(root / "pair-scores.parquet")
    storage.write_parquet_atomic(table, scores)
    return {"root": root, "groups": groups, "scores": scores, "table": table}


def _cfg(sample_store, mined, init, out, **kw) -> TrainConfig:
    base = dict(data=sample_store, groups="bm25-groups", pair_scores=mined["scores"], group_size=4,
                student="bert_dot", student_options={"pooling": "mean"}, init=init, loss="listwise_kl", out=out,
                workers=2, batch_size=8, steps=30,
                lr=1e-3, checkpoint_every=30, log_every=5, val_queries=20, val_negatives=19)
    base.update(kw)
    return TrainConfig(**base)


def test_the_group_stream_gives_k_negatives_and_the_teachers_scores(mined, sample_store):
    from raykd.losses import get_loss
    from raykd.stages.train import _dataset

    cfg = _cfg(sample_store, mined, "unused", "unused")
    rows = _dataset(cfg, get_loss("listwise_kl"), None, passes=2).take_all()
    groups = mined["groups"]
    usable = [(q, p, set(n)) for q, p, n in zip(*(groups[c].to_pylist() for c in ("qid", "pos_pid", "neg_pids")))
              if len(n) >= 4]
    n = len(usable)
    assert len(rows) == 2 * n
    key = lambda r: (int(r["qid"]), int(r["pos_pid"]))  # noqa: E731
    assert Counter(key(r) for r in rows[:n]) == Counter((q, p) for q, p, _ in usable)  # an epoch: every group once
    negs = {(q, p): s for q, p, s in usable}
    pairs = {(a, b): s for a, b, s in zip(*(mined["table"][c].to_pylist() for c in ("qid", "pid", "score")))}
    store = TextStore(sample_store)
    for r in rows[:20]:
        ids = [int(x) for x in r["neg_pids"]]
        assert len(ids) == 4 and set(ids) <= negs[key(r)]
        assert list(r["negatives"]) == store.passages(ids)
        want = [pairs[(int(r["qid"]), pid)] for pid in [int(r["pos_pid"]), *ids]]
        assert np.allclose(r["teacher_scores"], want)


def test_listwise_kl_on_groups_with_two_workers_learns(mined, sample_store, tiny_models, tmp_path):
    out = str(tmp_path / "listwise")
    m = train(_cfg(sample_store, mined, tiny_models("bert", "encoder"), out))
    assert m.counts["steps"] == 30 and m.counts["short_groups"] + m.counts["usable_groups"] == m.counts["groups"]
    assert m.counts["scored_pairs"] > 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.mean(losses[-2:]) < losses[0], losses
    assert m.stats["val_mrr@10_final"] > m.stats["val_mrr@10_initial"], m.stats


def test_groups_refuse_a_pairwise_loss_and_an_unscored_pair(mined, sample_store, tiny_models, tmp_path):
    init = tiny_models("bert", "encoder")
    with pytest.raises(UserError, match="nway_margin_mse"):
        train(_cfg(sample_store, mined, init, str(tmp_path / "a"), loss="margin_mse"))
    with pytest.raises(UserError, match="--pair-scores"):
        train(_cfg(sample_store, mined, init, str(tmp_path / "b"), pair_scores=None))
    g = mined["groups"]
    i = next(i for i, n in enumerate(g["neg_pids"].to_pylist()) if len(n) >= 4)
    qid, pid = g["qid"][i].as_py(), g["pos_pid"][i].as_py()
    t = mined["table"]
    holey = str(tmp_path / "holey.parquet")
    keep = [not (a == qid and b == pid) for a, b in zip(t["qid"].to_pylist(), t["pid"].to_pylist())]
    storage.write_parquet_atomic(t.filter(pa.array(keep)), holey)
    with pytest.raises(UserError, match=rf"no teacher score for \(qid {qid}, pid {pid}\)"):
        train(_cfg(sample_store, mined, init, str(tmp_path / "c"), pair_scores=holey))
