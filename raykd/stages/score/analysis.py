"""Analysis: the per-teacher (and ensemble) score distributions of a finished scoring, as the paper's analysis
of teacher output ranges: ``analysis/teacher_scores.json`` (count, mean, std, min, max, percentiles of
positive, negative, all and margin) and ``analysis/teacher_scores.png`` (histograms); with a normalised
ensemble, each teacher before and after normalisation. Ray-free: the stage runs it in a Ray task."""

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


def analysis_memory(n_triples: int, n_teachers: int, normalized: bool = False) -> int:
    """Bytes :func:`teacher_score_analysis` holds at most for ``n_triples`` scored triples, which the stage asks
    Ray for when it runs it in a task: the float32 score columns it reads (ensemble pos, neg, margin and pos,
    neg per teacher), ~64 bytes a triple of working copies for one series at a time (its pos and neg as
    numpy, their concatenation, the float64 casts and percentile's sorted copy, the margin), and 512 MiB for
    the interpreter, pyarrow and matplotlib. MS MARCO's 39.8M triples with three teachers: ~4.2 GiB. A normalised
    run also holds a series' normalised pos and neg (float64) while it is summarised: 32 bytes a triple more."""
    return n_triples * (4 * (3 + 2 * n_teachers) + 64 + (32 if normalized else 0)) + (512 << 20)


def _series_summary(ps: np.ndarray, ns: np.ndarray) -> dict:
    return {"pos": summarize(ps), "neg": summarize(ns), "all": summarize(np.concatenate([ps, ns])),
            "margin": summarize(ps - ns)}


def _histogram(ax, ps: np.ndarray, ns: np.ndarray, bins: int, title: str, xlabel: str) -> None:
    lo, hi = float(min(ps.min(), ns.min())), float(max(ps.max(), ns.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    ax.hist(ps, bins=edges, alpha=0.6, label="positive")
    ax.hist(ns, bins=edges, alpha=0.6, label="negative")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)


def teacher_score_analysis(out: str, names: list[str], part_uris: list[str], bins: int, normalization: str = "none",
                           stats: dict[str, dict] | None = None) -> dict:
    """Per-teacher (and ensemble) score summaries, and a histogram PNG, into ``out/analysis/``. With a
    ``normalization`` other than ``none`` (and the run's ``stats`` per teacher, ScoreStats dicts) each teacher is
    also summarised (``<teacher>.normalized``) and drawn after normalisation: a second row of histograms on the
    scale the ensemble averages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raykd.ensemble import ScoreStats, normalize

    cols = ["pos_score", "neg_score", "margin"] + [fmt.teacher_column(s, n) for n in names for s in ("pos", "neg")]
    t = pa.concat_tables([storage.read_parquet(u, columns=cols) for u in part_uris])
    summary: dict = {}
    series = [(n, fmt.teacher_column("pos", n), fmt.teacher_column("neg", n)) for n in names]
    series.append(("ensemble", "pos_score", "neg_score"))
    normalized = normalization != "none" and stats is not None
    rows = 2 if normalized else 1
    fig, axes = plt.subplots(rows, len(series), figsize=(4.2 * len(series), 3.2 * rows), squeeze=False)
    for i, (n, pc_, nc_) in enumerate(series):
        ps = t[pc_].to_numpy(zero_copy_only=False)
        ns = t[nc_].to_numpy(zero_copy_only=False)
        summary[n] = _series_summary(ps, ns)
        raw_label = "score" if n == "ensemble" or not normalized else "raw score"
        _histogram(axes[0][i], ps, ns, bins, n if n != "ensemble" or not normalized else f"ensemble ({normalization})",
                   raw_label)
        if normalized and n != "ensemble":
            st = ScoreStats.from_dict(stats[n])
            zp, zn = normalize(ps, st, normalization), normalize(ns, st, normalization)
            summary[n]["normalized"] = _series_summary(zp, zn)
            _histogram(axes[1][i], zp, zn, bins, f"{n} ({normalization})", f"{normalization} score")
    if normalized:
        axes[1][-1].axis("off")  # the ensemble is already on the normalised scale (top row)
        for row in axes:
            row[0].set_ylabel("pairs in triples")
    axes[0][0].set_ylabel("pairs in triples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes_atomic(storage.join(out, "analysis", "teacher_scores.png"), buf.getvalue())
    storage.write_bytes_atomic(storage.join(out, "analysis", "teacher_scores.json"), json.dumps(summary, indent=2).encode())
    return summary
