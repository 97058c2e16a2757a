"""Build a sharded dense index: the `index` stage as a Ray job.

    ray job submit --working-dir . -- python jobs/build_index.py --data URI --encoder NAME_OR_PATH \
        [--pooling cls|mean] [--normalize] [--max-length N] --shards N [--factory FAISS_FACTORY] [--merge] --out URI

The flags are IndexConfig's fields, generated as for `raykd index` (see `--help`, docs/cli.md and
docs/retrieval.md). On a GPU cluster give each encoder actor a GPU: `--actors <GPUs> --actor-gpus 1`.
"""

from __future__ import annotations

import os
import sys

# a Ray job's working dir is not on sys.path for `python jobs/...`; make `raykd` importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raykd.cli import index as command  # noqa: E402

if __name__ == "__main__":
    command.main(args=sys.argv[1:], prog_name="build_index.py")
