"""Reports of evaluated runs: a markdown table, and an efficiency-effectiveness PNG in the manner of the
TCT-ColBERT paper's figure (x: query latency in ms/query, log scale; y: effectiveness; one labelled point per
run). Input: what :func:`raykd.stages.evaluate.evaluate` returns ({run name: {mean, num_queries, latency_ms}})."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

LATENCY_PARTS = ("query_encoding", "search", "rerank", "fusion", "total")


def markdown(results: Mapping[str, Mapping], measures: Sequence[str]) -> str:
    """One row per run: the mean of each measure (4 decimals, as trec_eval prints), queries, ms/query."""
    parts = [p for p in LATENCY_PARTS if any((r.get("latency_ms") or {}).get(p) is not None for r in results.values())]
    head = ["run", *measures, "queries", *[f"{p} ms/q" for p in parts]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        lat = r.get("latency_ms") or {}
        cells = [name, *[f"{r['mean'][m]:.4f}" for m in measures], str(r["num_queries"])]
        cells += [f"{lat[p]:.2f}" if lat.get(p) is not None else "" for p in parts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def efficiency_png(results: Mapping[str, Mapping], measure: str) -> bytes:
    """PNG bytes: total ms/query (log x) against ``measure``; runs without latency are listed, not plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    missing = []
    for name, r in results.items():
        total = (r.get("latency_ms") or {}).get("total")
        if not total:
            missing.append(name)
            continue
        y = r["mean"][measure]
        ax.scatter([total], [y], s=30)
        ax.annotate(name, (total, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.set_xlabel("query latency (ms/query, log scale)")
    ax.set_ylabel(measure)
    ax.set_title("efficiency vs effectiveness")
    ax.grid(True, which="both", alpha=0.3)
    if missing:
        ax.text(0.01, 0.01, "no latency: " + ", ".join(missing), transform=ax.transAxes, fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
