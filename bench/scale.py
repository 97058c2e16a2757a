"""The full-size rehearsal: raykd's stages on a synthetic MS MARCO at fractions of full size, measuring the data
plane (time, throughput, memory) and how it grows with the work.

    .venv/bin/python bench/scale.py --fractions 0.001,0.01 [--stages sample,prepare,texts,score,train]
        [--train-steps 50] [--score-max-triples 20000] [--root /tmp/raykd-scale] [--keep] [--out scale.json]
    .venv/bin/python bench/scale.py --fractions 0.001,0.01
        --stages sample,prepare,index,search_dense,search_bm25,search_rerank,search_hybrid,evaluate
        [--index-shards 2] [--search-k 1000] [--rerank-k 20] [--tune-queries 50] [--torch-threads 1]

For each fraction F (1.0: MS MARCO's 8,841,823 passages and 39,780,811 id triples) the stages run one after
another in this process, which is the driver, as under ``ray job submit``:

``sample``   ``raykd.sample.write_sample(preset="msmarco-full", scale=F)``; work: rows written (passages + triples)
``prepare``  ``raykd.stages.prepare.prepare``; work: rows (passages + triples)
``texts``    ``TextStore.passage_lookup()`` over the whole corpus in this process, then ``--lookup-batches``
             random batches of 1,024 pids through ``TextLookup.texts``; work: passages
``score``    ``raykd.stages.score.score`` with one tiny BERT_CAT teacher (1 layer, hidden 64: the data plane is
             what is measured); work: triples scored
``train``    ``raykd.stages.train.train``: a tiny BERT_DOT, Margin-MSE, ``--train-steps`` steps at batch 32 on 2
             workers; work: triples seen
``index``    ``raykd.stages.index.index``: the tiny BERT_DOT (untrained: the data plane is what is measured) encodes
             the whole corpus into a ``--index-shards``-shard Flat index; work: passages
``search_dense``   ``search(SearchConfig(index=...))`` of the dev split's 6,980 x F queries, top ``--search-k``;
             work: queries (and so for every search stage)
``search_bm25``    ``search(SearchConfig(bm25=True))``: builds the BM25 index (a Ray task), then retrieves
``search_rerank``  the BM25 run's top ``--rerank-k`` re-scored by the tiny BERT_CAT teacher
``search_hybrid``  dense + BM25 fused, alpha tuned on ``--tune-queries`` train queries (their dense and BM25
             runs made there from the index and the saved BM25 index)
``evaluate`` ``raykd.stages.evaluate.evaluate`` of every run the fraction has against the dev qrels; work:
             queries, summed over the runs

A stage whose input is missing (say ``--stages search_dense`` alone) stops with a message naming the stage to
run first; with ``--keep`` a fraction's outputs stay for a later invocation to reuse.

Defaults (50 steps; score and train on the first 20,000 triples of each fraction, ``--score-max-triples 0`` for
all of them) are sized for a 2-core machine: see docs/scale.md for what ran and how long it took.

A stage is one entry in ``STAGES`` (name, unit, callable returning its work count, the tiny models it uses). Ray
is shut down after every stage, so each Ray stage starts (and is measured) from a fresh local cluster, as a job
would be.

A sampler thread reads ``/proc`` every ``--sample-s`` seconds: the USS (private memory: Private_Clean +
Private_Dirty of ``smaps_rollup``) of this process, the USS of every Ray worker process started below it
(command line with ``ray::`` or ``default_worker.py``), the largest shared-memory RSS (RssShmem) of any of these
processes (the object store's pages that one process has mapped and touched: a lower bound of the object store's
use, which no USS counts), and the CPU
time (user + system) of this process and every process below it. Peaks are per stage; a process that lives less
than one sampling interval can be missed. The tiny models' tokenizer holds the msmarco-full lexicon's 50,000
words, so a passage is ~one token a word (MS MARCO: ~76 WordPiece tokens a passage; here ~56).

Prints a markdown table (and ``--out`` JSON); last line:
``scale: driver_peak_gb=X worker_peak_gb=Y growth=Z`` with X, Y the peaks over the stages of the largest fraction
and Z the largest, over stages, of (time ratio / work ratio) between the two largest fractions (``na`` with one
fraction): 1 is linear, below 1 is fixed costs amortised, above 1 is worse than linear.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

GB = 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------------
# memory and CPU of this process and its Ray processes, from /proc


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # the process exited between listing and reading
        return None


def _uss(pid: int) -> int | None:
    """Private memory (bytes) of ``pid``: what would be freed if it exited."""
    text = _read(f"/proc/{pid}/smaps_rollup")
    if text is None:
        return None
    kb = 0
    for line in text.splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
            kb += int(line.split()[1])
    return kb * 1024


def _status_kb(pid: int, key: str) -> int:
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system) of ``pid``."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


def _descendants(root: int) -> dict[int, float]:
    """Every process below ``root`` with its CPU seconds."""
    parent, cpu = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _stat(int(name))
            if s is not None:
                parent[int(name)], cpu[int(name)] = s
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = cpu[pid]
        todo.extend(children.get(pid, []))
    return out


def _cmdline(pid: int) -> str:
    return (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")


@dataclass
class Peaks:
    driver_uss: int = 0
    worker_uss: int = 0
    worker_cmd: str = ""
    workers_seen: int = 0
    object_store_shm: int = 0
    cpu_s: float = 0.0  # this process and every process below it, over the stage (sampled)


class Sampler:
    """A background thread keeping the peaks of the current stage (see the module docstring)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.me = os.getpid()
        self.peaks = Peaks()
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._workers: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scale-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def begin_stage(self) -> None:
        with self._lock:
            self.peaks = Peaks()
            self._workers = set()
            self._cpu_start = {self.me: _stat(self.me)[1], **_descendants(self.me)}
            self._cpu_last = dict(self._cpu_start)
        self.sample()

    def end_stage(self) -> Peaks:
        self.sample()
        with self._lock:
            p = dataclasses.replace(self.peaks)
            # a process that started during the stage counts from 0, one that was there from its start value
            p.cpu_s = sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu_last.items())
            p.workers_seen = len(self._workers)
        return p

    def sample(self) -> None:
        procs = _descendants(self.me)
        driver_uss = _uss(self.me) or 0
        worker_uss, worker_cmd, shm = 0, "", 0
        workers = []
        for pid in [self.me, *procs]:
            shm = max(shm, _status_kb(pid, "RssShmem") * 1024)
            cmd = _cmdline(pid)
            if "ray::" in cmd or "default_worker.py" in cmd:
                u = _uss(pid) or 0
                workers.append(pid)
                if u > worker_uss:
                    worker_uss, worker_cmd = u, cmd.split(" ")[0] if cmd.startswith("ray::") else "default_worker"
        with self._lock:
            pk = self.peaks
            pk.driver_uss = max(pk.driver_uss, driver_uss)
            if worker_uss > pk.worker_uss:
                pk.worker_uss, pk.worker_cmd = worker_uss, worker_cmd
            pk.object_store_shm = max(pk.object_store_shm, shm)
            self._workers.update(workers)
            self._cpu_last[self.me] = _stat(self.me)[1]
            self._cpu_last.update(procs)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


