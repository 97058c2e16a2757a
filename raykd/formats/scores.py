"""Teacher scores of training triples: what ``raykd score`` and ``raykd import-nrkd`` write, and the ONLY way the
train stage reads them (format ``raykd.triple_scores`` v1).

Layout under the scores URI::

    parts/part-NNNNN.parquet    one row per training triple, keyed by (qid, pos_pid, neg_pid):
                                  qid, pos_pid, neg_pid           int64   the triple (unique keys)
                                  pos_score, neg_score            float32 the ensemble's scores
                                  margin                          float32 pos_score - neg_score
                                  pos_score__<teacher>, neg_score__<teacher>   float32 per teacher
                                rows sorted by (qid, pos_pid, neg_pid) within a part; a qid lives in one part
    pair_scores/part-NNNNN.parquet
                                score stage only (unless --no-pair-scores): the unique (qid, pid) pairs of the
                                part's triples, qid, pid int64, score (ensemble), score__<teacher> float32
                                (:mod:`raykd.formats.pair_scores`); NaN-scored pairs left out
    quarantine/*.parquet        rows left out in lenient mode (qid, pos_pid, neg_pid, row, reason)
    analysis/teacher_scores.json, analysis/teacher_scores.png
                                per-teacher score distribution summary and histogram (score stage only)
    _work/                      the score stage's resumable work files (not part of the contract)
    manifest.json               stage "score", "import-nrkd" or "import-scores"; written last. ``stats.teachers`` lists the
                                teacher names (column suffixes) in order, ``stats.weights`` their ensemble
                                weights; ``counts.triples`` the number of rows over all parts.

The ensemble is the weighted mean of the teachers' scores, ``sum_t w_t * s_t / sum_t w_t`` (the paper's T2
is the plain mean of three teachers), or of their normalised scores when the score stage ran with
``normalization`` zscore / minmax (``manifest["stats"]["normalization"]`` holds the method and each teacher's
statistics; the per-teacher columns are always the raw scores). An NRKD import has one teacher, named by ``--teacher-name`` (``t2`` by
default), whose columns equal the ensemble's.

Reading (no Ray needed)::

    scores = TripleScores("s3://bucket/scores")      # refuses an unfinished output
    scores.teachers                                  # ["bert_base", "albert_large", ...]
    scores.table(["qid", "pos_pid", "neg_pid", "margin"])
    for batch in scores.iter_batches(["qid", "pos_pid", "neg_pid", "pos_score", "neg_score"]): ...
    scores.part_uris                                 # for ray.data.read_parquet(..., filesystem=scores.filesystem)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from raykd import storage

FORMAT = "raykd.triple_scores"
VERSION = 1
STAGES = ("score", "import-nrkd", "import-scores")
KEY_COLUMNS = ("qid", "pos_pid", "neg_pid")
ENSEMBLE_COLUMNS = ("pos_score", "neg_score", "margin")
QUARANTINE_SCHEMA = pa.schema(
    [("qid", pa.int64()), ("pos_pid", pa.int64()), ("neg_pid", pa.int64()), ("row", pa.int64()), ("reason", pa.string())]
)


def teacher_column(side: str, teacher: str) -> str:
    """``pos_score__<teacher>`` or ``neg_score__<teacher>``."""
    if side not in ("pos", "neg"):
        raise ValueError(f"side must be 'pos' or 'neg', got {side!r}")
    return f"{side}_score__{teacher}"


def schema(teachers: Sequence[str]) -> pa.Schema:
    fields = [(k, pa.int64()) for k in KEY_COLUMNS] + [(c, pa.float32()) for c in ENSEMBLE_COLUMNS]
    for t in teachers:
        fields += [(teacher_column("pos", t), pa.float32()), (teacher_column("neg", t), pa.float32())]
    return pa.schema(fields)


def teacher_names(names_or_paths: Sequence[str]) -> list[str]:
    """Column-safe, unique teacher names from model names or paths (last path component, lower case,
    ``[a-z0-9_]`` only; repeats get ``_2``, ``_3``). A trained raykd model, ``RUN/model``, is named after its
    run folder ``RUN``."""
    out: list[str] = []
    for n in names_or_paths:
        parts = [p for p in str(n).rstrip("/").split("/") if p]
        if len(parts) > 1 and parts[-1] == "model" and not parts[-2].endswith(":"):
            parts.pop()
        base = parts[-1] if parts else "teacher"
        name = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "teacher"
        cand, i = name, 2
        while cand in out:
            cand, i = f"{name}_{i}", i + 1
        out.append(cand)
    return out


def ensemble(scores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of per-teacher score arrays: ``sum_t w_t s_t / sum_t w_t`` (float32)."""
    if len(scores) != len(weights) or not scores:
        raise ValueError(f"need one weight per teacher, got {len(weights)} weights for {len(scores)} teachers")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
    acc = sum(wi * np.asarray(s, dtype=np.float64) for wi, s in zip(w, scores))
    return (acc / w.sum()).astype(np.float32)


