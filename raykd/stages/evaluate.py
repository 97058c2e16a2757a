"""evaluate: runs + qrels -> trec_eval-exact metrics, mean and per query (:mod:`raykd.metrics`), and a report.

Runs are TREC files or search output URIs (whose manifests also give per-query latency for the report).
Qrels are a TREC/BEIR qrels file, or a text store's split (``data`` + ``split``). A run is read as an Arrow table
(a search output's run.parquet, with the scores its run.trec prints) and evaluated a block of queries at a time.
A document twice for a query is an error naming the file and line (or run.parquet's row); with a store, so is
a document that is not in its corpus (a run of another collection would
otherwise score silently low); with a plain qrels file an unjudged document counts as non-relevant, as in
trec_eval. Run queries without qrels are left out of the mean and listed; see :mod:`raykd.metrics`.

Output under ``out`` (optional)::

    metrics.json       {run name: {mean, num_queries, queries_without_qrels, ..., latency_ms, per_query}}
    per_query.parquet  run string, query_id string, measure string, value float64
    report.md          markdown table of runs (means and ms/query)
    efficiency.png     ms/query against the first measure, one point per run (TCT-ColBERT's figure)
    manifest.json      stage "evaluate"; written last
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from raykd import finished, metrics, storage
from raykd.config import field
from raykd.errors import UserError
from raykd.formats import trec
from raykd.log import get_logger
from raykd.runs import checked_run, corpus_ids, query_blocks, run_file, store_qrels

log = get_logger("evaluate")
FORMAT = "raykd.evaluation"
VERSION = 1


@dataclass
class EvaluateConfig:
    SECTION = "evaluate"

    run: list[str] = field([], help="Run(s): TREC files or search output URIs.")
    qrels: str | None = field(None, help="Qrels file (TREC 4-column or BEIR tsv).")
    data: str | None = field(None, help="Text store whose --split qrels to use (instead of --qrels).")
    split: str | None = field(None, help="Split of --data.")
    metrics: list[str] = field(list(metrics.DEFAULT_MEASURES), help="Measures (ir-measures or trec_eval names).",
                               comma=True)
    complete: bool = field(False, help="Count qrels queries missing from a run as 0 (trec_eval -c).",
                           flag="--complete/--judged-only")
    out: str | None = field(None, help="Write metrics.json, per_query.parquet, report.md, efficiency.png here.", fingerprint=False)
    names: list[str] = field([], help="Display names of the runs (unset: from their paths).")
    overwrite: bool = field(False, help="Replace an existing output made with other settings instead of refusing.",
                            fingerprint=False)


def _run_name(uri: str) -> str:
    base = uri.rstrip("/")
    name = os.path.basename(base)
    if name in ("run.trec", "run") or storage.has_manifest(base):
        name = os.path.basename(os.path.dirname(base)) if name == "run.trec" else name
    return name


def _latency(uri: str) -> dict | None:
    if storage.has_manifest(uri):
        m = storage.read_manifest(uri)
        return m.get("stats", {}).get("latency_ms")
    return None


def load_qrels(cfg: EvaluateConfig) -> tuple[dict, object | None]:
    if cfg.qrels and cfg.data:
        raise UserError("give --qrels FILE or --data STORE --split NAME, not both")
    if cfg.qrels:
        if not storage.exists(cfg.qrels):
            raise UserError(f"qrels {cfg.qrels} does not exist")
        return trec.read_qrels(cfg.qrels), None
    if cfg.data and cfg.split:
        from raykd.formats.store import TextStore

        store = TextStore(cfg.data)
        return store_qrels(store, cfg.split), store
    raise UserError("evaluate needs --qrels FILE or --data STORE --split NAME")


def evaluate(cfg: EvaluateConfig) -> dict:
    """``{run name: Evaluation dict (+ latency_ms)}``; writes the report files when ``cfg.out`` is set."""
    if not cfg.run:
        raise UserError("evaluate needs at least one --run")
    if cfg.names and len(cfg.names) != len(cfg.run):
        raise UserError(f"{len(cfg.names)} --names for {len(cfg.run)} runs")
    t0 = time.time()
    claim = None
    if cfg.out:
        claim = finished.claim(cfg.out, "evaluate", finished.fingerprint(
            cfg, **{"run.created_at": [finished.input_identity(u) for u in cfg.run],
                    "data.created_at": finished.input_identity(cfg.data)}), cfg.overwrite)
        if claim.finished:
            log.info("%s already holds this evaluation; nothing to do", cfg.out)
            return json.loads(storage.read_bytes(storage.join(cfg.out, "metrics.json")))
    qrels, store = load_qrels(cfg)
    corpus = corpus_ids(store) if store is not None else None
    results: dict = {}
    for i, uri in enumerate(cfg.run):
        path = run_file(uri)
        # an Arrow table, checked by Arrow lookups, evaluated a block of queries at a time: no whole-run dict
        run = checked_run(uri, corpus, where=store.uri if store is not None else "")
        ev = metrics.evaluate_blocks(query_blocks(run), qrels, list(cfg.metrics), complete=cfg.complete)
        if ev.queries_without_qrels:
            log.warning("%s: %d run queries have no qrels and are left out (e.g. %s)", path,
                        len(ev.queries_without_qrels), ", ".join(ev.queries_without_qrels[:3]))
        name = cfg.names[i] if cfg.names else _run_name(uri)
        if name in results:
            name = f"{name}#{i}"
        results[name] = {**ev.to_dict(), "run": uri, "latency_ms": _latency(uri)}
    if claim is not None:
        _write(cfg, results, time.time() - t0, claim.fingerprint)
    return results


def _write(cfg: EvaluateConfig, results: dict, seconds: float, fingerprint: dict) -> None:
    from raykd import report

    rows = [(name, q, m, float(v)) for name, r in results.items() for q, vals in r["per_query"].items()
            for m, v in vals.items()]
    storage.write_parquet_atomic(
        pa.table({"run": [r[0] for r in rows], "query_id": [r[1] for r in rows], "measure": [r[2] for r in rows],
                  "value": pa.array([r[3] for r in rows], pa.float64())}),
        storage.join(cfg.out, "per_query.parquet"),
    )
    storage.write_bytes_atomic(storage.join(cfg.out, "metrics.json"), json.dumps(results, indent=2).encode())
    storage.write_bytes_atomic(storage.join(cfg.out, "report.md"), report.markdown(results, list(cfg.metrics)).encode())
    storage.write_bytes_atomic(storage.join(cfg.out, "efficiency.png"), report.efficiency_png(results, cfg.metrics[0]))
    storage.write_manifest(
        cfg.out, "evaluate", format=FORMAT, format_version=VERSION, config=dataclasses.asdict(cfg),
        inputs={"run": list(cfg.run), "qrels": cfg.qrels or f"{cfg.data}#{cfg.split}"},
        counts={"runs": len(results)},
        parts=["metrics.json", "per_query.parquet", "report.md", "efficiency.png"],
        timings={"total_seconds": round(seconds, 3)},
        fingerprint=fingerprint,
    )
