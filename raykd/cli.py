"""The ``raykd`` command line, generated from the stage configs: thin drivers.

Each command's options are its stage config's fields (``raykd.config.options``); a command builds the config
(dataclass defaults < ``--config FILE`` < flags given), calls the stage and prints its summary. No logic
lives here. docs/cli.md says how a field becomes a flag.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from raykd import __version__, config

JSON_OPTION = click.Option(["--json", "as_json"], is_flag=True,
                           help="Print machine-readable results (with per-query values).")


def config_option() -> click.Option:
    return click.Option(["--config", "config_file"], type=click.Path(), default=None,
                        help="YAML file of options (flat, or this command's section); flags given override it.")


def _fail(e: Exception) -> None:
    from raykd import log

    if log.is_verbose():  # the one line hides where an error without a file name came from
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    raise click.ClickException(f"{type(e).__name__}: {e}") from e


def run_stage(fn: Callable, *args, **kwargs):
    """Call a stage; turn expected user errors into a clean one-line CLI error (exit code 1)."""
    from raykd.errors import UserError

    try:
        return fn(*args, **kwargs)
    except (UserError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        _fail(e)


def _load(ref: str | Callable) -> Any:
    """``"module:name"`` -> that object (imported on first use: a stage module can take seconds to import)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class ConfigCommand(click.Command):
    """A command made from (config class, stage function, summary printer).

    Its options are the config's fields, generated when the command is first parsed or helped, so that
    ``raykd --help`` imports no stage. ``extra_params`` are options that are not config fields; the ones named
    in ``stage_params`` (``config_file`` among them, if wanted) go to the stage as keyword arguments, and all of
    them go to the summary printer: ``summary(cfg, result, **extras)``."""

    def __init__(self, name: str, *, config_class: str | type, stage: str | Callable, summary: Callable,
                 extra_params: list[click.Parameter] | None = None, stage_params: tuple[str, ...] = (), **kw):
        super().__init__(name, callback=self._run, params=list(extra_params or []), **kw)
        self._config_class, self._stage, self.summary = config_class, stage, summary
        self.stage_params = stage_params
        self._generated = False

    @property
    def config_class(self) -> type:
        return _load(self._config_class)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._generated:
            self._generated = True
            self.params[:0] = config.options(self.config_class)
            self.params.append(config_option())
        return super().get_params(ctx)

    def build(self, config_file: str | None, params: dict) -> Any:
        """The config from the dataclass defaults, ``config_file`` and the parsed ``params`` given."""
        return config.build(self.config_class, config_file, **config.flags_of(self.config_class, params))

    def _run(self, config_file: str | None = None, **params: Any) -> None:
        cfg = run_stage(self.build, config_file, params)
        fields = config.flags_of(self.config_class, params)
        extras = {k: v for k, v in params.items() if k not in fields}
        stage_kw = {k: v for k, v in {**extras, "config_file": config_file}.items() if k in self.stage_params}
        result = run_stage(_load(self._stage), cfg, **stage_kw)
        self.summary(cfg, result, **extras)


def _echo_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="raykd")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level logs (sets RAYKD_VERBOSE=1 for Ray workers too).")
def main(verbose: bool) -> None:
    """raykd: cross-architecture knowledge distillation for neural passage ranking, on Ray.

    Every command's options come from its stage config (see docs/cli.md); precedence: flag given >
    --config FILE > default."""
    if verbose:
        os.environ["RAYKD_VERBOSE"] = "1"
        from raykd import log

        configure = getattr(log, "configure", None)
        if configure is not None:
            configure(verbose=True)


def command(name: str, **kw) -> ConfigCommand:
    """Add a ``ConfigCommand`` to ``main``."""
    cmd = ConfigCommand(name, **kw)
    main.add_command(cmd)
    return cmd


# ------------------------------------------------------------------------------------------------ summaries
def _counts(cfg, manifest) -> None:
    _echo_json({"out": cfg.out, "counts": manifest.counts})


def _counts_and_stats(cfg, manifest) -> None:
    _echo_json({"out": cfg.out, "counts": manifest.counts, "stats": manifest.stats})


def score_summary(cfg, manifest) -> None:
    _echo_json({"out": cfg.out, "counts": manifest.counts,
                "forward_passes": manifest.stats["forward_passes_total"],
                "naive_forward_passes": manifest.stats["naive_forward_passes"],
                "padded_over_real": round(manifest.stats["padded_over_real"], 4)})


def _write_sample(spec, out: str) -> dict:
    from raykd.sample import write_sample

    return write_sample(out, spec)


def _export_nrkd(cfg) -> int:
    from raykd.errors import UserError
    from raykd.stages.score import export_nrkd

    if not cfg.scores or not cfg.out:
        raise UserError("export-nrkd needs --scores URI and --out FILE")
    return export_nrkd(cfg.scores, cfg.out, cfg.teacher)


