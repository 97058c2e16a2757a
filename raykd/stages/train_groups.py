"""The group data of ``raykd train --groups``: each example is a query, its positive and k negatives (a group of
1+k, as ``raykd mine`` writes them, :mod:`raykd.formats.store`), with the teacher's scores of the 1+k pairs.

What the training stream does with a groups part (``groups/part-NNNNN.parquet``: ``qid, pos_pid, neg_pids``),
inside the read task of :func:`raykd.stages.train._read_part`, after the part's rows are put in the epoch's
seeded order (``epoch_order``, the same order triples get):

1. ``usable_groups``: groups with fewer than ``group_size`` negatives are left out (counted by
   :func:`group_parts`, which gives the stream each part's usable row count). Padding them would repeat a
   negative, which a listwise loss then weighs twice; a mined set rarely has many (``mine`` counts them too);
2. ``sample_negatives``: a group with more than k negatives keeps k of them, drawn with ``(seed, epoch, part)``
   (another draw each epoch), kept in run order (hardest first); a group with exactly k keeps all;
3. ``attach_teacher_scores`` (with ``pair_scores``): an Arrow join of the 1+k (qid, pid) pairs of every row with
   the teacher pair scores (:mod:`raykd.formats.pair_scores`), read for the part's qid range only;
   ``teacher_scores`` is a list of 1+k floats, the positive's first. A pair the scores do not cover is an error
   naming the qid, pid and file: :func:`check_pair_scores` checks every group on the driver before training
   starts, so a missing score never surfaces hours into a run.

Nothing here imports Ray: the functions take and return Arrow tables and numpy arrays.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd import storage
from raykd.errors import UserError
from raykd.formats.pair_scores import read_pair_scores
from raykd.formats.store import MINED_FORMAT, TextStore, is_set_name

COLUMNS = ["qid", "pos_pid", "neg_pids"]


def groups_uri(data: str, groups: str) -> str:
    """The ``groups/`` folder of a finished mined set: ``groups`` is a set name of the store ``data`` or the URI
    of a ``raykd mine`` output."""
    if is_set_name(groups) and "/" not in groups:
        try:
            return storage.join(TextStore(data).triples_set(groups), "groups")
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
    if not storage.has_manifest(groups):
        raise UserError(f"--groups {groups}: not a finished `raykd mine` output (no manifest.json) and not the "
                        f"name of a triples set of {data}")
    storage.read_manifest(groups, stage="mine", format=MINED_FORMAT)
    return storage.join(groups, "groups")


def usable_groups(t: pa.Table, group_size: int) -> pa.Table:
    """The rows of ``t`` with at least ``group_size`` negatives."""
    return t.filter(pc.greater_equal(pc.list_value_length(t["neg_pids"]), group_size))


def group_parts(uri: str, group_size: int) -> tuple[list[tuple[str, int]], dict]:
    """The groups' Parquet parts with their usable row counts, and counts of the whole set (``groups``,
    ``short_groups``: left out for having fewer than ``group_size`` negatives)."""
    parts, total = [], 0
    for part in storage.parquet_parts(uri):
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["neg_pids"])
        parts.append((part, int(pc.sum(pc.greater_equal(pc.list_value_length(t["neg_pids"]), group_size)).as_py() or 0)))
        total += t.num_rows
    usable = sum(r for _, r in parts)
    return parts, {"groups": total, "usable_groups": usable, "short_groups": total - usable}


def sample_negatives(neg_pids: pa.ListArray | pa.ChunkedArray, group_size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k) negatives: k of each row's list (each list holds >= k), drawn uniformly with ``rng`` and kept in
    the list's order (run order, hardest first). Vectorised: a random key per element, ranked within its row."""
    if isinstance(neg_pids, pa.ChunkedArray):
        neg_pids = neg_pids.combine_chunks() if neg_pids.num_chunks else pa.array([], pa.list_(pa.int64()))
    n = len(neg_pids)
    if n == 0:
        return np.zeros((0, group_size), dtype=np.int64)
    offsets = neg_pids.offsets.to_numpy()
    offsets = offsets - offsets[0]
    values = neg_pids.flatten().to_numpy()
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(n), lengths)
    order = np.lexsort((rng.random(len(values)), row))  # each row's elements, in a random order, rows in turn
    chosen = np.sort(order[offsets[:-1, None] + np.arange(group_size)], axis=1)  # k per row, back in run order
    return values[chosen]


