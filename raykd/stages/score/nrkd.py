"""NRKD compatibility: Hofstaetter et al.'s published teacher-score files (``pos_score<TAB>neg_score<TAB>qid<TAB>
pos_pid<TAB>neg_pid``) imported as a one-teacher scores output, and any scores output exported as one."""

from __future__ import annotations

from dataclasses import dataclass

from raykd import config, storage
from raykd.errors import UserError


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
    """Turn an NRKD file into a scores output that training reads like a ``score`` output: ``raykd
    import-scores --format nrkd`` (:mod:`raykd.stages.score.imports`) under its own stage name. Duplicate
    triples keep their first line's scores and are counted. Holds the file's numbers in memory (~33
    bytes/triple)."""
    from raykd.stages.score.imports import ImportScoresConfig, import_scores

    if not cfg.nrkd or not cfg.out:
        raise UserError("import-nrkd needs --nrkd FILE and --out URI")
    return import_scores(ImportScoresConfig(format="nrkd", scores=cfg.nrkd, out=cfg.out,
                                            teacher_name=cfg.teacher_name, rows_per_part=cfg.rows_per_part,
                                            overwrite=cfg.overwrite), stage="import-nrkd")


def export_nrkd(scores_uri: str, out_file: str, teacher: str | None = None) -> int:
    """Write a scores output as an NRKD tsv (the ensemble's scores, or one ``teacher``'s); returns the lines:
    ``raykd export-scores --format nrkd`` (:func:`raykd.stages.score.imports.write_nrkd`)."""
    from raykd.stages.score.imports import write_nrkd

    return write_nrkd(scores_uri, out_file, teacher)
