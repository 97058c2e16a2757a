"""Distil a student: the `train` stage as a Ray job.

    ray job submit --working-dir . -- python jobs/train_student.py --data URI --scores URI \
        --student bert_dot|bert_cat|colbert|prettr|tk --init NAME_OR_PATH --loss margin_mse|mse|ranknet|labels|tct \
        --out URI [--workers N --use-gpu --batch-size B --steps S --lr LR --checkpoint-every N ...]

The flags are TrainConfig's fields, generated as for `raykd train` (see `--help`, docs/cli.md and
docs/train.md). Submitting the same command again after the driver died resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys

# a Ray job's working dir is not on sys.path for `python jobs/...`; make `raykd` importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd.cli import train as command  # noqa: E402

if __name__ == "__main__":
    command.main(args=sys.argv[1:], prog_name="train_student.py")
