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
@main.command()
@click.option("--data", default=None, help="Text store URI (the output of `raykd prepare`), with triples.")
@click.option("--teacher", "teachers", multiple=True, help="Teacher cross-encoder (hub name or path). Repeatable.")
@click.option("--out", default=None, help="Output URI of the scores (local path or s3://).")
@click.option("--weight", "weights", multiple=True, type=float, help="Ensemble weight per --teacher, in order (default: mean).")
@click.option("--query-max-length", type=int, default=None, help="Query tokens per pair (default 30).")
@click.option("--passage-max-length", type=int, default=None, help="Passage tokens per pair (default 200).")
@click.option("--split", default=None, help="Query split the triples' qids belong to (default train).")
@click.option("--batch-size", type=int, default=None, help="Pairs per forward pass (default 64).")
@click.option("--bucket-pairs", type=int, default=None, help="Pairs per Ray Data block, sorted by length (default 2048).")
@click.option("--rows-per-part", type=int, default=None, help="Target triples per output part (default 100000).")
@click.option("--parts-per-round", type=int, default=None, help="Output parts per Ray Data round (default 16).")
@click.option("--min-actors", type=int, default=None, help="Minimum actors per teacher pool (default 1).")
@click.option("--max-actors", type=int, default=None, help="Maximum actors per teacher pool (default 2).")
@click.option("--gpus-per-actor", type=float, default=None, help="GPUs per scoring actor (default 0; 1 on GPU clusters).")
@click.option("--cpus-per-actor", type=float, default=None, help="CPUs per scoring actor (default 0.5).")
@click.option("--torch-threads", type=int, default=None, help="torch threads per CPU scoring actor (default 1).")
@click.option("--lenient/--strict", default=None, help="Lenient: quarantine bad rows (counted in the manifest) instead of failing.")
@CONFIG_OPTION
def score(config_file, **flags):
    """Score training triples with a teacher ensemble (Ray Data actor pools, exactly once, resumable)."""
    from raykd.stages.score import ScoreConfig
    from raykd.stages.score import score as run

    cfg = config.build(ScoreConfig, config_file, **flags)
    manifest = run_stage(run, cfg)
    click.echo(json.dumps({"out": cfg.out, "counts": manifest.counts,
                           "forward_passes": manifest.stats["forward_passes_total"],
                           "naive_forward_passes": manifest.stats["naive_forward_passes"],
                           "padded_over_real": round(manifest.stats["padded_over_real"], 4)}, indent=2))


@main.command("export-nrkd")
@click.option("--scores", required=True, help="A scores output (of `raykd score` or `raykd import-nrkd`).")
@click.option("--out", required=True, help="NRKD tsv to write (.gz compresses).")
@click.option("--teacher", default=None, help="Write this teacher's scores instead of the ensemble's.")
@CONFIG_OPTION
def export_nrkd(scores, out, teacher, config_file):
    """Write a scores output as Hofstätter's NRKD tsv: pos_score, neg_score, qid, pos_pid, neg_pid."""
    from raykd.stages.score import export_nrkd as run

    n = run_stage(lambda _: run(scores, out, teacher), None)
    click.echo(json.dumps({"out": out, "lines": n}))


@main.command("import-nrkd")
@click.option("--nrkd", default=None, help="NRKD tsv (e.g. the published T2 teacher scores), .gz ok.")
@click.option("--out", default=None, help="Output URI of the scores.")
@click.option("--teacher-name", default=None, help="Name for the file's teacher (default t2).")
@click.option("--rows-per-part", type=int, default=None, help="Target triples per output part (default 100000).")
@CONFIG_OPTION
def import_nrkd(nrkd, out, teacher_name, rows_per_part, config_file):
    """Turn an NRKD teacher tsv into a scores output that `raykd train` reads without scoring."""
    from raykd.stages.score import ImportNrkdConfig
    from raykd.stages.score import import_nrkd as run

    cfg = config.build(ImportNrkdConfig, config_file, nrkd=nrkd, out=out, teacher_name=teacher_name,
                       rows_per_part=rows_per_part)
    manifest = run_stage(run, cfg)
    click.echo(json.dumps({"out": cfg.out, "counts": manifest.counts}, indent=2))


