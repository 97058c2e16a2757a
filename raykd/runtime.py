"""Connecting to Ray: one place for every stage.

``init_ray()`` joins the cluster named by ``RAY_ADDRESS`` (what ``ray job submit`` sets for a job's driver),
or starts a local one. A local cluster advertises at least 4 logical CPUs even on a 2-core machine: stages give
actors and Ray Train workers fractional CPUs, but Ray Data's own read and listing tasks ask for a whole CPU,
and on 2 logical CPUs a training run with 2 workers plus its data pipeline would wait forever for one.
Storage settings (endpoint, region; never credentials) reach the workers through the job's runtime env.
"""

from __future__ import annotations

import os

from raykd import storage


def init_ray(progress_bars: bool | None = None) -> None:
    """Connect to (or start) Ray once per process; a no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {}
    if not os.environ.get("RAY_ADDRESS"):
        env = storage.worker_env()
        # a job submitted with `ray job submit` already has its runtime env (Ray refuses to merge a second
        # one that sets the same variables); a local cluster gets the driver's storage settings here
        kwargs["runtime_env"] = {"env_vars": env} if env else None
        kwargs["address"] = "local"
        kwargs["num_cpus"] = max(4, os.cpu_count() or 1)
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    if progress_bars is not None:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = progress_bars