def normalized_ensemble(scores: dict[str, np.ndarray], weights: Sequence[float], normalization: str = "none",
                        stats: dict | None = None) -> np.ndarray:
    """:func:`ensemble` of the raw scores (``none``), else :func:`raykd.ensemble.ensemble` of the scores
    normalised with the run's ``stats`` (teacher -> ScoreStats); float32."""
    if normalization == "none":
        return ensemble(list(scores.values()), weights)
    from raykd.ensemble import ensemble as normalized

    return normalized(scores, weights, normalization, stats)


def make_table(
    qid: np.ndarray,
    pos_pid: np.ndarray,
    neg_pid: np.ndarray,
    teacher_scores: dict[str, tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    normalization: str = "none",
    stats: dict | None = None,
) -> pa.Table:
    """A parts table from keys and ``{teacher: (pos_scores, neg_scores)}`` (ensemble and margin computed; the
    ensemble of normalised scores when ``normalization`` is not ``none``, with ``stats``: teacher ->
    :class:`raykd.ensemble.ScoreStats` of the run). The per-teacher columns keep the raw scores."""
    teachers = list(teacher_scores)
    pos = normalized_ensemble({t: teacher_scores[t][0] for t in teachers}, weights, normalization, stats)
    neg = normalized_ensemble({t: teacher_scores[t][1] for t in teachers}, weights, normalization, stats)
    cols = {
        "qid": np.asarray(qid, np.int64),
        "pos_pid": np.asarray(pos_pid, np.int64),
        "neg_pid": np.asarray(neg_pid, np.int64),
        "pos_score": pos,
        "neg_score": neg,
        "margin": (pos - neg).astype(np.float32),
    }
    for t in teachers:
        cols[teacher_column("pos", t)] = np.asarray(teacher_scores[t][0], np.float32)
        cols[teacher_column("neg", t)] = np.asarray(teacher_scores[t][1], np.float32)
    return pa.Table.from_pydict(cols, schema=schema(teachers))


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


class TripleScores:
    """Read access to a finished scores output (stage ``score`` or ``import-nrkd``)."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        m = storage.read_manifest(self.uri, format=FORMAT)
        if m.get("stage") not in STAGES:
            raise storage.IncompleteOutputError(
                f"{self.uri}: expected the output of `raykd score` or `raykd import-nrkd`, found stage `{m.get('stage')}`"
            )
        if m.get("format_version") != VERSION:
            raise storage.IncompleteOutputError(
                f"{self.uri}: format {FORMAT} version {m.get('format_version')} is not supported (expected {VERSION})"
            )
        self.manifest = m

    @property
    def teachers(self) -> list[str]:
        return list(self.manifest["stats"]["teachers"])

    @property
    def weights(self) -> list[float]:
        return list(self.manifest["stats"]["weights"])

    @property
    def parts_uri(self) -> str:
        return storage.join(self.uri, "parts")

    @property
    def part_uris(self) -> list[str]:
        return [storage.join(self.uri, p) for p in self.manifest["parts"]]

    @property
    def filesystem(self):
        """The pyarrow filesystem of the parts (for ``ray.data.read_parquet(part_uris_paths, filesystem=...)``)."""
        return storage.arrow_filesystem(self.uri)[0]

    def __len__(self) -> int:
        return int(self.manifest["counts"]["triples"])

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All rows in memory (part order). At full scale prefer :meth:`iter_batches` or Ray Data."""
        tables = [storage.read_parquet(u, columns=list(columns) if columns else None) for u in self.part_uris]
        if not tables:
            return schema(self.teachers).empty_table().select(list(columns) if columns else schema(self.teachers).names)
        return pa.concat_tables(tables)

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        for u in self.part_uris:
            yield from storage.iter_parquet_batches(u, columns=list(columns) if columns else None, batch_size=batch_size)