# ---------------------------------------------------------------------------------------------------------
# the stages: each takes the fraction's Rehearsal and returns its work count


@dataclass
class Rehearsal:
    fraction: float
    root: str
    args: argparse.Namespace
    notes: dict = field(default_factory=dict)  # per stage: extra figures for the table and the JSON

    @property
    def raw(self) -> str:
        return f"{self.root}/raw"

    @property
    def store(self) -> str:
        return f"{self.root}/store"

    @property
    def scores(self) -> str:
        return f"{self.root}/scores"

    @property
    def index(self) -> str:
        return f"{self.root}/index"

    @property
    def bm25_index(self) -> str:
        return f"{self.root}/bm25-index"

    def run(self, name: str) -> str:
        """A search stage's output (dense, bm25, rerank, hybrid)."""
        return f"{self.root}/run-{name}"

    def model(self, kind: str) -> str:
        """A tiny BERT (teacher: cross-encoder; student: encoder) whose tokenizer knows the preset's words."""
        from raykd.sample import full_lexicon
        from raykd.tiny import build_tiny_model

        path = f"{self.args.root}/models/{kind}"
        if not os.path.exists(f"{path}/config.json"):
            head = "cross_encoder" if kind == "teacher" else "encoder"
            layers = 1 if kind == "teacher" else 2
            build_tiny_model(path, arch="bert", head=head, hidden=64, layers=layers, heads=2, intermediate=128,
                             words=full_lexicon())
        return path

    def need(self, uri: str, stage: str) -> None:
        if not os.path.exists(f"{uri}/manifest.json") and not os.path.exists(f"{uri}/collection.tsv"):
            raise SystemExit(f"{uri} is missing: run the {stage} stage first (--stages {stage},...) with --keep")


