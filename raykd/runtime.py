"""Connecting to Ray: one place for every stage.

``init_ray()`` joins the cluster named by ``RAY_ADDRESS`` (what ``ray job submit`` sets for a job's driver),
or starts a local one. A local cluster advertises at least 4 logical CPUs even on a 2-core machine: stages give
actors and Ray Train workers fractional CPUs, but Ray Data's own read and listing tasks ask for a whole CPU,
and on 2 logical CPUs a training run with 2 workers plus its data pipeline would wait forever for one.
Storage settings (endpoint, region; never credentials) and the console settings (:mod:`raykd.log`) reach the
workers through the job's runtime env. Ray Data's own progress bars are on when stderr is a terminal; in a log
file they would print a block of lines every few seconds, so there raykd's own progress lines stand in.
"""

from __future__ import annotations

import logging
import os
import sys

from raykd import log, storage


def init_ray(progress_bars: bool | None = None) -> None:
    """Connect to (or start) Ray once per process; a no-op when already connected. ``progress_bars``: Ray
    Data's bars on or off (default: on when stderr is a terminal)."""
    import ray

    if ray.is_initialized():
        return
    log.configure()
    # the driver's "ray" logger; Ray's INFO lines come back with --verbose
    kwargs: dict = {"logging_level": logging.INFO if log.is_verbose() else logging.WARNING}
    if not os.environ.get("RAY_ADDRESS"):
        env = {**log.worker_env(), **storage.worker_env()}
        # a job submitted with `ray job submit` already has its runtime env (Ray refuses to merge a second
        # one that sets the same variables); a local cluster gets the driver's storage and console settings here
        kwargs["runtime_env"] = {"env_vars": env, "worker_process_setup_hook": "raykd.log.configure"}
        kwargs["address"] = "local"
        kwargs["num_cpus"] = max(4, os.cpu_count() or 1)
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    log.filter_worker_logs()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() if progress_bars is None else progress_bars
    log.quiet_ray_loggers()  # after `import ray.data`, which installs its own console handler