def read_scores_for(pair_scores: str, qids: np.ndarray) -> pa.Table:
    """The teacher pair scores of the qid range of ``qids`` (pushed down to the Parquet row groups)."""
    if len(qids) == 0:
        return read_pair_scores(pair_scores, 0, -1)
    return read_pair_scores(pair_scores, int(qids.min()), int(qids.max()))


def _pairs(qid: np.ndarray, pids: np.ndarray) -> pa.Table:
    n, width = pids.shape
    return pa.table({"qid": np.repeat(qid, width), "pid": pids.ravel(), "_i": np.arange(n * width)})


def attach_teacher_scores(qid: np.ndarray, pids: np.ndarray, scores: pa.Table, where: str) -> np.ndarray:
    """(n, 1+k) teacher scores of the pairs (qid[i], pids[i, j]) by an Arrow join with ``scores`` (``qid, pid,
    score``); a pair missing from ``scores`` is a UserError naming it and ``where``."""
    joined = _pairs(qid, pids).join(scores, ["qid", "pid"], join_type="left outer").sort_by("_i")
    if joined["score"].null_count:
        miss = joined.filter(pc.is_null(joined["score"]))
        raise UserError(f"{where}: no teacher score for (qid {miss['qid'][0].as_py()}, pid {miss['pid'][0].as_py()})"
                        f" ({miss.num_rows} pair(s) of this part unscored); score every pair of the mined groups")
    return joined["score"].to_numpy().astype(np.float32).reshape(pids.shape)


def group_rows(t: pa.Table, group_size: int, rng: np.random.Generator, pair_scores: str | None) -> pa.Table:
    """Usable groups (already in the epoch's order) -> ``qid, pos_pid, neg_pids`` (k each) and, with
    ``pair_scores``, ``teacher_scores`` (1+k each, the positive's first)."""
    qid, pos = t["qid"].to_numpy(), t["pos_pid"].to_numpy()
    negs = sample_negatives(t["neg_pids"], group_size, rng)
    width = group_size
    out = {"qid": qid, "pos_pid": pos,
           "neg_pids": pa.FixedSizeListArray.from_arrays(pa.array(negs.ravel(), pa.int64()), width)}
    if pair_scores:
        teacher = attach_teacher_scores(qid, np.column_stack([pos, negs]), read_scores_for(pair_scores, qid),
                                        pair_scores)
        out["teacher_scores"] = pa.FixedSizeListArray.from_arrays(pa.array(teacher.ravel(), pa.float32()), width + 1)
    return pa.table(out)


def check_pair_scores(parts: list[tuple[str, int]], group_size: int, pair_scores: str) -> int:
    """Every (qid, pid) of the usable groups (positive and every negative, since any may be sampled) has a
    teacher score; else a UserError naming the first missing pair, the part and the scores file. Returns the
    number of pairs checked."""
    checked = 0
    for part, _ in parts:
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as f:
            t = usable_groups(pq.read_table(f, columns=COLUMNS), group_size)
        if t.num_rows == 0:
            continue
        lists = t["neg_pids"].combine_chunks()
        lengths = np.diff(lists.offsets.to_numpy())
        qid = np.concatenate([t["qid"].to_numpy(), np.repeat(t["qid"].to_numpy(), lengths)])
        pid = np.concatenate([t["pos_pid"].to_numpy(), lists.flatten().to_numpy()])
        pairs = pa.table({"qid": qid, "pid": pid}).group_by(["qid", "pid"]).aggregate([])
        scores = read_scores_for(pair_scores, qid)
        joined = pairs.join(scores, ["qid", "pid"], join_type="left outer")
        if joined["score"].null_count:
            miss = joined.filter(pc.is_null(joined["score"]))
            raise UserError(
                f"{pair_scores}: no teacher score for (qid {miss['qid'][0].as_py()}, pid {miss['pid'][0].as_py()}), "
                f"a pair of the groups in {part} ({miss.num_rows} of its {pairs.num_rows} pairs unscored); "
                "score every (query, passage) pair of the mined groups")
        checked += pairs.num_rows
    return checked
