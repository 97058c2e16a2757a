"""Teacher scores of (query, passage) pairs: the input of ``raykd mine``'s false-negative filter.

A Parquet file, or a folder of ``*.parquet`` parts, with at least these columns::

    qid int64, pid int64, score float32 (any float or integer type is read as float64)

``qid``/``pid`` are a text store's integer keys; each (qid, pid) pair appears once. This is the shape of the
unique pair scores the score stage computes before joining them back to triples, so its pairs can be used
here as they are; any other teacher (a cross-encoder re-ranking a run, say) can write it with three columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from raykd import storage
from raykd.errors import FormatError

SCHEMA = pa.schema([("qid", pa.int64()), ("pid", pa.int64()), ("score", pa.float32())])


def read_pair_scores(uri: str, qid_min: int | None = None, qid_max: int | None = None) -> pa.Table:
    """``qid, pid, score`` (float64) of the pairs whose qid lies in ``[qid_min, qid_max]`` (all when unset);
    the range is pushed down to the Parquet row groups. A missing column, a null or NaN score or a pair
    given twice is a :class:`~raykd.errors.FormatError` naming the file."""
    fs, path = storage.arrow_filesystem(uri)
    dataset = ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False,
                         ignore_prefixes=[".", "_"])
    missing = [c for c in SCHEMA.names if c not in dataset.schema.names]
    if missing:
        raise FormatError(uri, None, f"teacher pair scores need columns qid, pid, score; missing {', '.join(missing)}")
    where = None
    if qid_min is not None:
        where = ds.field("qid") >= qid_min
    if qid_max is not None:
        upper = ds.field("qid") <= qid_max
        where = upper if where is None else where & upper
    t = dataset.to_table(columns=SCHEMA.names, filter=where)
    t = pa.table({"qid": t["qid"].cast(pa.int64()), "pid": t["pid"].cast(pa.int64()),
                  "score": t["score"].cast(pa.float64())})
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
