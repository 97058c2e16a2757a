"""Teacher scores of (query, passage) pairs: the input of ``raykd mine``'s false-negative filter.

A Parquet file, or a folder of ``*.parquet`` parts, with at least these columns::

    qid int64, pid int64, score float32 (any float or integer type is read as float64)

``qid``/``pid`` are a text store's integer keys; each (qid, pid) pair appears once. ``raykd score`` writes
exactly this under ``OUT/pair_scores/`` (``score`` = the ensemble, plus ``score__<teacher>`` per teacher), and
a score output's URI may be given for it: its ``pair_scores/`` folder is read. ``column`` picks a teacher's
column instead of the ensemble's. Any other teacher (a cross-encoder re-ranking a run, say) can write the
three columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from raykd import storage
from raykd.errors import FormatError

SCHEMA = pa.schema([("qid", pa.int64()), ("pid", pa.int64()), ("score", pa.float32())])


SCORE_OUTPUT_FOLDER = "pair_scores"  # where a `raykd score` output keeps them


def resolve(uri: str) -> str:
    """A scores output's ``pair_scores/`` folder when ``uri`` is a finished ``score`` / ``import-*`` output,
    else ``uri``."""
    from raykd.formats.scores import STAGES

    if storage.has_manifest(uri):
        m = storage.read_manifest(uri)
        if m.get("stage") in STAGES:
            folder = storage.join(uri, SCORE_OUTPUT_FOLDER)
            if not storage.exists(folder):
                raise FormatError(uri, None, "this scores output has no pair_scores/ (made with "
                                             "--no-pair-scores, or by an older raykd); score or import again")
            return folder
    return uri


def read_pair_scores(uri: str, qid_min: int | None = None, qid_max: int | None = None,
                     column: str = "score") -> pa.Table:
    """``qid, pid, score`` (float64) of the pairs whose qid lies in ``[qid_min, qid_max]`` (all when unset);
    the range is pushed down to the Parquet row groups; ``score`` is read from ``column``. A missing column,
    a null or NaN score or a pair given twice is a :class:`~raykd.errors.FormatError` naming the file."""
    uri = resolve(uri)
    fs, path = storage.arrow_filesystem(uri)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False,
                         ignore_prefixes=[".", "_"])
    wanted = ["qid", "pid", column]
    missing = [c for c in wanted if c not in dataset.schema.names]
    if missing:
        raise FormatError(uri, None, f"teacher pair scores need columns {', '.join(wanted)}; missing "
                                     f"{', '.join(missing)} (has {', '.join(dataset.schema.names)})")
    where = None
    if qid_min is not None:
        where = ds.field("qid") >= qid_min
    if qid_max is not None:
        upper = ds.field("qid") <= qid_max
        where = upper if where is None else where & upper
    t = dataset.to_table(columns=wanted, filter=where)
    t = pa.table({"qid": t["qid"].cast(pa.int64()), "pid": t["pid"].cast(pa.int64()),
                  "score": t[column].cast(pa.float64())})
    score = t["score"].to_numpy(zero_copy_only=False)
    if t["score"].null_count or np.isnan(score).any():
        raise FormatError(uri, None, "a teacher score is null or NaN")
    if t.num_rows:
        q, p = t["qid"].to_numpy(), t["pid"].to_numpy()
        order = np.lexsort((p, q))
        same = (q[order][1:] == q[order][:-1]) & (p[order][1:] == p[order][:-1])
        if same.any():
            i = order[1:][same][0]
            raise FormatError(uri, None, f"pair (qid {int(q[i])}, pid {int(p[i])}) is scored twice; give each pair once")
    return t