def evaluate_summary(cfg, results: dict, as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    from raykd.report import markdown

    click.echo(markdown(results, list(cfg.metrics)), nl=False)


def _demo_summary(cfg, summary: dict) -> None:
    click.echo(summary["markdown"])
    click.echo(f"report: {cfg.out.rstrip('/')}/report (report.md, metrics.json, efficiency.png, demo.json)")


# ------------------------------------------------------------------------------------------------ commands
sample = command(
    "sample", config_class="raykd.sample:SampleSpec", stage=_write_sample, stage_params=("out",),
    extra_params=[click.Option(["--out"], required=True, help="Where to write the raw files (local path or s3:// URI).")],
    summary=lambda spec, counts, out: _echo_json({"out": out, "files": counts}),
    help="Write the embedded MS MARCO-shaped sample (collection, queries, qrels, id triples) as raw tsv files.")

prepare = command(
    "prepare", config_class="raykd.stages.prepare:PrepareConfig", stage="raykd.stages.prepare:prepare",
    summary=_counts,
    help="Turn raw inputs (MS MARCO tsv or a BEIR folder) into the text store: Parquet keyed by integer ids.")

score = command(
    "score", config_class="raykd.stages.score:ScoreConfig", stage="raykd.stages.score:score", summary=score_summary,
    help="Score training triples with a teacher ensemble (Ray Data actor pools, exactly once, resumable).")

export_nrkd = command(
    "export-nrkd", config_class="raykd.stages.score:ExportNrkdConfig", stage=_export_nrkd,
    summary=lambda cfg, lines: click.echo(json.dumps({"out": cfg.out, "lines": lines})),
    help="Write a scores output as Hofstätter's NRKD tsv: pos_score, neg_score, qid, pos_pid, neg_pid.")

import_nrkd = command(
    "import-nrkd", config_class="raykd.stages.score:ImportNrkdConfig", stage="raykd.stages.score:import_nrkd",
    summary=_counts, help="Turn an NRKD teacher tsv into a scores output that `raykd train` reads without scoring.")

import_scores = command(
    "import-scores", config_class="raykd.stages.score:ImportScoresConfig", stage="raykd.stages.score:import_scores",
    summary=_counts,
    help="Turn a published teacher-score file (NRKD tsv, sentence-transformers' pickle + hard negatives, "
         "lightonai lists) into a scores output that `raykd train` reads without scoring.")

export_scores = command(
    "export-scores", config_class="raykd.stages.score:ExportScoresConfig", stage="raykd.stages.score:export_scores",
    summary=lambda cfg, rows: click.echo(json.dumps({"out": cfg.out, "rows": rows})),
    help="Write a scores output as a published teacher-score file: NRKD tsv, sentence-transformers' score "
         "pickle, or lightonai lists.")

train = command(
    "train", config_class="raykd.stages.train:TrainConfig", stage="raykd.stages.train:train",
    summary=_counts_and_stats,
    help="Distil a student from teacher scores on Ray Train (DDP); resumable with the same --out. Loss options "
         "as --loss-option KEY=VALUE (e.g. tct: --loss-option tau=0.25 --loss-option mode=inbatch).")

mine = command(
    "mine", config_class="raykd.stages.mine:MineConfig", stage="raykd.stages.mine:mine", summary=_counts_and_stats,
    help="Mine hard negatives from a run and qrels into id triples and n-way groups (a named triples set of the "
         "store, or --out URI), optionally dropping likely false negatives by teacher scores.")

index = command(
    "index", config_class="raykd.stages.index:IndexConfig", stage="raykd.stages.index:index", summary=_counts,
    help="Encode passages into sharded Faiss indexes (resumable; see docs/retrieval.md).")

search = command(
    "search", config_class="raykd.stages.search:SearchConfig", stage="raykd.stages.search:search",
    summary=_counts_and_stats, help="Retrieve top-k runs: dense (--index), --bm25, re-rank (--rerank), --hybrid.")

evaluate = command(
    "evaluate", config_class="raykd.stages.evaluate:EvaluateConfig", stage="raykd.stages.evaluate:evaluate",
    extra_params=[JSON_OPTION], summary=evaluate_summary,
    help="Compute trec_eval-exact metrics of runs (mean and per query).")

demo = command(
    "demo", config_class="raykd.stages.demo:DemoConfig", stage="raykd.stages.demo:demo", summary=_demo_summary,
    help="Run the whole pipeline on the embedded sample and print the results table.\n\n"
         "sample -> prepare -> fine-tune two teachers -> score (ensemble) -> train students (Margin-MSE, "
         "labels-only baseline, ColBERT, TCT-ColBERT) -> index (sharded, merged) -> search (BM25, dense, re-rank, "
         "hybrid) -> evaluate -> report under OUT/report.")


if __name__ == "__main__":
    sys.exit(main())