def run_sample(r: Rehearsal) -> int:
    from raykd.sample import SampleSpec, write_sample

    counts = write_sample(r.raw, SampleSpec(preset="msmarco-full", scale=r.fraction))
    r.notes["sample"] = {"passages": counts["collection.tsv"], "triples": counts["qidpidtriples.train.small.tsv"],
                         "tsv_gb": _du(r.raw) / GB}
    return counts["collection.tsv"] + counts["qidpidtriples.train.small.tsv"]


def run_prepare(r: Rehearsal) -> int:
    from raykd.stages.prepare import PrepareConfig, prepare

    r.need(r.raw, "sample")
    m = prepare(PrepareConfig(msmarco=r.raw, out=r.store, overwrite=True))
    passages, triples = int(m.counts["corpus"]), int(m.counts["triples"])
    r.notes["prepare"] = {"passages": passages, "triples": triples, "parquet_gb": _du(r.store) / GB}
    return passages + triples


def run_texts(r: Rehearsal) -> int:
    from raykd.formats.store import TextStore

    r.need(r.store, "prepare")
    t0 = time.perf_counter()
    lookup = TextStore(r.store).passage_lookup()
    build_s = time.perf_counter() - t0
    ids = lookup.ids()
    rng = np.random.default_rng(0)
    t1 = time.perf_counter()
    n = 0
    for _ in range(r.args.lookup_batches):
        batch = rng.choice(ids, size=1024)
        n += len(lookup.texts(batch))
    lookup_s = time.perf_counter() - t1
    r.notes["texts"] = {"blocks": len(lookup.blocks), "text_gb": lookup.nbytes / GB,
                        "largest_block_mb": max(b.nbytes for b in lookup.blocks) / 2**20,
                        "build_s": round(build_s, 2), "lookup_ids_per_s": round(n / max(lookup_s, 1e-9))}
    return len(lookup)


def run_score(r: Rehearsal) -> int:
    from raykd.stages.score import ScoreConfig, score

    r.need(r.store, "prepare")
    data = _score_slice(r) if r.args.score_max_triples else r.store
    m = score(ScoreConfig(data=data, teachers=[r.model("teacher")], out=r.scores, overwrite=True))
    c, s = m.counts, m.stats
    r.notes["score"] = {"triples": c["triples"], "forward_passes": s.get("forward_passes_total"),
                        "model_loads": s.get("model_loads"), "sliced": data != r.store}
    return int(c["triples"])


def run_train(r: Rehearsal) -> int:
    from raykd.stages.train import TrainConfig, train

    if not os.path.exists(f"{r.scores}/manifest.json"):
        raise SystemExit(f"{r.scores} is missing: run the score stage first (with --keep to reuse it)")
    m = train(TrainConfig(data=r.store, scores=r.scores, student="bert_dot", init=r.model("student"),
                          loss="margin_mse", steps=r.args.train_steps, batch_size=32, workers=2,
                          checkpoint_every=r.args.train_steps, out=f"{r.root}/student", overwrite=True))
    c = m.counts
    r.notes["train"] = {"steps": c["steps"], "triples_seen": c["triples_seen"]}
    return int(c["triples_seen"])


# -- retrieval: index, search (dense, BM25, re-rank, hybrid), evaluate; on the dev split (6,980 x F queries)


def _search(r: Rehearsal, name: str, k: int = 0, **kwargs) -> int:
    """One ``search()`` call writing ``r.run(name)`` (``k`` results a query, default ``--search-k``); its
    counts and stats become the stage's notes."""
    from raykd.stages.search import SearchConfig, search

    r.need(r.store, "prepare")
    m = search(SearchConfig(data=r.store, split="dev", out=r.run(name), k=k or r.args.search_k,
                            torch_threads=r.args.torch_threads, overwrite=True, **kwargs))
    s = m.stats
    notes = {"queries": m.counts["queries"], "results": m.counts["results"], "k": m.counts["k"],
             "ms_per_query": s.get("latency_ms", {})}
    if "bm25_build" in s:
        b = s["bm25_build"]
        notes["bm25_build"] = {"passages": b["passages"], "build_s": b["build_seconds"],
                               "index_mb": round(b["bytes"] / 2**20, 1),
                               "task_peak_rss_gb": round(b["peak_rss_bytes"] / GB, 3)}
    if "bm25_retrieve_peak_rss_bytes" in s:
        notes["bm25_retrieve_peak_rss_gb"] = round(s["bm25_retrieve_peak_rss_bytes"] / GB, 3)
    if "alpha" in s:
        notes["alpha"] = s["alpha"]
        notes["tune_queries"] = s.get("alpha_tuning", {}).get("queries")
    r.notes[f"search_{name}"] = notes
    return int(m.counts["queries"])


