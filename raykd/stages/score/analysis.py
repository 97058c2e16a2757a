"""Analysis: the per-teacher (and ensemble) score distributions of a finished scoring, as the paper's analysis
of teacher output ranges: ``analysis/teacher_scores.json`` (count, mean, std, min, max, percentiles of
positive, negative, all and margin) and ``analysis/teacher_scores.png`` (histograms)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from raykd import storage
from raykd.formats import scores as fmt


def summarize(values: np.ndarray) -> dict:
    """Distribution summary of scores (the paper's analysis of teacher output ranges)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"count": 0}
    q = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return {
        "count": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
        "max": float(v.max()), **{f"p{k}": float(x) for k, x in zip((1, 5, 25, 50, 75, 95, 99), q)},
    }


def analysis_memory(n_triples: int, n_teachers: int) -> int:
    """Bytes :func:`teacher_score_analysis` holds at most for ``n_triples`` scored triples, which the stage asks
    Ray for when it runs it in a task: the float32 score columns it reads (ensemble pos, neg, margin and pos,
    neg per teacher), ~64 bytes a triple of working copies for one series at a time (its pos and neg as
    numpy, their concatenation, the float64 casts and percentile's sorted copy, the margin), and 512 MiB for
    the interpreter, pyarrow and matplotlib. MS MARCO's 39.8M triples with three teachers: ~4.2 GiB."""
    return n_triples * (4 * (3 + 2 * n_teachers) + 64) + (512 << 20)


def teacher_score_analysis(out: str, names: list[str], part_uris: list[str], bins: int) -> dict:
    """Per-teacher (and ensemble) score summaries, and a histogram PNG, into ``out/analysis/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["pos_score", "neg_score", "margin"] + [fmt.teacher_column(s, n) for n in names for s in ("pos", "neg")]
    t = pa.concat_tables([storage.read_parquet(u, columns=cols) for u in part_uris])
    summary: dict = {}
    series = [(n, fmt.teacher_column("pos", n), fmt.teacher_column("neg", n)) for n in names]
    series.append(("ensemble", "pos_score", "neg_score"))
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (n, pc_, nc_) in zip(axes[0], series):
        ps = t[pc_].to_numpy(zero_copy_only=False)
        ns = t[nc_].to_numpy(zero_copy_only=False)
        summary[n] = {"pos": summarize(ps), "neg": summarize(ns), "all": summarize(np.concatenate([ps, ns])),
                      "margin": summarize(ps - ns)}
        lo, hi = float(min(ps.min(), ns.min())), float(max(ps.max(), ns.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        ax.hist(ps, bins=edges, alpha=0.6, label="positive")
        ax.hist(ns, bins=edges, alpha=0.6, label="negative")
        ax.set_title(n)
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("pairs in triples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes_atomic(storage.join(out, "analysis", "teacher_scores.png"), buf.getvalue())
    storage.write_bytes_atomic(storage.join(out, "analysis", "teacher_scores.json"), json.dumps(summary, indent=2).encode())
    return summary
