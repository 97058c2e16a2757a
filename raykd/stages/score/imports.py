"""Import: published teacher-score files as a ``raykd.triple_scores`` output that ``raykd train`` reads without
scoring (``raykd import-scores --format nrkd|st|lightonai``; docs/teachers.md, "Published teacher scores"), and
a scores output written back in those formats (``raykd export-scores``).

Every format becomes triples with a positive and a negative score (:data:`raykd.formats.published.TRIPLE_SCHEMA`),
and :func:`write_imported` turns them into the output, the same way for every format:

    triples -> id check against the text store (--data; strict: an error naming the triple, lenient: quarantined)
            -> duplicates dropped (the first kept, counted)
            -> qid-partitioned parts (``score``'s layout: a qid lives in one part) + ``pair_scores/`` (each
               (qid, pid) once, its first score) + ``quarantine/`` + the manifest with score summaries

lightonai's n-way lists are also kept as they are, ``lists/part-00000.parquet`` (qid, pids, scores), for
listwise losses. The formats' readers live in :mod:`raykd.formats.nrkd` and :mod:`raykd.formats.published`;
this module only wires them to a store and the output. The whole file is held in memory (the ST pickle is a
Python dict by its nature; the others ~33 bytes per triple).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd import config, finished, storage
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.formats.published import TRIPLE_SCHEMA
from raykd.log import get_logger
from raykd.stages.score.analysis import summarize
from raykd.stages.score.join import PAIR_SCORES
from raykd.stages.score.plan import part_of, partition_unique

_log = get_logger("score").info
FORMATS = ("nrkd", "st", "lightonai")


@dataclass
class ImportScoresConfig:
    """Options of ``raykd import-scores``."""

    SECTION = "import_scores"

    format: str = config.field("nrkd", help="The file's format: nrkd (Hofstaetter's tsv), st (sentence-"
                                            "transformers' score pickle + --hard-negatives), lightonai "
                                            "(query_id, document_ids, scores rows).", choices=list(FORMATS))
    scores: str = config.field("", help="The teacher-score file: NRKD tsv[.gz], ST .pkl[.gz], lightonai "
                                        ".parquet or .jsonl[.gz].")
    out: str = config.field("", help="Output URI of the scores (raykd.triple_scores).", fingerprint=False)
    data: str | None = config.field(None, help="Text store whose ids the file must use (checked; lightonai's "
                                               "string ids are mapped through it, its qrels pick positives). "
                                               "Unset: ids are not checked (nrkd, st) / must be integers.")
    split: str = config.field("train", help="Query split of --data that the file's queries belong to.")
    hard_negatives: str | None = config.field(None, help="st: the hard-negatives jsonl[.gz] ({qid, pos, neg: "
                                                         "{system: [pids]}}) whose triples are scored.")
    negatives_per_query: int | None = config.field(None, help="st: negatives drawn per query (seeded; unset: "
                                                              "all of them).")
    systems: list[str] = config.field([], help="st: negative systems to use (unset: all), e.g. bm25.",
                                      comma=True)
    seed: int = config.field(0, help="st: seed of the negatives' draw.")
    trust_pickle: bool = config.field(
        False, help="st: load the score pickle. A pickle can run arbitrary code when loaded: pass this only "
                    "for a file from a source you trust (e.g. sentence-transformers' own).")
    teacher_name: str = config.field("t2", help="Name of the (ensemble) teacher the file's scores came from.")
    rows_per_part: int = config.field(100_000, help="Target triples per output part (parts are split by qid).")
    lenient: bool = config.field(False, help="Quarantine rows with unknown ids or no score instead of failing.",
                                 flag="--lenient/--strict")
    overwrite: bool = config.field(
        False, help="Replace an existing output made with other settings instead of refusing.", fingerprint=False
    )


def import_scores(cfg: ImportScoresConfig, stage: str = "import-scores") -> storage.Manifest:
    """Read ``cfg.scores`` in its format and write the scores output (module docstring)."""
    from raykd.formats.store import TextStore

    t0 = time.time()
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if not cfg.scores or not cfg.out:
        raise UserError(f"{stage} needs --scores FILE and --out URI")
    if cfg.format == "st" and not cfg.hard_negatives:
        raise UserError("--format st needs --hard-negatives FILE (the triples come from it, the scores from "
                        "the pickle)")
    claim = finished.claim(cfg.out, stage, finished.fingerprint(cfg), cfg.overwrite)
    if claim.finished:
        _log(f"{cfg.out} is already complete; nothing to do")
        return claim.manifest
    store = TextStore(cfg.data) if cfg.data else None
    lists = None
    quarantined: list[pa.Table] = []
    if cfg.format == "nrkd":
        triples = _read_nrkd(cfg.scores)
    elif cfg.format == "st":
        triples, missing = _read_st(cfg)
        quarantined.append(_quarantine_rows(missing))
    else:
        lists, triples, bad = _read_lightonai(cfg, store)
        quarantined.append(pa.table({
            "qid": pa.array([-1] * len(bad), pa.int64()), "pos_pid": pa.array([-1] * len(bad), pa.int64()),
            "neg_pid": pa.array([-1] * len(bad), pa.int64()), "row": pa.array([w for w, _, _ in bad], pa.int64()),
            "reason": pa.array([f"query {q}: {r}" for _, q, r in bad], pa.string())}))
    if triples.num_rows == 0:
        raise UserError(f"{cfg.scores}: no triples in the file ({cfg.format})")
    return write_imported(cfg, stage, claim, triples, quarantined, lists, store, t0)


def _read_nrkd(uri: str) -> pa.Table:
    from raykd.formats import nrkd

    batches = []
    for i, b in enumerate(nrkd.iter_batches(uri)):
        batches.append(b)
        if i % 50 == 49:
            _log(f"read {sum(x.num_rows for x in batches):,} lines of {storage.redact(uri)}")
    if not batches:
        raise UserError(f"{uri}: the NRKD file is empty (0 triples)")
    return pa.Table.from_batches(batches).select(TRIPLE_SCHEMA.names).cast(TRIPLE_SCHEMA)


def _read_st(cfg: ImportScoresConfig) -> tuple[pa.Table, list]:
    from raykd.formats import published

    scores = published.read_st_scores(cfg.scores, trust_pickle=cfg.trust_pickle)
    _log(f"read scores of {len(scores):,} queries from {storage.redact(cfg.scores)}")
    return published.st_triples(cfg.hard_negatives, scores, cfg.negatives_per_query, cfg.seed,
                                cfg.systems or None, lenient=cfg.lenient)


def _read_lightonai(cfg: ImportScoresConfig, store) -> tuple[pa.Table, pa.Table, list]:
    """The lists (ids mapped through the store's original ids when a store is given), and their triples
    (positives from the store's qrels when it has them for the split)."""
    from raykd.formats import published
    from raykd.runs import corpus_ids, pids_of

    qid_of = pid_of = positives = None
    if store is not None:
        q = store.queries(cfg.split)
        qid_of = dict(zip(q["query_id"].to_pylist(), q["qid"].to_pylist()))
        docs = sorted({str(d) for _, r in published._lightonai_rows(cfg.scores) if isinstance(r, dict)
                       for d in r.get("document_ids") or []})  # only the file's documents get a dict entry
        found = pids_of(corpus_ids(store), docs)
        pid_of = {d: int(p) for d, p in zip(docs, found.tolist()) if p >= 0}
        if store.has_qrels(cfg.split):
            positives = {}
            qr = store.qrels(cfg.split)
            qr = qr.filter(pc.is_valid(qr["pid"]))
            for a, b, rel in zip(qr["qid"].to_pylist(), qr["pid"].to_pylist(), qr["relevance"].to_pylist()):
                if rel > 0:
                    positives.setdefault(a, set()).add(b)
    lists, bad = published.read_lightonai(cfg.scores, qid_of, pid_of, lenient=cfg.lenient)
    return lists, published.list_triples(lists, positives), bad


def _quarantine_rows(missing: list[tuple]) -> pa.Table:
    cols = list(zip(*missing)) if missing else [[], [], [], [], []]
    return pa.table({"qid": pa.array(cols[0], pa.int64()), "pos_pid": pa.array(cols[1], pa.int64()),
                     "neg_pid": pa.array(cols[2], pa.int64()), "row": pa.array(cols[3], pa.int64()),
                     "reason": pa.array(cols[4], pa.string())})


def write_imported(cfg, stage: str, claim: finished.Claim, triples: pa.Table, quarantined: list[pa.Table],
                   lists: pa.Table | None, store, t0: float) -> storage.Manifest:
    """The shared writer of every import (module docstring): ``cfg`` needs out, teacher_name, rows_per_part,
    lenient and the fields its manifest records."""
    from raykd.formats import published

    name = fmt.teacher_names([cfg.teacher_name])[0]
    n_in = triples.num_rows
    if store is not None:
        known_q = store.queries(cfg.split)["qid"].to_numpy()
        known_p = store.corpus(["pid"])["pid"].to_numpy()
        source = getattr(cfg, "hard_negatives", None) or cfg.scores  # st: the triples come from the negatives
        triples, bad = published.split_unknown(triples, known_q, known_p, source, cfg.lenient)
        if bad.num_rows:
            quarantined.append(bad.select(["qid", "pos_pid", "neg_pid"]).append_column(
                "row", pa.array(np.full(bad.num_rows, -1), pa.int64())).append_column("reason", bad["reason"]))
    qid, pos, neg = (triples[c].to_numpy() for c in fmt.KEY_COLUMNS)
    ps = triples["pos_score"].to_numpy().astype(np.float32)
    ns = triples["neg_score"].to_numpy().astype(np.float32)
    n_kept = len(qid)
    n_parts = max(1, -(-n_kept // max(1, cfg.rows_per_part)))
    order, bounds = partition_unique([qid, pos, neg], part_of(qid, n_parts), n_parts, first_by=np.arange(n_kept))
    qid, pos, neg, ps, ns = qid[order], pos[order], neg[order], ps[order], ns[order]
    names, n_pairs = [], 0
    for p in range(n_parts):
        a, b = int(bounds[p]), int(bounds[p + 1])
        if a == b:
            continue
        pairs = _pair_scores(qid[a:b], pos[a:b], neg[a:b], ps[a:b], ns[a:b], name)
        storage.write_parquet_atomic(pairs, storage.join(cfg.out, PAIR_SCORES, fmt.part_name(p)))
        n_pairs += pairs.num_rows
        table = fmt.make_table(qid[a:b], pos[a:b], neg[a:b], {name: (ps[a:b], ns[a:b])}, [1.0])
        storage.write_parquet_atomic(table, storage.join(cfg.out, "parts", fmt.part_name(p)))
        names.append(fmt.part_name(p))
    q = pa.concat_tables([t.cast(fmt.QUARANTINE_SCHEMA) for t in quarantined]) if quarantined else None
    if q is not None and q.num_rows:
        storage.write_parquet_atomic(q, storage.join(cfg.out, "quarantine", "import.parquet"))
    if lists is not None:
        storage.write_parquet_atomic(lists, storage.join(cfg.out, "lists", "part-00000.parquet"))
    counts = {"triples": int(len(qid)), "triples_in": n_in, "duplicate_triples": int(n_kept - len(qid)),
              "quarantined_total": 0 if q is None else q.num_rows, "parts": len(names), "pair_scores": n_pairs}
    if lists is not None:
        counts["lists"] = lists.num_rows
    summary = {name: {"pos": summarize(ps), "neg": summarize(ns), "margin": summarize(ps - ns)}}
    m = storage.write_manifest(
        cfg.out, stage, format=fmt.FORMAT, format_version=fmt.VERSION,
        config=storage.redact(dataclasses.asdict(cfg)),
        inputs={k: storage.redact(str(v)) for k, v in dataclasses.asdict(cfg).items()
                if k in ("scores", "nrkd", "hard_negatives", "data") and v},
        counts=counts, stats={"teachers": [name], "weights": [1.0], "score_summary": summary},
        parts=[f"parts/{n}" for n in names], timings={"total_s": round(time.time() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    _log(f"imported {len(qid):,} triples ({counts['duplicate_triples']:,} duplicates dropped, "
         f"{counts['quarantined_total']:,} quarantined) into {len(names)} part(s)")
    return m


def _pair_scores(qid, pos, neg, ps, ns, name: str) -> pa.Table:
    """Each (qid, pid) of a part's triples once, with its first score: :mod:`raykd.formats.pair_scores`."""
    q = np.concatenate([qid, qid])
    p = np.concatenate([pos, neg])
    s = np.concatenate([ps, ns]).astype(np.float32)
    keep, _ = partition_unique([q, p], first_by=np.arange(len(q)))  # sorted by (qid, pid), first score kept
    return pa.table({"qid": q[keep].astype(np.int64), "pid": p[keep].astype(np.int64), "score": s[keep],
                     f"score__{name}": s[keep]})


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportScoresConfig:
    """Options of ``raykd export-scores``."""

    SECTION = "export_scores"

    format: str = config.field("nrkd", help="The file's format: nrkd (tsv of triples), st (score pickle of the "
                                            "unique pairs), lightonai (one list per query of its scored pairs).",
                               choices=list(FORMATS))
    scores: str = config.field("", help="A scores output (of `raykd score` or an import).")
    out: str = config.field("", help="File to write: .tsv[.gz] (nrkd), .pkl.gz (st), .parquet or .jsonl[.gz] "
                                     "(lightonai).")
    teacher: str | None = config.field(None, help="Write this teacher's scores instead of the ensemble's.")
    data: str | None = config.field(None, help="lightonai: text store whose original query and document ids "
                                               "the file names (unset: the integer ids).")
    split: str = config.field("train", help="lightonai: query split of --data.")


def export_scores(cfg: ExportScoresConfig) -> int:
    """Write a scores output in a published format; returns the rows (triples, queries) written. ``st`` and
    ``lightonai`` take the output's unique pair scores (``pair_scores/``); lightonai writes an import's kept
    lists as they are, else one list per query of all its scored pairs (in pid order)."""
    from raykd.formats import published
    from raykd.formats.pair_scores import read_pair_scores

    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if not cfg.scores or not cfg.out:
        raise UserError("export-scores needs --scores URI and --out FILE")
    if cfg.format == "nrkd":
        return write_nrkd(cfg.scores, cfg.out, cfg.teacher)
    s = fmt.TripleScores(cfg.scores)
    if cfg.teacher is not None and cfg.teacher not in s.teachers:
        raise UserError(f"{cfg.scores}: no teacher {cfg.teacher!r}; it has {', '.join(s.teachers)}")
    column = f"score__{cfg.teacher}" if cfg.teacher else "score"
    lists_uri = storage.join(cfg.scores, "lists")
    if cfg.format == "lightonai" and storage.exists(lists_uri) and cfg.teacher is None:
        lists = storage.read_parquet(lists_uri)
    else:
        pairs = read_pair_scores(cfg.scores, column=column).sort_by([("qid", "ascending"), ("pid", "ascending")])
        q, p, v = pairs["qid"].to_numpy(), pairs["pid"].to_numpy(), pairs["score"].to_numpy()
        if cfg.format == "st":
            out: dict[int, dict[int, float]] = {}
            for a, b, c in zip(q.tolist(), p.tolist(), v.tolist()):
                out.setdefault(a, {})[b] = c
            published.write_st_scores(cfg.out, out)
            _log(f"wrote scores of {len(out):,} queries ({len(q):,} pairs) to {storage.redact(cfg.out)}")
            return len(q)
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if len(q) else np.zeros(0, np.int64)
        offsets = np.r_[starts, len(q)].astype(np.int32)
        lists = pa.table({"qid": pa.array(q[starts], pa.int64()),
                          "pids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(p, pa.int64())),
                          "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(v, pa.float32()))})
    qmap = dmap = None
    if cfg.data:
        from raykd.formats.store import TextStore

        store = TextStore(cfg.data)
        queries = store.queries(cfg.split)
        qmap = dict(zip(queries["qid"].to_pylist(), queries["query_id"].to_pylist()))
        wanted = np.unique(pc.list_flatten(lists["pids"]).to_numpy())
        corpus = store.corpus(["pid", "doc_id"])
        corpus = corpus.filter(pc.is_in(corpus["pid"], value_set=pa.array(wanted, pa.int64())))
        dmap = dict(zip(corpus["pid"].to_pylist(), corpus["doc_id"].to_pylist()))
    n = published.write_lightonai(cfg.out, lists, qmap, dmap)
    _log(f"wrote {n:,} lists to {storage.redact(cfg.out)}")
    return n


def write_nrkd(scores_uri: str, out_file: str, teacher: str | None = None) -> int:
    """Write a scores output as an NRKD tsv (the ensemble's scores, or one ``teacher``'s); returns the lines."""
    from raykd.formats import nrkd

    s = fmt.TripleScores(scores_uri)
    if teacher is not None and teacher not in s.teachers:
        raise UserError(f"{scores_uri}: no teacher {teacher!r}; it has {', '.join(s.teachers)}")
    pos_col = fmt.teacher_column("pos", teacher) if teacher else "pos_score"
    neg_col = fmt.teacher_column("neg", teacher) if teacher else "neg_score"

    def batches():
        for b in s.iter_batches(["qid", "pos_pid", "neg_pid", pos_col, neg_col]):
            t = pa.Table.from_batches([b])
            yield t.rename_columns(["qid", "pos_pid", "neg_pid", "pos_score", "neg_score"])

    n = nrkd.write(out_file, batches())
    _log(f"wrote {n} lines to {storage.redact(out_file)}")
    return n


__all__ = ["FORMATS", "ExportScoresConfig", "ImportScoresConfig", "export_scores", "import_scores", "write_imported",
           "write_nrkd"]
