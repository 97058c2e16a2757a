"""raykd's console: one logging setup for the driver and every Ray worker, and periodic progress lines.

``configure(verbose=False)`` (idempotent; ``RAYKD_VERBOSE=1`` means verbose) gives the ``raykd`` loggers one
handler on stderr, one format, INFO and up. By default it also silences the noise of the libraries under raykd
(docs/cluster.md, "The console", lists each kind and where it comes from):

- transformers: its own INFO/WARNING chatter, the ``LOAD REPORT`` tables of ``from_pretrained`` and its tqdm
  bars (``TRANSFORMERS_VERBOSITY=error``, ``HF_HUB_DISABLE_PROGRESS_BARS=1``, inherited by Ray workers);
- Ray's Python loggers on the driver (``ray``, ``ray.data``, ``ray.train``, ...) below WARNING, and the known
  messages of :data:`NOISE` at any level;
- what Ray forwards from its workers to the driver (``log_to_driver``): lines of :data:`NOISE`, and lines of
  Ray's own internal actors (:data:`RAY_INTERNAL_ACTORS`) that carry no error; raykd's lines from its actors
  and Ray Train workers, and every error, still pass.

``configure(verbose=True)`` undoes all of it: everything Ray and transformers print comes back.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
DATEFMT = "%H:%M:%S"
VERBOSE_ENV = "RAYKD_VERBOSE"

# Messages that are noise at whatever level their library logs them, and where each comes from.
NOISE = re.compile("|".join([
    # ray.train PlacementGroupCleaner, a WARNING every few seconds of every run while the State API warms up
    r"Failed to query Ray Train Controller actor state",
    # core_worker.cc ERROR for every Ray Data actor pool and Ray Train's PreemptionWatcher: Ray itself puts
    # their constructor arguments in the object store and asks for restarts
    r"has constructor arguments in the object store and max_restarts > 0",
    # ray.data WARNINGs about its own progress UI, printed when raykd turns Ray Data's bars off (non-TTY)
    r"Progress bars (for operators )?disabled\. To enable",
    r"A new progress UI is available",
    r"Progress will be logged because stdout is a non-interactive terminal",
    # transformers' report of weights a new model initialises (a student's new head); raykd checks teachers
    r"LOAD REPORT",
    # a deprecation inside Ray Train's own DatasetManager, nothing a raykd user can change
    r"RayDeprecationWarning: `ExecutionOptions.exclude_resources`",
    r"self\.exclude_resources = exclude_resources",
]))

# Ray's internal actors: their lines are Ray's bookkeeping unless they report an error
RAY_INTERNAL_ACTORS = ("TrainController", "PlacementGroupCleaner", "SplitCoordinator", "DatasetManager",
                       "AutoscalingRequester", "_StatsActor", "PreemptionWatcher")
_ERROR = re.compile(r"Error|Exception|Traceback|FATAL")

_state: dict = {"verbose": None}


def is_verbose() -> bool:
    """Whether the console shows everything (``RAYKD_VERBOSE=1`` or ``configure(verbose=True)``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "no")


class NoiseFilter(logging.Filter):
    """Drops records of :data:`NOISE`, unless raykd is verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_verbose():
            return True
        try:
            return not NOISE.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
            return True


def configure(verbose: bool = False) -> None:
    """Set up raykd's console in this process (driver or Ray worker); idempotent. ``verbose`` (or the env var
    ``RAYKD_VERBOSE=1``) shows everything Ray and transformers print."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    loud = is_verbose()
    root = logging.getLogger("raykd")
    if not any(getattr(h, "_raykd", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler._raykd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # once on the console, never again through a root handler (Ray Train's)
    if _state["verbose"] == loud and _state.get("train") == ("ray.train.v2._internal.execution.context" in sys.modules):
        return
    _state["verbose"], _state["train"] = loud, "ray.train.v2._internal.execution.context" in sys.modules
    _configure_transformers(loud)
    if not loud:
        quiet_ray_loggers()
    # Ray Train's worker logs every report (the whole metrics dict) at INFO, under a logger named by file
    # path that its LoggingConfig does not reach; raykd logs its own step lines
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.INFO if loud else logging.WARNING)


def _configure_transformers(loud: bool) -> None:
    if loud:
        for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
            if os.environ.get(key) == worker_env(False).get(key):
                os.environ.pop(key, None)
    else:
        for key, value in worker_env(False).items():
            os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # already imported: the env vars were read; set it directly
        import transformers

        if loud:
            transformers.logging.set_verbosity_warning()
            transformers.logging.enable_progress_bar()
        else:
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()


def worker_env(loud: bool | None = None) -> dict[str, str]:
    """Environment variables that give a Ray worker the same console settings as this process."""
    loud = is_verbose() if loud is None else loud
    if loud:
        return {VERBOSE_ENV: "1"}
    return {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_ray_loggers() -> None:
    """Ray's Python loggers in this process: console handlers at WARNING, :data:`NOISE` dropped. Call again
    after ``import ray.data`` and ``ray.init`` (each installs its own handlers)."""
    if is_verbose():
        return
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logger = logging.getLogger(name)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
                if not any(isinstance(f, NoiseFilter) for f in h.filters):
                    h.addFilter(NoiseFilter())


def ray_train_logging():
    """Ray Train's ``RunConfig(logging_config=...)``: its controller's and workers' INFO lines with --verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")


def worker_lines(lines: list[str], actor: str | None = None) -> list[str]:
    """The lines a Ray worker printed that are not noise: :data:`NOISE` messages go, and so do Ray's internal
    actors' lines unless they report an error (then the whole batch stays: a traceback is kept whole)."""
    lines = [ln for ln in lines if not NOISE.search(ln)]
    if actor and actor.startswith(RAY_INTERNAL_ACTORS) and not any(_ERROR.search(ln) for ln in lines):
        return []
    return lines


def filter_worker_logs() -> None:
    """Filter the worker lines Ray forwards to this driver (``log_to_driver``) through :func:`worker_lines`,
    unless verbose. Call after ``ray.init``; a no-op when Ray prints no worker lines here."""
    if is_verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: its lines pass unfiltered
        return
    with dispatcher._lock:
        for i, (name, handle) in enumerate(dispatcher.handlers):
            if name != "ray_print_logs" or getattr(handle, "_raykd", False):
                continue

            def filtered(data: dict, handle=handle) -> None:
                actor = data.get("actor_name") or data.get("task_name") or ""
                lines = worker_lines(data.get("lines", []), actor)
                if lines:
                    handle({**data, "lines": lines})

            filtered._raykd = True  # type: ignore[attr-defined]
            dispatcher.handlers[i] = (name, filtered)


def get_logger(name: str) -> logging.Logger:
    """The logger of a raykd stage (``raykd.<name>``), with the console configured."""
    configure()
    return logging.getLogger(f"raykd.{name}")


class Progress:
    """Counts work and logs ``what: N done (rate/s)`` at most every ``every`` seconds, and once at the end."""

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, every: float = 5.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.n = 0
        self.start = self._last = time.time()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.time()
        if now - self._last >= self.every:
            self._last = now
            self._log(now)

    def _log(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        self.logger.info("%s: %s%s (%.0f/s)", self.what, f"{self.n:,}", of, rate)

    def close(self) -> float:
        now = time.time()
        self._log(now)
        return now - self.start
