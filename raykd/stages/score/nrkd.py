"""NRKD compatibility: Hofstaetter et al.'s published teacher-score files (``pos_score<TAB>neg_score<TAB>qid<TAB>
pos_pid<TAB>neg_pid``) imported as a one-teacher scores output, and any scores output exported as one."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raykd import config, finished, storage
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.log import get_logger
from raykd.stages.score.analysis import summarize
from raykd.stages.score.plan import part_of, partition_unique

_log = get_logger("score").info


@dataclass
class ImportNrkdConfig:
    """Options of ``raykd import-nrkd``."""

    SECTION = "import_nrkd"

    nrkd: str = config.field("", help="NRKD tsv (pos_score, neg_score, qid, pos_pid, neg_pid), .gz ok.")
    out: str = config.field("", help="Output URI of the scores (raykd.triple_scores).", fingerprint=False)
    teacher_name: str = config.field("t2", help="Name of the (ensemble) teacher the file's scores came from.")
    rows_per_part: int = config.field(100_000, help="Target triples per output part (parts are split by qid).")
    overwrite: bool = config.field(
        False, help="Replace an existing output made with other settings instead of refusing.", fingerprint=False
    )


@dataclass
class ExportNrkdConfig:
    """Options of ``raykd export-nrkd`` (see ``export_nrkd``)."""

    SECTION = "export_nrkd"

    scores: str = config.field("", help="A scores output (of `raykd score` or `raykd import-nrkd`).")
    out: str = config.field("", help="NRKD tsv to write (.gz compresses).")
    teacher: str | None = config.field(None, help="Write this teacher's scores instead of the ensemble's.")


def import_nrkd(cfg: ImportNrkdConfig) -> storage.Manifest:
    """Turn an NRKD file into a scores output that training reads like a ``score`` output. Duplicate triples
    keep their first line's scores and are counted. Holds the file's numbers in memory (~33 bytes/triple)."""
    from raykd.formats import nrkd

    t0 = time.time()
    if not cfg.nrkd or not cfg.out:
        raise UserError("import-nrkd needs --nrkd FILE and --out URI")
    name = fmt.teacher_names([cfg.teacher_name])[0]
    claim = finished.claim(cfg.out, "import-nrkd", finished.fingerprint(cfg), cfg.overwrite)
    if claim.finished:
        _log(f"{cfg.out} is already complete; nothing to do")
        return claim.manifest
    batches = []
    for i, b in enumerate(nrkd.iter_batches(cfg.nrkd)):
        batches.append(b)
        if i % 50 == 49:
            _log(f"read {sum(x.num_rows for x in batches)} lines of {cfg.nrkd}")
    if not batches:
        raise UserError(f"{cfg.nrkd}: the NRKD file is empty (0 triples)")
    t = pa.Table.from_batches(batches)
    n_in = t.num_rows
    qid, pos, neg = (t[c].to_numpy() for c in fmt.KEY_COLUMNS)
    ps, ns = t["pos_score"].to_numpy(), t["neg_score"].to_numpy()
    n_parts = max(1, -(-n_in // max(1, cfg.rows_per_part)))
    order, bounds = partition_unique([qid, pos, neg], part_of(qid, n_parts), n_parts, first_by=np.arange(n_in))
    qid, pos, neg, ps, ns = qid[order], pos[order], neg[order], ps[order], ns[order]
    names = []
    for p in range(n_parts):
        a, b = int(bounds[p]), int(bounds[p + 1])
        if a == b:
            continue
        table = fmt.make_table(qid[a:b], pos[a:b], neg[a:b], {name: (ps[a:b], ns[a:b])}, [1.0])
        storage.write_parquet_atomic(table, storage.join(cfg.out, "parts", fmt.part_name(p)))
        names.append(fmt.part_name(p))
    summary = {name: {"pos": summarize(ps), "neg": summarize(ns), "margin": summarize(ps - ns)}}
    m = storage.write_manifest(
        cfg.out,
        "import-nrkd",
        format=fmt.FORMAT,
        format_version=fmt.VERSION,
        config=storage.redact(dataclasses.asdict(cfg)),
        inputs={"nrkd": storage.redact(str(cfg.nrkd))},
        counts={"triples": int(len(qid)), "triples_in": n_in, "duplicate_triples": int(n_in - len(qid)),
                "parts": len(names)},
        stats={"teachers": [name], "weights": [1.0], "score_summary": summary},
        parts=[f"parts/{n}" for n in names],
        timings={"total_s": round(time.time() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    _log(f"imported {len(qid)} triples ({n_in - len(qid)} duplicates dropped) into {len(names)} part(s)")
    return m


def export_nrkd(scores_uri: str, out_file: str, teacher: str | None = None) -> int:
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
