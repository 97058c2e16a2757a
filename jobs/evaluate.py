"""Search a split and evaluate it: `raykd search` then `raykd evaluate` as one Ray job.

    ray job submit --working-dir . -- python jobs/evaluate.py --data URI --split NAME --out URI \
        (--index URI | --bm25 | --rerank RUN --scorer PATH | --hybrid --dense RUN --sparse RUN [--alpha A]) \
        [--k 1000] [--metrics nDCG@10,RR@10 --metrics R@1000]

The flags are SearchConfig's fields, generated as for `raykd search`, plus EvaluateConfig's --metrics (see
`--help` and docs/cli.md). A --config file may hold `search:` and `evaluate:` sections. The run is evaluated on
the split's qrels in the store; metrics.json, report.md and efficiency.png are written to OUT/eval and the table
is printed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd import config, storage  # noqa: E402
from raykd.cli import ConfigCommand, evaluate_summary  # noqa: E402
from raykd.stages.evaluate import EvaluateConfig  # noqa: E402


def search_then_evaluate(cfg, metrics: tuple[str, ...] | None = None, config_file: str | None = None):
    """Run the search, then evaluate its run on the split's qrels; returns (the evaluate config, results)."""
    from raykd.stages.evaluate import evaluate
    from raykd.stages.search import search

    search(cfg)
    sections = config.load_yaml(config_file)
    ecfg = config.build(EvaluateConfig, config_file if isinstance(sections.get("evaluate"), dict) else None,
                        run=[cfg.out], data=cfg.data, split=cfg.split, out=storage.join(cfg.out, "eval"),
                        metrics=metrics)
    return ecfg, evaluate(ecfg)


command = ConfigCommand(
    "evaluate.py", config_class="raykd.stages.search:SearchConfig", stage=search_then_evaluate,
    extra_params=config.options(EvaluateConfig, only=["metrics"]), stage_params=("metrics", "config_file"),
    summary=lambda cfg, result, **_: evaluate_summary(*result),
    help="Search a split (SearchConfig's flags), then evaluate the run on the split's qrels (--metrics).",
)

if __name__ == "__main__":
    command.main(args=sys.argv[1:], prog_name="evaluate.py")
