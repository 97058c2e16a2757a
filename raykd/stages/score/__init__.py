"""The ``score`` stage: teacher-ensemble scores for every training triple, exactly once, in one streaming Ray
pipeline (docs/score.md). Its steps are its modules:

- :mod:`.plan`      triples -> qid-hashed output parts, checked and deduplicated, in Ray tasks
- :mod:`.pipeline`  unique pairs -> texts -> tokens -> long-lived actors holding every teacher -> pair scores
                    (the steps after the read: :mod:`raykd.stages.scoring`, shared with ``search --rerank``)
- :mod:`.join`      a part's pair scores -> its triples' scores and ensemble, committed in a Ray task
- :mod:`.analysis`  per-teacher score distributions
- :mod:`.nrkd`      import and export of NRKD teacher-score files
- :mod:`.imports`   import of published teacher-score files of every format (NRKD, sentence-transformers, lightonai)
- :mod:`.stage`     the config and the driver that runs the steps
"""

from raykd.stages.score.analysis import summarize
from raykd.stages.score.imports import ExportScoresConfig, ImportScoresConfig, export_scores, import_scores
from raykd.stages.score.join import STATS_KEY, join_part, part_stats
from raykd.stages.score.nrkd import ExportNrkdConfig, ImportNrkdConfig, export_nrkd, import_nrkd
from raykd.stages.score.plan import part_of, partition_unique
from raykd.stages.score.stage import ScoreConfig, score
from raykd.stages.scoring import EnsembleScorer, TeacherScorer, attach_texts, tokenize_pairs

__all__ = [
    "STATS_KEY", "EnsembleScorer", "ExportNrkdConfig", "ExportScoresConfig", "ImportNrkdConfig", "ImportScoresConfig", "ScoreConfig", "TeacherScorer",
    "attach_texts", "export_nrkd", "export_scores", "import_nrkd", "import_scores", "join_part", "part_of", "part_stats", "partition_unique",
    "score", "summarize", "tokenize_pairs",
]
