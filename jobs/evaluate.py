"""Search a split and evaluate it: `raykd search` then `raykd evaluate` as one Ray job.

    ray job submit --working-dir . -- python jobs/evaluate.py --data URI --split NAME --out URI \
        (--index URI | --bm25 | --rerank RUN --scorer PATH | --hybrid --dense RUN --sparse RUN [--alpha A]) \
        [--k 1000] [--metrics nDCG@10,RR@10,R@1000]

Every flag but --metrics goes to `raykd search` (see `raykd search --help`). The run is then evaluated on the
split's qrels in the store; metrics.json, report.md and efficiency.png are written to OUT/eval and the table
is printed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd import storage  # noqa: E402
from raykd.cli import evaluate as evaluate_command  # noqa: E402
from raykd.cli import search as search_command  # noqa: E402


def _pop(args: list[str], flag: str) -> str | None:
    if flag in args:
        i = args.index(flag)
        value = args[i + 1]
        del args[i : i + 2]
        return value
    return None


def main(argv: list[str]) -> None:
    args = list(argv)
    measures = _pop(args, "--metrics")
    search_command.main(args=args, prog_name="evaluate.py", standalone_mode=False)
    out = args[args.index("--out") + 1]
    data = args[args.index("--data") + 1]
    split = args[args.index("--split") + 1] if "--split" in args else "test"
    eval_args = ["--run", out, "--data", data, "--split", split, "--out", storage.join(out, "eval")]
    if measures:
        eval_args += ["--metrics", measures]
    evaluate_command.main(args=eval_args, prog_name="evaluate.py")


if __name__ == "__main__":
    main(sys.argv[1:])
