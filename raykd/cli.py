"""The ``raykd`` command line: thin drivers. Each command parses its flags, builds the stage's config
(defaults < ``--config FILE`` < flags given) and calls the stage function. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from raykd import __version__, config

CONFIG_OPTION = click.option(
    "--config", "config_file", type=click.Path(), default=None, help="YAML file of options; flags override it."
)


def _fail(e: Exception) -> None:
    raise click.ClickException(f"{type(e).__name__}: {e}") from e


def run_stage(fn, cfg):
    """Call a stage; turn expected user errors into a clean one-line CLI error (exit code 1)."""
    from raykd.errors import UserError

    try:
        return fn(cfg)
    except (UserError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        _fail(e)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="raykd")
def main() -> None:
    """raykd: cross-architecture knowledge distillation for neural passage ranking, on Ray."""


# ------------------------------------------------------------------------------------------------ sample
@main.command()
@click.option("--out", required=True, help="Where to write the raw files (local path or s3:// URI).")
@click.option("--seed", type=int, default=None, help="Random seed (default 13).")
@click.option("--train-queries", type=int, default=None, help="Number of training queries (default 200).")
@click.option("--dev-queries", type=int, default=None, help="Number of dev queries with qrels (default 100).")
@click.option("--passages", type=int, default=None, help="Number of passages (default 4000).")
@click.option("--negatives", type=int, default=None, help="Negatives per training query in the triples (default 100).")
@click.option("--text-triples/--no-text-triples", default=None, help="Also write text triples (triples.train.small.tsv).")
@CONFIG_OPTION
def sample(out, seed, train_queries, dev_queries, passages, negatives, text_triples, config_file):
    """Write the embedded MS MARCO-shaped sample (collection, queries, qrels, id triples) as raw tsv files."""
    from raykd.sample import SampleSpec, write_sample

    spec = config.build(
        SampleSpec,
        config_file,
        seed=seed,
        train_queries=train_queries,
        dev_queries=dev_queries,
        passages=passages,
        negatives=negatives,
        text_triples=text_triples,
    )
    counts = write_sample(out, spec)
    click.echo(json.dumps({"out": out, "files": counts}, indent=2))


# ------------------------------------------------------------------------------------------------ prepare
@main.command()
@click.option("--msmarco", default=None, help="Folder with MS MARCO's official file names (collection.tsv, ...).")
@click.option("--beir", default=None, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")
@click.option("--out", default=None, help="Output URI of the text store (local path or s3://).")
@click.option(
    "--queries",
    "extra_queries",
    multiple=True,
    help="Extra query split as SPLIT=FILE (tsv qid<TAB>text, e.g. dl19=topics.dl19-passage.txt). Repeatable.",
)
@click.option(
    "--qrels",
    "extra_qrels",
    multiple=True,
    help="Extra qrels as SPLIT=FILE (TREC 4-column or tsv). Repeatable.",
)
@click.option("--triples", default=None, help="A triples file to use instead of the folder's (id or text triples).")
@click.option("--part-rows", type=int, default=None, help="Rows per Parquet part of the corpus and triples.")
@click.option("--lenient/--strict", default=None, help="Lenient: quarantine bad rows (counted in the manifest) instead of failing.")
@CONFIG_OPTION
def prepare(msmarco, beir, out, extra_queries, extra_qrels, triples, part_rows, lenient, config_file):
    """Turn raw inputs (MS MARCO tsv or a BEIR folder) into the text store: Parquet keyed by integer ids."""
    from raykd.stages.prepare import PrepareConfig
    from raykd.stages.prepare import prepare as run

    cfg = config.build(
        PrepareConfig,
        config_file,
        msmarco=msmarco,
        beir=beir,
        out=out,
        extra_queries=extra_queries,
        extra_qrels=extra_qrels,
        triples=triples,
        part_rows=part_rows,
        lenient=lenient,
    )
    manifest = run_stage(run, cfg)
    click.echo(json.dumps({"out": cfg.out, "counts": manifest.counts}, indent=2))


def _not_yet(name: str):
    def cmd(**_kw):
        raise click.ClickException(f"`raykd {name}` is not available yet in this version")

    return cmd


# ------------------------------------------------------------------------------------------------ score
# (placeholder until the score stage lands)
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def score(config_file):
    """Score training triples with a teacher ensemble (not available yet)."""
    _not_yet("score")()


@main.command("export-nrkd", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def export_nrkd(config_file):
    """Write a scores output as Hofstätter's NRKD tsv (not available yet)."""
    _not_yet("export-nrkd")()


@main.command("import-nrkd", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def import_nrkd(config_file):
    """Turn an NRKD teacher tsv into a scores output (not available yet)."""
    _not_yet("import-nrkd")()


# ------------------------------------------------------------------------------------------------ train
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def train(config_file):
    """Distil a student on Ray Train (not available yet)."""
    _not_yet("train")()


# ------------------------------------------------------------------------------------------------ index
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def index(config_file):
    """Encode passages into sharded Faiss indexes (not available yet)."""
    _not_yet("index")()


# ------------------------------------------------------------------------------------------------ search
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def search(config_file):
    """Retrieve top-k runs: dense, BM25, re-rank, hybrid (not available yet)."""
    _not_yet("search")()


# ------------------------------------------------------------------------------------------------ evaluate
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def evaluate(config_file):
    """Compute trec_eval-exact metrics of a run (not available yet)."""
    _not_yet("evaluate")()


# ------------------------------------------------------------------------------------------------ demo
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@CONFIG_OPTION
def demo(config_file):
    """Run the whole pipeline on the embedded sample (not available yet)."""
    _not_yet("demo")()


if __name__ == "__main__":
    sys.exit(main())
