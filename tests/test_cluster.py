"""The cluster: cluster.yaml passes Ray's own checks, the stage configs in configs/ build, and the scoring job
autoscales on Ray's fake multinode cluster.

The autoscaling test is the real thing on one machine: ``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=tests/fake_cluster.yaml`` runs Ray's autoscaler with its fake node provider, whose "nodes"
are extra raylets on this machine (subclassed in tests/fake_provider/ so that each node unpacks the job's
working_dir into a folder of its own, as on separate disks: docs/cluster.md). ``ray job submit --working-dir .``
ships the checkout and runs ``jobs/score_teachers.py``. As on cluster.yaml's AWS cluster, the head offers no CPU and no GPU to tasks, so
the job's tasks and teacher actors can only run on the (min 0) worker type. The test watches the worker nodes
come up from zero, the job succeed with every triple scored, and the nodes go away when idle; then the same
job writes to S3 (the moto server).

The head gets its own temp dir and ports, and the teardown ends exactly the processes of that cluster (found
by its temp dir and ports), never other Ray clusters on the machine (`ray stop --force` would end them all).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CONFIGS = ROOT / "configs"
SCORE_JOB = "jobs/score_teachers.py"


def _ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _validate_like_ray_up(cfg: dict) -> dict:
    """What ``ray up`` does to a cluster config before it calls the cloud: the JSON schema, then Ray's own
    defaults-filling and validation. Returns the prepared config."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, _ray_schema())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