# ------------------------------------------------------------------------------------------------ train
@main.command()
@click.option("--data", default=None, help="Text store URI (from `raykd prepare`).")
@click.option("--scores", default=None, help="Scores output URI (`raykd score` / `raykd import-nrkd`).")
@click.option("--student", default=None, help="bert_dot | bert_cat | colbert | prettr | tk (default bert_dot).")
@click.option("--init", default=None, help="Hub name or path the student starts from.")
@click.option("--loss", default=None, help="margin_mse | mse | ranknet | labels | tct (default margin_mse).")
@click.option("--out", default=None, help="Output URI (local or s3://): checkpoints, model/, metrics, manifest.")
@click.option("--workers", type=int, default=None, help="Ray Train workers (default 2).")
@click.option("--use-gpu/--no-gpu", "use_gpu", default=None, help="One GPU per worker, bf16 autocast.")
@click.option("--cpus-per-worker", type=float, default=None, help="CPUs per worker, fractional ok (default 0.5).")
@click.option("--batch-size", type=int, default=None, help="Triples per worker per micro-batch (default 32).")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step (default 1).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: from --epochs).")
@click.option("--epochs", type=float, default=None, help="Passes over the triples (default 1).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 7e-6).")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps (default 0).")
@click.option("--clip-norm", type=float, default=None, help="Gradient clipping max norm, 0 off (default 1.0).")
@click.option("--seed", type=int, default=None, help="Seed (default 42).")
@click.option("--checkpoint-every", type=int, default=None, help="Checkpoint every N steps (default 500).")
@click.option("--keep-checkpoints", type=int, default=None, help="Keep the last N checkpoints (default 2).")
@click.option("--validate-every", type=int, default=None, help="Validate every N steps (default: at checkpoints).")
@click.option("--val-queries", type=int, default=None, help="Validation queries, 0 off (default 100).")
@click.option("--max-failures", type=int, default=None, help="Worker failures to recover from (default 3).")
@click.option("--teacher", default=None, help="Teacher run inside the loop (losses that need one, e.g. tct).")
@click.option("--tct-mode", type=click.Choice(["none", "triplet", "inbatch"]), default=None,
              help="TCT distillation: none (labels only), triplet, inbatch (default inbatch).")
