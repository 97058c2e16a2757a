"""raykd.texts: the id -> text lookup over pid-sorted Arrow blocks (no array over 2 GiB), on the real sample store,
on corpus parts in no pid order, and shared through a real local Ray cluster's object store."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd import texts
from raykd.formats.store import TextStore
from raykd.stages import shared_texts


def _naive(store_uri: str) -> dict[int, str]:
    t = TextStore(store_uri).corpus()
    return {p: (f"{ti} {te}" if ti else te) for p, ti, te in zip(t["pid"].to_pylist(), t["title"].to_pylist(),
                                                                 t["text"].to_pylist())}


def test_small_blocks_give_the_same_texts_as_a_dict(sample_store):
    want = _naive(sample_store)
    store = TextStore(sample_store)
    lookup = store.passage_lookup(max_block_bytes=4096)
    assert len(lookup.blocks) > 10 and len(lookup) == len(want)
    pids = list(want)
    random.Random(0).shuffle(pids)
    assert lookup.texts(pids) == [want[p] for p in pids]
    # every block boundary: the first and last pid of each block, and repeats in one batch
    edges = [int(b["id"][i].as_py()) for b in lookup.blocks for i in (0, -1)]
    assert lookup.texts(edges + edges[::-1]) == [want[p] for p in edges + edges[::-1]]
    assert store.passages(pids[:7]) == [want[p] for p in pids[:7]]


def test_no_block_exceeds_the_block_size(sample_store):
    lookup = TextStore(sample_store).passage_lookup(max_block_bytes=4096)
    for b in lookup.blocks:
        assert b["text"].num_chunks == 1 and b.nbytes <= 4096, b.nbytes
        keys = b["id"].to_numpy()
        assert np.all(keys[1:] > keys[:-1])
    his = [int(b["id"][-1].as_py()) for b in lookup.blocks]
    los = [int(b["id"][0].as_py()) for b in lookup.blocks]
    assert all(h < lo for h, lo in zip(his, los[1:]))  # ascending, non-overlapping: one searchsorted finds a block


def test_unknown_ids_name_the_id(sample_store):
    lookup = TextStore(sample_store).passage_lookup(max_block_bytes=4096)
    known = int(lookup.blocks[0]["id"][0].as_py())
    with pytest.raises(KeyError, match="pid 987654321 is not in the corpus of"):
        lookup.texts([known, 987654321])
    with pytest.raises(KeyError, match="pid -5 is not"):
        lookup.texts([-5])
    with pytest.raises(KeyError, match="qid 123456789 is not in split 'train'"):
        TextStore(sample_store).query_lookup("train").texts([123456789])


def test_only_the_asked_pids_are_kept(sample_store):
    want = _naive(sample_store)
    some = sorted(want)[::37]
    lookup = TextStore(sample_store).passage_lookup(pids=some + some[:3])
    assert len(lookup) == len(some) and lookup.texts(some) == [want[p] for p in some]


def _shuffled_parts(tmp_path, n: int = 500, parts: int = 4) -> tuple[list[str], dict[int, str]]:
    rng = random.Random(1)
    pids = list(range(0, 3 * n, 3))
    rng.shuffle(pids)
    want = {p: f"passage {p} " + "x" * rng.randrange(0, 200) for p in pids}
    uris = []
    for i in range(parts):
        chunk = pids[i::parts]
        t = pa.table({"pid": pa.array(chunk, pa.int64()), "title": [""] * len(chunk),
                      "text": [want[p] for p in chunk]})
        uris.append(str(tmp_path / f"part-{i:05d}.parquet"))
        pq.write_table(t, uris[-1], row_group_size=50)
    return uris, want


def test_a_collection_in_no_pid_order_is_merged_into_ascending_blocks(tmp_path):
    uris, want = _shuffled_parts(tmp_path)
    lookup = texts.passage_lookup(uris, max_block_bytes=2048)
    assert len(lookup) == len(want) and all(b.nbytes <= 2048 for b in lookup.blocks)
    pids = list(want)
    assert lookup.texts(pids) == [want[p] for p in pids]
    with pytest.raises(KeyError, match="pid 1 is not"):
        lookup.texts([1])


def test_duplicate_ids_are_refused():
    a = pa.table({"id": pa.array([1, 5], pa.int64()), "text": ["a", "b"]})
    b = pa.table({"id": pa.array([3, 5], pa.int64()), "text": ["c", "d"]})
    with pytest.raises(ValueError, match="id 5 appears twice"):
        texts.merge_blocks([a, b])


def test_shared_blocks_are_read_by_tasks(ray_cluster, sample_store, tmp_path):
    import ray

    @ray.remote
    def lookup_in_a_task(shared: shared_texts.SharedTexts, ids: list[int]) -> list[str]:
        return shared.lookup().texts(ids)

    want = _naive(sample_store)
    shared = shared_texts.share_passages(TextStore(sample_store).corpus_parts(), max_block_bytes=4096)
    assert len(shared.refs) > 10
    pids = sorted(want)[::-5]
    assert ray.get(lookup_in_a_task.remote(shared, pids)) == [want[p] for p in pids]
    # in no pid order: the per-part blocks overlap and are merged by one task
    uris, want2 = _shuffled_parts(tmp_path)
    shared2 = shared_texts.share_passages(uris, max_block_bytes=2048)
    ids = list(want2)[:100]
    assert ray.get(lookup_in_a_task.remote(shared2, ids)) == [want2[p] for p in ids]