# ------------------------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_validates_against_ray_schema_and_ray_validation():
    cfg = _load(ROOT / "cluster.yaml")
    prepared = _validate_like_ray_up(cfg)

    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [n for n, t in types.items() if n != prepared["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and cpu, "one autoscaling GPU worker type and a CPU worker type"
    assert gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    # the custom resource the stage configs ask for exists only on GPU workers, one per GPU
    assert gpu[0]["resources"]["teacher_gpu"] == gpu[0]["resources"]["GPU"]
    assert all("teacher_gpu" not in t["resources"] for t in types.values() if not t["resources"].get("GPU"))
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    # raykd is installed on every node (setup_commands reach head and workers after prepare_config)
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "raykd" in c for c in prepared[key]), key


def test_cluster_validation_rejects_broken_configs():
    """The validation above can fail: a node type without resources, and min_workers above max_workers."""
    import jsonschema

    cfg = _load(ROOT / "cluster.yaml")
    no_resources = copy.deepcopy(cfg)
    del no_resources["available_node_types"]["gpu.worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        _validate_like_ray_up(no_resources)

    too_many = copy.deepcopy(cfg)
    too_many["available_node_types"]["gpu.worker"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _validate_like_ray_up(too_many)


def test_fake_cluster_yaml_validates():
    """The fake config is complete as written (prepare_config cannot fill it: the wheel lacks the fake
    provider's example.yaml defaults), so: the schema and Ray's validation as they are."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = _load(ROOT / "tests" / "fake_cluster.yaml")
    cfg["provider"]["gcs_address"] = "127.0.0.1:6379"
    jsonschema.validate(cfg, _ray_schema())
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types["ray.head.default"]["resources"] == {"CPU": 0, "GPU": 0}, "no task or actor fits on the head"
    assert types["gpu.worker"]["min_workers"] == 0 and types["gpu.worker"]["resources"]["GPU"] >= 1


# ------------------------------------------------------------------------------------------- configs/


def _stage_classes() -> dict:
    """Stage config dataclasses by their config-file section name."""
    from raykd.stages.evaluate import EvaluateConfig
    from raykd.stages.index import IndexConfig
    from raykd.stages.prepare import PrepareConfig
    from raykd.stages.score import ScoreConfig
    from raykd.stages.search import SearchConfig
    from raykd.stages.train import TrainConfig

    classes = (PrepareConfig, ScoreConfig, TrainConfig, IndexConfig, SearchConfig, EvaluateConfig)
    return {cls.SECTION: cls for cls in classes}


CONFIG_FILES = sorted(str(p.relative_to(CONFIGS)) for d in ("msmarco-t2", "fake-cluster", "laptop")
                      for p in (CONFIGS / d).glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_stage_configs_build(name):
    """Every file in configs/{msmarco-t2,fake-cluster,laptop} holds one stage section that builds that stage's
    config dataclass (raykd.config.build refuses unknown options)."""
    from raykd import config

    path = CONFIGS / name
    sections = _load(path)
    classes = _stage_classes()
    assert len(sections) == 1 and set(sections) <= set(classes), f"{name}: one section of {sorted(classes)}"
    (section,) = sections
    cfg = config.build(classes[section], str(path))
    if name.startswith("msmarco-t2/"):
        uris = [v for v in (getattr(cfg, k, None) for k in ("data", "out", "scores", "msmarco")) if v]
        assert uris and all(u.startswith("s3://") for u in uris), f"{name}: full-scale runs read and write S3"
    if section == "score":
        if name.startswith("msmarco-t2/"):
            assert len(cfg.teachers) == 3 and cfg.gpus_per_actor == 1  # the T2 ensemble, one GPU per actor
        elif name.startswith("fake-cluster/"):  # worker nodes offer logical GPUs, as GPU nodes on AWS do
            assert cfg.gpus_per_actor == 1 and 0 < cfg.cpus_per_actor < 1
        else:
            assert cfg.gpus_per_actor == 0 and 0 < cfg.cpus_per_actor < 1  # whole CPUs hang Ray on 2 cores


def test_config_dirs_cover_the_three_places():
    assert any(n.startswith("msmarco-t2/score") for n in CONFIG_FILES)
    assert any(n.startswith("fake-cluster/score") for n in CONFIG_FILES)
    assert any(n.startswith("laptop/score") for n in CONFIG_FILES)


# ------------------------------------------------------------------------------------------- fake cluster


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, cmd)
    return table


def _cluster_pids(marks: list[str]) -> list[int]:
    """Processes of one Ray cluster: those whose command line names its temp dir or one of its ports, and all
    their descendants (workers, agents, job drivers)."""
    table = _proc_table()
    roots = {pid for pid, (_, cmd) in table.items() if any(m in cmd for m in marks) and pid != os.getpid()}
    found, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return sorted(found)


def _end_cluster(marks: list[str]) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _cluster_pids(marks)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and _cluster_pids(marks):
            time.sleep(0.2)


class FakeCluster:
    """A running fake multinode cluster: its addresses, and how to look at its nodes."""

    def __init__(self, tmp: str, gcs_port: int, dashboard_port: int, env: dict):
        self.tmp, self.gcs_port, self.dashboard_port, self.env = tmp, gcs_port, dashboard_port, env
        self.address = f"http://127.0.0.1:{dashboard_port}"

    def alive_workers(self) -> list[dict]:
        """Alive nodes other than the head, with their resources (Ray's state API over the dashboard)."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return [{"id": n.node_id, "resources": n.resources_total} for n in nodes if not n.is_head_node]

    def submit(self, args: list[str], timeout: float = 420) -> tuple[subprocess.CompletedProcess, dict]:
        """``ray job submit --working-dir . -- python jobs/score_teachers.py ARGS``, blocking, while sampling the
        worker nodes once a second. Returns the finished process and what was seen."""
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", self.address, "--working-dir", str(ROOT),
               "--", "python", SCORE_JOB, *args]
        log = open(os.path.join(self.tmp, f"job-{uuid.uuid4().hex[:6]}.log"), "w+")
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        seen = {"max_workers": 0, "first_worker_s": None, "worker_resources": []}
        while proc.poll() is None:
            if time.time() - t0 > timeout:
                proc.kill()
                break
            try:
                workers = self.alive_workers()
            except Exception:  # the dashboard can be briefly busy; the next sample counts
                workers = []
            if workers and seen["first_worker_s"] is None:
                seen["first_worker_s"] = round(time.time() - t0, 1)
            if len(workers) > seen["max_workers"]:
                seen["max_workers"] = len(workers)
                seen["worker_resources"] = [w["resources"] for w in workers]
            time.sleep(1.0)
        proc.wait()
        seen["job_s"] = round(time.time() - t0, 1)
        log.seek(0)
        out = log.read()
        log.close()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, ""), seen

    def wait_no_workers(self, timeout: float = 180) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if not self.alive_workers():
                return time.time() - t0
            time.sleep(1.0)
        raise AssertionError(f"worker nodes still alive {timeout:.0f} s after the job: {self.alive_workers()}")


@pytest.fixture(scope="module")
def fake_cluster(s3_server):
    """A fake multinode Ray cluster with an autoscaler (head: no CPU, no GPU; workers: 2 CPUs, 2 logical GPUs,
    min 0).
    Started after the S3 server, so the head, the autoscaled nodes and the job drivers inherit its endpoint
    and keys from their environment, as nodes on AWS get theirs from the instance role."""
    tmp = tempfile.mkdtemp(prefix="rkfc-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    gcs, dash, client, agent = _free_ports(4)
    cfg = _load(ROOT / "tests" / "fake_cluster.yaml")
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    cfg_path = os.path.join(tmp, "fake_cluster.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    env = dict(os.environ)
    env.update(
        RAY_FAKE_CLUSTER="1",
        RAY_AUTH_MODE="disabled",  # a local ray.init() elsewhere may have written ~/.ray/auth_token
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the job entrypoint is this venv's
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        # the head's autoscaler imports the provider (fake_cluster.yaml); its folder holds nothing else
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "tests" / "fake_provider"), env.get("PYTHONPATH")) if p),
    )
    env.pop("RAY_ADDRESS", None)
    marks = [tmp, f"--port={client}"]
    start = [
        str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        f"--dashboard-port={dash}", "--include-dashboard=true", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", "--min-worker-port=0", "--max-worker-port=0",
        "--num-cpus=0", "--num-gpus=0", "--object-store-memory=150000000",
        f"--temp-dir={tmp}", f"--autoscaling-config={cfg_path}", "--disable-usage-stats",
    ]
    try:
        r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"ray start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        cluster = FakeCluster(tmp, gcs, dash, env)
        deadline = time.time() + 60
        while True:  # the job server answers once the dashboard is up
            try:
                from ray.job_submission import JobSubmissionClient

                JobSubmissionClient(cluster.address).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1.0)
        yield cluster
    finally:
        _end_cluster(marks)
        shutil.rmtree(tmp, ignore_errors=True)