def run_index(r: Rehearsal) -> int:
    from raykd.stages.index import IndexConfig, index

    r.need(r.store, "prepare")
    m = index(IndexConfig(data=r.store, encoder=r.model("student"), out=r.index, shards=r.args.index_shards,
                          factory="Flat", actors=1, torch_threads=r.args.torch_threads, overwrite=True))
    s = m.stats
    r.notes["index"] = {"passages": m.counts["passages"], "shards": m.counts["shards"], "dim": m.counts["dim"],
                        "index_gb": _du(r.index) / GB, "driver_bytes": s.get("driver_bytes"),
                        "encode_s": s.get("encode_seconds"), "build_s": s.get("build_seconds"),
                        "encode_per_s": s.get("passages_per_second"), "padding": s.get("padding_fraction"),
                        "dtype": s.get("encode_dtype")}
    return int(m.counts["passages"])


def run_search_dense(r: Rehearsal) -> int:
    r.need(r.index, "index")
    return _search(r, "dense", index=r.index, search_cpus=0.5)


def run_search_bm25(r: Rehearsal) -> int:
    return _search(r, "bm25", bm25=True, bm25_index=r.bm25_index, bm25_workers=2)


def run_search_rerank(r: Rehearsal) -> int:
    r.need(r.run("bm25"), "search_bm25")
    return _search(r, "rerank", k=r.args.rerank_k, rerank=r.run("bm25"), scorer=r.model("teacher"))


def run_search_hybrid(r: Rehearsal) -> int:
    """Dense + BM25 fused (TCT Eq. 7), alpha tuned on ``--tune-queries`` train queries whose dense and BM25
    runs are made here from the index and the saved BM25 index."""
    for name, stage in (("dense", "search_dense"), ("bm25", "search_bm25")):
        r.need(r.run(name), stage)
    r.need(r.index, "index")
    return _search(r, "hybrid", hybrid=True, dense=r.run("dense"), sparse=r.run("bm25"), index=r.index,
                   bm25_index=r.bm25_index, bm25_workers=2, search_cpus=0.5, tune_split="train",
                   tune_queries=r.args.tune_queries)


def run_evaluate(r: Rehearsal) -> int:
    """Every run this fraction has, against the dev qrels; work: queries evaluated (summed over the runs)."""
    from raykd.stages.evaluate import EvaluateConfig, evaluate

    runs = [n for n in ("dense", "bm25", "rerank", "hybrid") if os.path.exists(f"{r.run(n)}/manifest.json")]
    if not runs:
        raise SystemExit(f"{r.root} holds no run: run a search stage first (--stages search_dense,...) with --keep")
    results = evaluate(EvaluateConfig(run=[r.run(n) for n in runs], data=r.store, split="dev",
                                      names=runs, out=f"{r.root}/evaluation", overwrite=True))
    r.notes["evaluate"] = {n: {"queries": x["num_queries"], "MRR@10": round(x["mean"]["MRR@10"], 4),
                               "R@1000": round(x["mean"]["R@1000"], 4)} for n, x in results.items()}
    return sum(int(x["num_queries"]) for x in results.values())


@dataclass(frozen=True)
class Stage:
    name: str
    unit: str
    run: Callable[[Rehearsal], int]
    uses_ray: bool = False
    models: tuple[str, ...] = ()  # tiny models the stage uses, built before it is timed


STAGES = [
    Stage("sample", "rows", run_sample),
    Stage("prepare", "rows", run_prepare),
    Stage("texts", "passages", run_texts),
    Stage("score", "triples", run_score, uses_ray=True, models=("teacher",)),
    Stage("train", "triples", run_train, uses_ray=True, models=("student",)),
    Stage("index", "passages", run_index, uses_ray=True, models=("student",)),
    Stage("search_dense", "queries", run_search_dense, uses_ray=True),
    Stage("search_bm25", "queries", run_search_bm25, uses_ray=True),
    Stage("search_rerank", "queries", run_search_rerank, uses_ray=True, models=("teacher",)),
    Stage("search_hybrid", "queries", run_search_hybrid, uses_ray=True),
    Stage("evaluate", "queries", run_evaluate),
]


def _du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


