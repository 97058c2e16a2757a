"""Score the training triples with a teacher ensemble: the `score` stage as a Ray job.

    ray job submit --working-dir . -- python jobs/score_teachers.py [--data URI --teacher PATH ... --out URI]

With no arguments it scores the embedded sample: writes it (raykd.sample), prepares it into a text store and
scores it with a default ensemble of two tiny cross-encoders (a BERT and an ALBERT from raykd.tiny). Those
teachers are UNTRAINED (random weights): the run shows the machinery, not useful scores. Pass --teacher with
fine-tuned cross-encoders (the demo passes its own) for real teacher scores. `--sample-train-queries N` and
`--sample-negatives N` size the default sample (default 200 x 100 = 20,000 triples). All other flags are
those of `raykd score` (see `raykd score --help`). The default work folder is ./raykd-output/score-sample
(environment RAYKD_SCORE_WORK overrides it).
"""

from __future__ import annotations

import os
import sys

# the job's working dir is on sys.path via the runtime env only for `python -m`; make `raykd` importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd import storage  # noqa: E402
from raykd.cli import score as score_command  # noqa: E402

DEFAULT_WORK = "raykd-output/score-sample"


def default_inputs(work: str, spec_flags: dict) -> list[str]:
    """Write the embedded sample, prepare it and build the two tiny teachers; returns the flags to score it."""
    from raykd.sample import SampleSpec, write_sample
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.tiny import build_tiny_model

    raw, store = storage.join(work, "raw"), storage.join(work, "store")
    if not storage.has_manifest(store):
        write_sample(raw, SampleSpec(**spec_flags))
        prepare(PrepareConfig(msmarco=raw, out=store))
    teachers = []
    for arch, seed in (("bert", 1), ("albert", 2)):
        path = os.path.join(os.path.abspath(work) if not storage.is_s3(work) else "/tmp/raykd", f"tiny-{arch}-teacher")
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_tiny_model(path, arch=arch, head="cross_encoder", seed=seed)
        teachers += ["--teacher", path]
    return ["--data", store, *teachers, "--out", storage.join(work, "scores")]


def _pop_sample_flags(argv: list[str]) -> tuple[list[str], dict]:
    """``--sample-train-queries N`` / ``--sample-negatives N`` size the default sample (SampleSpec)."""
    spec, rest, i = {}, [], 0
    while i < len(argv):
        if argv[i] in ("--sample-train-queries", "--sample-negatives") and i + 1 < len(argv):
            spec[argv[i].removeprefix("--sample-").replace("-", "_")] = int(argv[i + 1])
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, spec


def main(argv: list[str]) -> None:
    argv, spec = _pop_sample_flags(argv)
    if "--data" not in argv and not any(a.startswith("--config") for a in argv):
        work = os.environ.get("RAYKD_SCORE_WORK", DEFAULT_WORK)
        argv = default_inputs(work, spec) + argv
    score_command.main(args=argv, prog_name="score_teachers.py", standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])
