"""Score the training triples with a teacher ensemble: the `score` stage as a Ray job.

    ray job submit --working-dir . -- python jobs/score_teachers.py [--data URI --teacher PATH ... --out URI]

The flags are ScoreConfig's fields, generated as for `raykd score` (see `--help` and docs/cli.md), plus
SampleSpec's fields as `--sample-<field>` (e.g. `--sample-train-queries N --sample-negatives N`), which size
the default sample.

With no --data (from the flags or the --config file) it scores the embedded sample: writes it
(raykd.sample), prepares it into a text store and scores it with a default ensemble of two tiny cross-encoders
(a BERT and an ALBERT from raykd.tiny), unless --teacher is given. Those teachers are UNTRAINED (random
weights): the run shows the machinery, not useful scores. Pass --teacher with fine-tuned cross-encoders (the
demo passes its own) for real teacher scores. The default work folder is ./raykd-output/score-sample
(environment RAYKD_SCORE_WORK overrides it); --out overrides its scores folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys

# the job's working dir is on sys.path via the runtime env only for `python -m`; make `raykd` importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd import config, storage  # noqa: E402
from raykd.cli import ConfigCommand, score_summary  # noqa: E402
from raykd.sample import SampleSpec  # noqa: E402

DEFAULT_WORK = "raykd-output/score-sample"


def default_inputs(work: str, spec: SampleSpec) -> dict:
    """Write the embedded sample, prepare it and build the two tiny teachers; returns data, teachers, out."""
    from raykd.sample import write_sample
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.tiny import build_tiny_model

    raw, store = storage.join(work, "raw"), storage.join(work, "store")
    if not storage.has_manifest(store):
        write_sample(raw, spec)
        prepare(PrepareConfig(msmarco=raw, out=store))
    teachers = []
    for arch, seed in (("bert", 1), ("albert", 2)):
        path = os.path.join(os.path.abspath(work) if not storage.is_s3(work) else "/tmp/raykd", f"tiny-{arch}-teacher")
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_tiny_model(path, arch=arch, head="cross_encoder", seed=seed)
        teachers.append(path)
    return {"data": store, "teachers": teachers, "out": storage.join(work, "scores")}


class ScoreTeachers(ConfigCommand):
    """`raykd score`'s command, whose config falls back to the embedded sample when it names no --data."""

    def build(self, config_file, params):
        cfg = super().build(config_file, params)
        if cfg.data:
            return cfg
        spec = config.build(SampleSpec, None, **config.flags_of(SampleSpec, params, prefix="sample"))
        inputs = default_inputs(os.environ.get("RAYKD_SCORE_WORK", DEFAULT_WORK), spec)
        return dataclasses.replace(cfg, data=inputs["data"], teachers=cfg.teachers or inputs["teachers"],
                                   out=cfg.out or inputs["out"])


command = ScoreTeachers(
    "score_teachers.py", config_class="raykd.stages.score:ScoreConfig", stage="raykd.stages.score:score",
    extra_params=config.options(SampleSpec, prefix="sample"),
    summary=lambda cfg, manifest, **_sample: score_summary(cfg, manifest),
    help="Score training triples with a teacher ensemble; with no --data, the embedded sample.",
)

if __name__ == "__main__":
    command.main(args=sys.argv[1:], prog_name="score_teachers.py")