def _score_slice(r: Rehearsal) -> str:
    """A text store that shares the prepared corpus and queries (symlinks) but holds only the first
    ``--score-max-triples`` triples (whole queries: ~100 triples each): for fractions whose whole triple set
    would take hours to score here. Score still shares the whole corpus and checks every id against it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sliced = f"{r.root}/store-slice"
    shutil.rmtree(sliced, ignore_errors=True)
    os.makedirs(f"{sliced}/triples")
    for name in os.listdir(r.store):
        if name not in ("triples", "manifest.json", "_started.json"):
            os.symlink(f"{r.store}/{name}", f"{sliced}/{name}")
    batches, rows = [], 0
    for name in sorted(os.listdir(f"{r.store}/triples")):
        for b in pq.ParquetFile(f"{r.store}/triples/{name}").iter_batches(batch_size=65_536):
            batches.append(b.slice(0, r.args.score_max_triples - rows))
            rows += batches[-1].num_rows
            if rows >= r.args.score_max_triples:
                break
        if rows >= r.args.score_max_triples:
            break
    pq.write_table(pa.Table.from_batches(batches), f"{sliced}/triples/{sorted(os.listdir(f'{r.store}/triples'))[0]}")
    with open(f"{r.store}/manifest.json") as f:
        manifest = json.load(f)
    manifest["counts"]["triples"] = rows
    with open(f"{sliced}/manifest.json", "w") as f:
        json.dump(manifest, f)
    return sliced


# ---------------------------------------------------------------------------------------------------------
# the harness


def run_fraction(fraction: float, stages: list[Stage], args, sampler: Sampler) -> list[dict]:
    root = f"{args.root}/f{fraction:g}"
    os.makedirs(root, exist_ok=True)
    r = Rehearsal(fraction, root, args)
    rows = []
    for stage in stages:
        print(f"\n=== fraction {fraction:g}: {stage.name}", flush=True)
        for kind in stage.models:
            r.model(kind)  # built outside the timed stage
        sampler.begin_stage()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        try:
            if stage.uses_ray:
                _start_ray()
            work = stage.run(r)
            wall = time.perf_counter() - t0
        finally:
            _shutdown_ray()
        pk = sampler.end_stage()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {
            "fraction": fraction,
            "stage": stage.name,
            "unit": stage.unit,
            "work": int(work),
            "wall_s": round(wall, 4),
            "per_s": round(work / max(wall, 1e-9), 1),
            "driver_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
            "all_cpu_s": round(pk.cpu_s, 2),
            "driver_peak_gb": round(pk.driver_uss / GB, 3),
            "worker_peak_gb": round(pk.worker_uss / GB, 3),
            "worker_peak_process": pk.worker_cmd,
            "ray_workers_seen": pk.workers_seen,
            "object_store_shm_gb": round(pk.object_store_shm / GB, 3),
            "notes": r.notes.get(stage.name, {}),
        }
        rows.append(row)
        print(f"=== {stage.name}: {json.dumps(row)}", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _start_ray(attempts: int = 4) -> None:
    """The stage's local Ray cluster, started here so that a start can be retried: Ray gives its raylet a fixed
    30 s to register, which a heavily loaded machine can miss ("The current node timed out during startup")."""
    from raykd.runtime import init_ray

    for i in range(attempts):
        try:
            init_ray(progress_bars=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            _shutdown_ray()
            if i == attempts - 1:
                raise
            print(f"ray start failed ({e}); retrying", flush=True)


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def growth(rows: list[dict], fractions: list[float], time_key: str = "wall_s") -> dict[str, float]:
    """Per stage, (time ratio / work ratio) between the two largest fractions; ``time_key="all_cpu_s"``: CPU
    time, the figure a shared machine's load disturbs least."""
    if len(fractions) < 2:
        return {}
    small, big = sorted(fractions)[-2:]
    by = {(x["fraction"], x["stage"]): x for x in rows}
    out = {}
    for (f, name), b in by.items():
        a = by.get((small, name))
        if f == big and a and a["work"] and b["work"] and a[time_key]:
            out[name] = round((b[time_key] / a[time_key]) / (b["work"] / a["work"]), 3)
    return out