@click.option("--tau", type=float, default=None, help="TCT teacher softmax temperature (default 0.25).")
@click.option("--gamma", type=float, default=None, help="TCT weight of CE on labels; 1 - gamma on KL (default 0.1).")
@click.option("--cross-device/--no-cross-device", default=None, help="TCT in-batch negatives from every worker.")
@CONFIG_OPTION
def train(config_file, tct_mode, tau, gamma, cross_device, **flags):
    """Distil a student from teacher scores on Ray Train (DDP); resumable with the same --out."""
    from raykd.errors import UserError
    from raykd.losses.tct import cli_loss_options
    from raykd.stages.train import TrainConfig
    from raykd.stages.train import train as run

    cfg = config.build(TrainConfig, config_file, **flags)
    try:
        cfg.loss_options = cli_loss_options(cfg.loss, cfg.loss_options, tct_mode=tct_mode, tau=tau, gamma=gamma,
                                            cross_device=cross_device)
    except (UserError, ValueError) as e:
        _fail(e)
    manifest = run_stage(run, cfg)
    click.echo(json.dumps({"out": cfg.out, "counts": manifest.counts, "stats": manifest.stats}, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ index
@main.command()
@click.option("--data", default=None, help="Text store URI (made by `raykd prepare`).")
@click.option("--encoder", default=None, help="HF encoder name/path or a raykd BERT_DOT/TCT checkpoint.")
@click.option("--pooling", type=click.Choice(["cls", "mean"]), default=None, help="Pooling (default: checkpoint's, else cls).")
@click.option("--normalize/--no-normalize", default=None, help="L2-normalise vectors (default: checkpoint's, else no).")
@click.option("--max-length", type=int, default=None, help="Passage max tokens (default: checkpoint's, else 512).")
@click.option("--query-max-length", type=int, default=None, help="Query max tokens, used by search (default 64).")
@click.option("--query-prefix", default=None, help="Text put before every query.")
@click.option("--passage-prefix", default=None, help="Text put before every passage.")
@click.option("--shards", type=int, default=None, help="Number of shards (default 1).")
@click.option("--factory", default=None, help="Faiss index factory: Flat (default), IVF4096,Flat, IVF4096,PQ64, HNSW32.")
@click.option("--train-sample", type=int, default=None, help="Vectors sampled to train IVF/PQ (default 100000).")
@click.option("--merge/--no-merge", default=None, help="Also write one merged index over all shards.")
@click.option("--actors", type=int, default=None, help="Encoder actors (default 1).")
@click.option("--actor-cpus", type=float, default=None, help="Ray CPUs per actor (default 0.5).")
@click.option("--actor-gpus", type=float, default=None, help="GPUs per actor (default 0).")
@click.option("--batch-size", type=int, default=None, help="Passages per forward pass (default 32).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Encoder compute precision (default auto: bf16 on CUDA and on CPUs with native bf16, else fp32).")
@click.option("--out", default=None, help="Output URI of the index.")
@CONFIG_OPTION
def index(config_file, **flags):
    """Encode passages into sharded Faiss indexes (resumable; see docs/retrieval.md)."""
    from raykd.stages.index import IndexConfig
    from raykd.stages.index import index as run

    cfg = config.build(IndexConfig, config_file, **flags)
    manifest = run_stage(run, cfg)
    click.echo(json.dumps({"out": cfg.out, "counts": manifest.counts}, indent=2))


# ------------------------------------------------------------------------------------------------ search
@main.command()
@click.option("--data", default=None, help="Text store URI.")
@click.option("--split", default=None, help="Query split to search (default test).")
@click.option("--k", type=int, default=None, help="Results per query (default 1000).")
@click.option("--out", default=None, help="Output URI: run.trec + run.parquet + manifest.")
@click.option("--index", "index_uri", default=None, help="Dense index URI (dense retrieval).")
@click.option("--use", type=click.Choice(["auto", "merged", "shards"]), default=None, help="Merged index or shard set.")
@click.option("--nprobe", type=int, default=None, help="IVF lists probed.")
@click.option("--ef-search", type=int, default=None, help="HNSW efSearch.")
@click.option("--bm25", is_flag=True, default=None, help="BM25 retrieval (bm25s).")
@click.option("--k1", type=float, default=None, help="BM25 k1 (default 0.9).")
@click.option("--b", type=float, default=None, help="BM25 b (default 0.4).")
@click.option("--stemmer", type=click.Choice(["porter", "english", "none"]), default=None, help="BM25 stemmer.")
@click.option("--rerank", default=None, help="Candidate run to re-rank (file or search output).")
@click.option("--scorer", default=None, help="Re-rank scorer: a raykd model folder or HF cross-encoder.")
@click.option("--hybrid", is_flag=True, default=None, help="TCT Eq. 7 hybrid of --dense and --sparse.")
@click.option("--dense", default=None, help="Hybrid: dense run.")
@click.option("--sparse", default=None, help="Hybrid: sparse run.")
@click.option("--alpha", type=float, default=None, help="Hybrid alpha (unset: tuned on --tune-split).")
@click.option("--tune-split", default=None, help="Split whose qrels tune alpha (default train).")
@click.option("--tune-dense", default=None, help="Dense run of --tune-split.")
@click.option("--tune-sparse", default=None, help="Sparse run of --tune-split.")
@click.option("--tune-measure", default=None, help="Measure alpha maximises (default nDCG@10).")
@click.option("--alpha-grid", type=float, multiple=True, help="Alphas to try (repeatable).")
@click.option("--batch-size", type=int, default=None, help="Queries per encoder pass / pairs per re-rank pass.")
@click.option("--latency-queries", type=int, default=None, help="Also time N queries one at a time.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Dense query encoding precision (default: the index's).")
@click.option("--tag", default=None, help="Run tag.")
@CONFIG_OPTION
def search(config_file, index_uri, **flags):
    """Retrieve top-k runs: dense, BM25, re-rank, hybrid."""
    from raykd.stages.search import SearchConfig
    from raykd.stages.search import search as run

    cfg = config.build(SearchConfig, config_file, index=index_uri, **flags)
    manifest = run_stage(run, cfg)
    click.echo(json.dumps({"out": cfg.out, "counts": manifest.counts, "stats": manifest.stats}, indent=2))


# ------------------------------------------------------------------------------------------------ evaluate
@main.command()
@click.option("--run", "run_", multiple=True, help="Run file or search output URI (repeatable).")
@click.option("--qrels", default=None, help="Qrels file (TREC 4-column or BEIR tsv).")
@click.option("--data", default=None, help="Text store whose --split qrels to use.")
@click.option("--split", default=None, help="Split of --data.")
@click.option("--metrics", "metrics_", multiple=True, help="Measure (repeatable or comma-separated), e.g. nDCG@10.")
@click.option("--complete/--judged-only", default=None, help="Count judged queries missing from the run as 0.")
@click.option("--names", multiple=True, help="Display names of the runs (repeatable).")
@click.option("--out", default=None, help="Write metrics.json, per_query.parquet, report.md, efficiency.png here.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results (with per-query values).")
@CONFIG_OPTION
def evaluate(config_file, run_, metrics_, as_json, **flags):
    """Compute trec_eval-exact metrics of runs (mean and per query)."""
    from raykd.stages.evaluate import EvaluateConfig
    from raykd.stages.evaluate import evaluate as run

    measures = tuple(m for spec in metrics_ for m in spec.split(",") if m)
    cfg = config.build(EvaluateConfig, config_file, run=run_, metrics=measures, **flags)
    results = run_stage(run, cfg)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    from raykd.report import markdown

    click.echo(markdown(results, list(cfg.metrics)), nl=False)


# ------------------------------------------------------------------------------------------------ demo
@main.command()
@click.option("--out", default=None, help="Where every stage writes (local path or s3://; default demo-out).")
@click.option("--seed", type=int, default=None, help="Seed of the sample and of every training run.")
@click.option("--workers", type=int, default=None, help="Ray Train workers per training run (default 2).")
@click.option("--teacher-steps", type=int, default=None, help="Steps fine-tuning each teacher on the labels.")
@click.option("--student-steps", type=int, default=None, help="Steps per student.")
@click.option("--shards", type=int, default=None, help="Index shards (default 3, also merged).")
@click.option("--side-by-side", type=click.Choice(["auto", "yes", "no"]), default=None,
              help="Run independent training chains side by side (auto: when there is a core for every worker).")
@CONFIG_OPTION
def demo(out, seed, workers, teacher_steps, student_steps, shards, side_by_side, config_file):
    """Run the whole pipeline on the embedded sample and print the results table.

    sample -> prepare -> fine-tune two teachers -> score (ensemble) -> train students (Margin-MSE, labels-only
    baseline, ColBERT, TCT-ColBERT) -> index (sharded, merged) -> search (BM25, dense, re-rank, hybrid) ->
    evaluate -> report under OUT/report."""
    from raykd.stages.demo import DemoConfig
    from raykd.stages.demo import demo as run

    cfg = config.build(DemoConfig, config_file, out=out, seed=seed, workers=workers, teacher_steps=teacher_steps,
                       student_steps=student_steps, shards=shards, side_by_side=side_by_side)
    summary = run_stage(run, cfg)
    click.echo(summary["markdown"])
    click.echo(f"report: {cfg.out.rstrip('/')}/report (report.md, metrics.json, efficiency.png, demo.json)")


if __name__ == "__main__":
    sys.exit(main())
