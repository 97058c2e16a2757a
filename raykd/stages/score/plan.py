"""Plan: the training triples split into output parts by a hash of the qid, checked, deduplicated, in Ray tasks.

No process holds the whole triple set. Two rounds of Ray tasks:

1. **bucket**, one task per triples part of the store (``prepare`` writes them ``part_rows`` rows each): its
   rows get their global input row number, unknown qids/pids are found (searchsorted against the sorted pid
   and qid columns, shared once through the object store), and its good rows are written to one bucket file per
   output part, ``_work/buckets/part-PPPPP/in-IIIII.parquet``. Lenient mode quarantines the bad rows
   (``quarantine/unknown-ids-IIIII.parquet``); strict mode writes nothing from a part with a bad row and the
   driver fails naming the first bad row of the whole input.
2. **merge**, a few tasks (as many as the cluster has CPUs) of several output parts each: a part's buckets -> sorted by (qid, pos_pid, neg_pid), the first input row
   of each duplicate kept -> ``_work/triples/part-PPPPP.parquet`` (qid, pos_pid, neg_pid, row) and the part's
   unique (qid, pid) pairs ``_work/pairs/part-PPPPP.parquet`` (part, qid, pid), which the pipeline reads.

Then the driver writes ``_work/plan.json`` (the commit point of the plan) and removes the buckets. Every file is
written atomically and depends only on the input and ``rows_per_part``, so a plan killed midway is redone
from the start with the same names and contents. What the driver holds is the sorted pid column of the
corpus (8 bytes a passage: 71 MB for MS MARCO) and the split's qids, which it puts in the object store.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd import storage
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.formats.store import TextStore
from raykd.log import get_logger

_HASH = np.uint64(0x9E3779B97F4A7C15)
PAIRS_ROW_GROUP = 1024  # rows per Parquet row group of a pairs file: the pipeline reads its chunks by row group
log = get_logger("score")


def part_of(qid: np.ndarray, n_parts: int) -> np.ndarray:
    """Deterministic output part of each qid (a multiplicative hash, the same on every run and machine)."""
    h = (np.asarray(qid, dtype=np.int64).view(np.uint64) * _HASH) >> np.uint64(17)
    return (h % np.uint64(n_parts)).astype(np.int64)


def partition_unique(keys: Sequence[np.ndarray], part: np.ndarray | None = None, n_parts: int = 1,
                     first_by: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The one partition + sort + deduplication of the score stage. Returns ``(index, bounds)``: the row
    indices ordered by (``part``, ``keys``..., ``first_by``) with only the first row of each run of equal
    (part, keys) kept (so the smallest ``first_by`` wins), and ``bounds`` such that part p's rows are
    ``index[bounds[p]:bounds[p + 1]]`` (without ``part``: one part)."""
    n = len(keys[0])
    lead = [part] if part is not None else []
    columns = list(reversed([*lead, *keys])) if first_by is None else [first_by, *reversed([*lead, *keys])]
    order = np.lexsort(columns) if n else np.zeros(0, dtype=np.int64)
    first = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in [*lead, *keys]:
            s = np.asarray(k)[order]
            same &= s[1:] == s[:-1]
        first[1:] = ~same
    index = order[first]
    if part is None:
        return index, np.array([0, len(index)], dtype=np.int64)
    return index, np.searchsorted(np.asarray(part)[index], np.arange(n_parts + 1))