def _score_args(store: str, teachers: list[str], out: str) -> list[str]:
    args = ["--config", "configs/fake-cluster/score.yaml", "--data", store, "--out", out]
    for t in teachers:
        args += ["--teacher", t]
    return args


def _check_scores(out: str, store: str, teachers: list[str]) -> dict:
    """The job's output is complete: a finished manifest, and one finite score row for every distinct triple
    of the store (the stage drops exact duplicate triples and counts them)."""
    import numpy as np

    from raykd import storage
    from raykd.formats.scores import TripleScores
    from raykd.formats.store import TextStore

    text_store = TextStore(store)
    keys = ["qid", "pos_pid", "neg_pid"]
    triples = storage.read_parquet(text_store.triples_uri, columns=keys)
    distinct = triples.group_by(keys).aggregate([])
    manifest = storage.read_manifest(out)
    assert manifest["complete"] is True and manifest["stage"] == "score"
    assert manifest["counts"]["triples_in"] == triples.num_rows == text_store.manifest["counts"]["triples"]
    assert manifest["counts"]["triples"] == distinct.num_rows
    scores = TripleScores(out)
    table = scores.table([*keys, "pos_score", "neg_score"])
    assert table.num_rows == distinct.num_rows
    assert table.group_by(keys).aggregate([]).num_rows == distinct.num_rows, "no triple scored twice"
    assert distinct.join(table.select(keys), keys, join_type="left anti").num_rows == 0, "no triple left out"
    assert len(scores.teachers) == len(teachers)
    assert np.isfinite(table["pos_score"].to_numpy()).all() and np.isfinite(table["neg_score"].to_numpy()).all()
    return manifest


@pytest.fixture(scope="module")
def teachers(tiny_models) -> list[str]:
    return [tiny_models("bert", "cross_encoder", seed=1), tiny_models("bert", "cross_encoder", seed=2)]


@pytest.mark.slow
def test_scoring_job_autoscales_gpu_workers_from_zero_and_back(fake_cluster, sample_store, teachers, tmp_path):
    if not (ROOT / SCORE_JOB).exists():
        pytest.fail(f"{SCORE_JOB} is missing: the job this test submits")
    assert fake_cluster.alive_workers() == [], "the cluster starts with the head only"
    out = str(tmp_path / "scores")

    done, seen = fake_cluster.submit(_score_args(sample_store, teachers, out))
    print(f"\nfake cluster, local out: {json.dumps(seen)}")
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:]

    # the job's tasks and actors asked for resources only workers have: the autoscaler started them from zero
    assert seen["max_workers"] >= 1, done.stdout[-2000:]
    assert all(r.get("GPU", 0) >= 1 and r.get("teacher_gpu") == r.get("GPU") for r in seen["worker_resources"])
    _check_scores(out, sample_store, teachers)

    # idle workers go away (idle_timeout_minutes: 0.25 in tests/fake_cluster.yaml)
    gone_s = fake_cluster.wait_no_workers()
    print(f"workers gone {gone_s:.1f} s after the job")


@pytest.mark.slow
def test_scoring_job_writes_to_s3_on_the_fake_cluster(fake_cluster, sample_store, teachers, s3_uri):
    """The same job with --out s3://...: the nodes reach the moto server through their environment (the
    head's, inherited by autoscaled nodes and job drivers), as AWS nodes reach S3 through their role."""
    if not (ROOT / SCORE_JOB).exists():
        pytest.fail(f"{SCORE_JOB} is missing: the job this test submits")
    out = f"{s3_uri}/scores"
    done, seen = fake_cluster.submit(_score_args(sample_store, teachers, out))
    print(f"\nfake cluster, s3 out: {json.dumps(seen)}")
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:]
    assert seen["max_workers"] >= 1
    manifest = _check_scores(out, sample_store, teachers)
    # no secret reached the job's output or its manifest
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in done.stdout and secret not in json.dumps(manifest)