def table(rows: list[dict], grow: dict[str, float], cpu_grow: dict[str, float], fractions: list[float]) -> str:
    big = max(fractions)
    head = ("| fraction | stage | work | wall s | per s | CPU s driver / all | driver USS GB | largest worker USS GB "
            "| object store GB | growth wall / CPU |")
    lines = [head, "|" + " --- |" * 10]
    for x in rows:
        g = f"{grow[x['stage']]:.2f} / {cpu_grow.get(x['stage'], float('nan')):.2f}" if (
            x["fraction"] == big and x["stage"] in grow) else ""
        lines.append(
            f"| {x['fraction']:g} | {x['stage']} | {x['work']:,} {x['unit']} | {x['wall_s']:.1f} | {x['per_s']:,.0f} "
            f"| {x['driver_cpu_s']:.1f} / {x['all_cpu_s']:.1f} | {x['driver_peak_gb']:.2f} | {x['worker_peak_gb']:.2f} "
            f"| {x['object_store_shm_gb']:.2f} | {g} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    flags = _read("/proc/cpuinfo") or ""
    mem = _status_kb_meminfo()
    return {"nproc": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "ram_gb": round(mem / 2**20, 1),
            "loadavg_start": os.getloadavg(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def _status_kb_meminfo() -> int:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", default="0.001,0.01", help="Comma-separated fractions of MS MARCO's size.")
    ap.add_argument("--stages", default=",".join(s.name for s in STAGES),
                    help=f"Comma-separated stages, from {', '.join(s.name for s in STAGES)} (run in that order).")
    ap.add_argument("--train-steps", type=int, default=50, help="Optimizer steps of the train stage (batch 32, 2 workers).")
    ap.add_argument("--score-max-triples", type=int, default=20_000,
                    help="Score (and train on) only the first N triples of a larger fraction (0: all of them).")
    ap.add_argument("--lookup-batches", type=int, default=200, help="Random batches of 1,024 pids the texts stage looks up.")
    ap.add_argument("--index-shards", type=int, default=2,
                    help="Shards of the index stage's Flat index (dense search merges their top-k).")
    ap.add_argument("--search-k", type=int, default=1000, help="Results per query of the dense, BM25 and hybrid runs.")
    ap.add_argument("--rerank-k", type=int, default=20, help="BM25 candidates a query the re-rank stage scores.")
    ap.add_argument("--tune-queries", type=int, default=50,
                    help="Train queries the hybrid stage tunes its alpha on (their dense and BM25 runs made there).")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="Torch threads of the index encoder and of search's query encoder and re-ranker (0: the "
                         "stages' defaults). 1: on this loaded 2-core machine 2 threads encoded 13x slower.")
    ap.add_argument("--root", default="/tmp/raykd-scale", help="Work folder (a sub-folder per fraction).")
    ap.add_argument("--keep", action="store_true", help="Keep each fraction's files (default: deleted after it).")
    ap.add_argument("--sample-s", type=float, default=0.5, help="Memory sampling interval (seconds).")
    ap.add_argument("--out", default="", help="Write the rows, growth and machine as JSON here.")
    args = ap.parse_args(argv)

    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(names) - {s.name for s in STAGES}
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}")
    stages = [s for s in STAGES if s.name in names]
    os.makedirs(args.root, exist_ok=True)

    info = machine()
    sampler = Sampler(args.sample_s)
    sampler.start()
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        for f in sorted(fractions):
            rows.extend(run_fraction(f, stages, args, sampler))
    finally:
        sampler.stop()
    info["loadavg_end"] = os.getloadavg()
    grow, cpu_grow = growth(rows, fractions), growth(rows, fractions, "all_cpu_s")
    big = [x for x in rows if x["fraction"] == max(fractions)]
    driver_peak = max(x["driver_peak_gb"] for x in big)
    worker_peak = max(x["worker_peak_gb"] for x in big)
    worst = max(grow.values()) if grow else None
    result = {"machine": info, "settings": vars(args), "rows": rows, "growth": grow, "cpu_growth": cpu_grow,
              "total_wall_s": round(time.perf_counter() - t0, 1),
              "summary": {"driver_peak_gb": driver_peak, "worker_peak_gb": worker_peak, "growth": worst}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print()
    print(f"machine: {info['nproc']} cores, avx512_bf16: {info['avx512_bf16']}, {info['ram_gb']} GB RAM, "
          f"load average {info['loadavg_start'][0]:.0f} -> {info['loadavg_end'][0]:.0f}; "
          f"total {result['total_wall_s']:.0f} s")
    print(table(rows, grow, cpu_grow, fractions))
    print(f"scale: driver_peak_gb={driver_peak:.3f} worker_peak_gb={worker_peak:.3f} "
          f"growth={'na' if worst is None else f'{worst:.3f}'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