def unique_pairs(qid: np.ndarray, pos_pid: np.ndarray, neg_pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (qid, pid) pairs of some triples, sorted."""
    q = np.concatenate([qid, qid])
    p = np.concatenate([pos_pid, neg_pid])
    index, _ = partition_unique([q, p])
    return q[index], p[index]


def _isin_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(values), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return sorted_keys[i] == values


def bucket_input_part(out: str, index: int, uri: str, row0: int, n_parts: int, known_q: np.ndarray,
                      known_p: np.ndarray, lenient: bool, split: str) -> dict:
    """Task body of step 1 (module docstring) for the store's triples part ``uri`` whose first row is input row
    ``row0``. Returns its counts and its first bad row, if any."""
    with storage.open_read(uri) as f:
        t = pq.read_table(f, columns=list(fmt.KEY_COLUMNS))
    qid, pos, neg = (t[c].to_numpy() for c in fmt.KEY_COLUMNS)
    row = np.arange(row0, row0 + len(qid), dtype=np.int64)
    bad_q, bad_pos, bad_neg = ~_isin_sorted(qid, known_q), ~_isin_sorted(pos, known_p), ~_isin_sorted(neg, known_p)
    bad = bad_q | bad_pos | bad_neg
    n_bad = int(bad.sum())
    first_bad = None
    if n_bad:
        i = int(np.flatnonzero(bad)[0])
        what = (
            f"qid {qid[i]} is not in the store's `{split}` queries" if bad_q[i]
            else f"pos_pid {pos[i]} is not in the corpus" if bad_pos[i]
            else f"neg_pid {neg[i]} is not in the corpus"
        )
        first_bad = {"row": int(row[i]), "triple": [int(qid[i]), int(pos[i]), int(neg[i])], "what": what}
        if not lenient:
            return {"rows": len(qid), "good": 0, "bad": n_bad, "first_bad": first_bad, "parts": []}
        reasons = np.where(bad_q, "unknown qid", np.where(bad_pos, "unknown pos_pid", "unknown neg_pid"))
        q = pa.table({"qid": qid[bad], "pos_pid": pos[bad], "neg_pid": neg[bad], "row": row[bad],
                      "reason": reasons[bad]})
        storage.write_parquet_atomic(q.cast(fmt.QUARANTINE_SCHEMA),
                                     storage.join(out, "quarantine", f"unknown-ids-{index:05d}.parquet"))
        keep = ~bad
        qid, pos, neg, row = qid[keep], pos[keep], neg[keep], row[keep]
    part = part_of(qid, n_parts)
    order, bounds = partition_unique([qid, pos, neg], part, n_parts, first_by=row)
    parts = []
    for p in range(n_parts):
        sel = order[bounds[p]:bounds[p + 1]]
        if len(sel) == 0:
            continue
        table = pa.table({"qid": qid[sel], "pos_pid": pos[sel], "neg_pid": neg[sel], "row": row[sel]})
        storage.write_parquet_atomic(table, _bucket_uri(out, p, index))
        parts.append(p)
    return {"rows": int(len(t)), "good": int(len(qid)), "bad": n_bad, "first_bad": first_bad, "parts": parts}


def _bucket_uri(out: str, p: int, index: int) -> str:
    return storage.join(out, "_work", "buckets", fmt.part_name(p).removesuffix(".parquet"), f"in-{index:05d}.parquet")


def triples_uri(out: str, p: int) -> str:
    """One output part's planned triples (qid, pos_pid, neg_pid, row), sorted and unique."""
    return storage.join(out, "_work", "triples", fmt.part_name(p))


def pairs_uri(out: str, p: int) -> str:
    """One output part's unique (qid, pid) pairs, with its ``part`` number: the pipeline's input."""
    return storage.join(out, "_work", "pairs", fmt.part_name(p))


def merge_parts(out: str, parts: list[int]) -> list[dict]:
    """Task body of step 2 (module docstring): the buckets of each output part in ``parts`` -> its triples
    and pairs, one part at a time."""
    return [_merge_part(out, p) for p in parts]


def _merge_part(out: str, p: int) -> dict:
    t = storage.read_parquet(storage.join(out, "_work", "buckets", fmt.part_name(p).removesuffix(".parquet")))
    qid, pos, neg, row = (t[c].to_numpy() for c in ("qid", "pos_pid", "neg_pid", "row"))
    index, _ = partition_unique([qid, pos, neg], first_by=row)
    qid, pos, neg, row = qid[index], pos[index], neg[index], row[index]
    storage.write_parquet_atomic(pa.table({"qid": qid, "pos_pid": pos, "neg_pid": neg, "row": row}),
                                 triples_uri(out, p))
    pair_q, pair_p = unique_pairs(qid, pos, neg)
    buf = io.BytesIO()
    pq.write_table(pa.table({"part": np.full(len(pair_q), p, dtype=np.int32), "qid": pair_q, "pid": pair_p}), buf,
                   row_group_size=PAIRS_ROW_GROUP, compression="zstd")
    storage.write_bytes_atomic(pairs_uri(out, p), buf.getvalue())
    return {"part": p, "triples": int(len(qid)), "pairs": int(len(pair_q))}


def read_pair_chunk(out: str, p: int, start: int, stop: int) -> pa.Table:
    """Rows ``start:stop`` of part ``p``'s pairs, reading only the row groups that hold them."""
    first, last = start // PAIRS_ROW_GROUP, -(-stop // PAIRS_ROW_GROUP)
    with storage.open_read(pairs_uri(out, p)) as f:
        t = pq.ParquetFile(f).read_row_groups(list(range(first, last)))
    return t.slice(start - first * PAIRS_ROW_GROUP, stop - start)


def _row_counts(uris: list[str]) -> list[int]:
    counts = []
    for u in uris:
        with storage.open_read(u) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return counts


def make_plan(out: str, store: TextStore, split: str, rows_per_part: int, lenient: bool,
              cpus_per_task: float) -> dict:
    """Steps 1 and 2 (module docstring), then ``_work/plan.json``; returns the plan."""
    import ray

    t0 = time.time()
    inputs = storage.parquet_parts(store.triples_uri) if store.has_triples() else []
    if not inputs:
        raise UserError(
            f"{store.triples_uri}: the store has no training triples (0 rows); `raykd score` needs them "
            "(prepare the store from a folder with qidpidtriples/triples files, or pass --triples)"
        )
    counts = _row_counts(inputs)
    n_in = sum(counts)
    if n_in == 0:
        raise UserError(f"{store.triples_uri}: the triples file is empty (0 rows); nothing to score")
    # the number of parts comes from the input's row count, known before any row is read
    n_parts = max(1, -(-n_in // max(1, rows_per_part)))
    known_q = ray.put(np.sort(store.queries(split)["qid"].to_numpy()))
    known_p = ray.put(np.sort(storage.read_parquet(store.corpus_uri, columns=["pid"])["pid"].to_numpy()))
    bucket = ray.remote(bucket_input_part).options(num_cpus=cpus_per_task)
    row0 = np.concatenate([[0], np.cumsum(counts)[:-1]])
    results = ray.get([bucket.remote(out, i, u, int(r), n_parts, known_q, known_p, lenient, split)
                       for i, (u, r) in enumerate(zip(inputs, row0))])
    n_bad = sum(r["bad"] for r in results)
    if n_bad:
        first = min((r["first_bad"] for r in results if r["first_bad"]), key=lambda b: b["row"])
        q, p, n = first["triple"]
        if not lenient:
            _remove(storage.join(out, "_work"))  # nothing to resume: a re-run (say with --lenient) starts afresh
            raise UserError(
                f"{store.triples_uri}, row {first['row']} (triple {q}, {p}, {n}): {first['what']}; "
                f"{n_bad} triple(s) have unknown ids. Fix the input or pass --lenient to quarantine them."
            )
        log.info(f"quarantined {n_bad} triple(s) with unknown ids (first: row {first['row']}, {first['what']})")
    parts = sorted({p for r in results for p in r["parts"]})
    if not parts:
        _remove(storage.join(out, "_work"))
        raise UserError(f"{store.triples_uri}: no triple left to score after quarantining {n_bad} bad one(s)")
    # a few tasks of several parts each: as many as the cluster has CPUs now, not one worker per part
    n_tasks = max(1, min(len(parts), int(ray.available_resources().get("CPU", 1))))
    merge = ray.remote(merge_parts).options(num_cpus=cpus_per_task)
    merged = [m for ms in ray.get([merge.remote(out, parts[i::n_tasks]) for i in range(n_tasks)]) for m in ms]
    n_triples = sum(m["triples"] for m in merged)
    n_good = sum(r["good"] for r in results)
    plan = {
        "n_parts": n_parts,
        "parts": parts,
        "part_pairs": {str(m["part"]): m["pairs"] for m in merged},
        "triples_in": n_in,
        "triples": n_triples,
        "duplicate_triples": n_good - n_triples,
        "quarantined_unknown_ids": n_bad,
        "plan_s": round(time.time() - t0, 3),
    }
    storage.write_bytes_atomic(storage.join(out, "_work", "plan.json"), json.dumps(plan, indent=2).encode())
    _remove(storage.join(out, "_work", "buckets"))
    log.info(f"plan: {n_in} triples in, {n_triples} to score ({plan['duplicate_triples']} duplicates, {n_bad} "
             f"unknown ids) in {len(parts)} part(s), {sum(plan['part_pairs'].values())} unique pairs")
    return plan


def read_plan(out: str) -> dict[str, Any] | None:
    uri = storage.join(out, "_work", "plan.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _remove(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
