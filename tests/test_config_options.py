"""Every field of every stage config is a flag of its `raykd` command and of its job, settable from the command
line and from `--config FILE`, with its dataclass default shown once in `--help`; precedence is
flag > file > default; dict fields are `--x-option KEY=VALUE`."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from raykd import config
from raykd.cli import main
from raykd.sample import SampleSpec
from raykd.stages.demo import DemoConfig
from raykd.stages.evaluate import EvaluateConfig
from raykd.stages.index import IndexConfig
from raykd.stages.mine import MineConfig
from raykd.stages.prepare import PrepareConfig
from raykd.stages.score import (
    ExportNrkdConfig,
    ExportScoresConfig,
    ImportNrkdConfig,
    ImportScoresConfig,
    ScoreConfig,
)
from raykd.stages.search import SearchConfig
from raykd.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {"sample": SampleSpec, "prepare": PrepareConfig, "score": ScoreConfig, "export-nrkd": ExportNrkdConfig,
            "import-nrkd": ImportNrkdConfig, "import-scores": ImportScoresConfig,
            "export-scores": ExportScoresConfig, "mine": MineConfig, "train": TrainConfig, "index": IndexConfig, "search": SearchConfig,
            "evaluate": EvaluateConfig, "demo": DemoConfig}
# job -> [(config class, flag prefix, the fields it must offer (None: all))]
JOBS = {"score_teachers": [(ScoreConfig, "", None), (SampleSpec, "sample", None)],
        "train_student": [(TrainConfig, "", None)],
        "build_index": [(IndexConfig, "", None)],
        "evaluate": [(SearchConfig, "", None), (EvaluateConfig, "", ["metrics"])]}

# the command-line contract (DESIGN.md and the flags the CLI had before it was generated)
CONTRACT = {
    "sample": ["--out", "--seed", "--train-queries", "--dev-queries", "--passages", "--negatives", "--text-triples"],
    "prepare": ["--msmarco", "--beir", "--out", "--queries", "--qrels", "--triples", "--part-rows", "--lenient",
                "--strict"],
    "score": ["--data", "--teacher", "--out", "--weight", "--query-max-length", "--passage-max-length", "--split",
              "--batch-size", "--min-actors", "--max-actors", "--gpus-per-actor", "--cpus-per-actor", "--lenient",
              "--strict"],
    "export-nrkd": ["--scores", "--out", "--teacher"],
    "import-nrkd": ["--nrkd", "--out", "--teacher-name", "--rows-per-part"],
    "export-scores": ["--format", "--scores", "--out", "--teacher", "--data"],
    "import-scores": ["--format", "--scores", "--out", "--data", "--hard-negatives", "--trust-pickle", "--lenient"],
    "mine": ["--data", "--run", "--split", "--depth", "--negatives", "--out"],
    "train": ["--data", "--scores", "--student", "--init", "--loss", "--out", "--workers", "--use-gpu", "--no-gpu",
              "--cpus-per-worker", "--batch-size", "--steps", "--lr", "--teacher", "--loss-option",
              "--student-option"],
    "index": ["--data", "--encoder", "--pooling", "--normalize", "--no-normalize", "--max-length", "--shards",
              "--factory", "--merge", "--actors", "--actor-gpus", "--precision", "--out"],
    "search": ["--index", "--data", "--split", "--k", "--out", "--bm25", "--rerank", "--scorer", "--hybrid",
               "--dense", "--sparse", "--alpha", "--alpha-grid", "--nprobe"],
    "evaluate": ["--run", "--qrels", "--data", "--split", "--metrics", "--complete", "--judged-only", "--names",
                 "--json", "--out"],
    "demo": ["--out", "--seed", "--workers", "--teacher-steps", "--student-steps", "--shards", "--side-by-side"],
}


def _job(name: str) -> click.Command:
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.command


def _wide_help(cmd: click.Command) -> str:
    """``--help`` with one line per option (no wrapping)."""
    return cmd.get_help(click.Context(cmd, info_name="x", max_content_width=100_000, terminal_width=100_000))


def _param(cmd: click.Command, name: str) -> click.Option:
    ctx = click.Context(cmd, info_name="x")
    found = [p for p in cmd.get_params(ctx) if p.name == name]
    assert len(found) == 1, f"{cmd.name}: no option for field {name}"
    return found[0]


def _expected_default(f: dataclasses.Field, p: click.Option) -> str | None:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None or value == "" or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if isinstance(value, bool):
        if p.secondary_opts:
            return (p.opts[0] if value else p.secondary_opts[0]).lstrip("-")
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _flags_of_record(record: str) -> set[str]:
    """``--a / --no-a   help`` -> {"--a", "--no-a"}; ``--k INTEGER  help`` -> {"--k"}."""
    return {spec.split()[0] for spec in record.strip().split("  ")[0].split(" / ")}


def _check_fields_in_help(cmd: click.Command, cls: type, prefix: str = "", only=None) -> None:
    records: list[str] = []  # one per option: its line, and the help line under it when the flags are long
    for ln in _wide_help(cmd).splitlines():
        if ln.strip().startswith("-"):
            records.append(ln)
        elif records and ln.strip():
            records[-1] += " " + ln.strip()
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        p = _param(cmd, f"{prefix}_{f.name}" if prefix else f.name)
        opts = p.opts + p.secondary_opts
        line = next((ln for ln in records if _flags_of_record(ln) == set(opts)), None)
        assert line is not None, f"{cmd.name}: {opts} not in --help"
        for o in opts:
            assert o in line
        assert f.metadata.get("help", "")[:25] in line, (cmd.name, f.name, line)
        assert line.count("[default:") <= 1 and "(default" not in line, line  # the default, once
        expected = _expected_default(f, p)
        if expected is None:
            assert "[default:" not in line, line
        else:
            assert f"[default: {expected}]" in line, (cmd.name, f.name, line)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_field_is_a_flag_of_its_command_with_its_default(name):
    cmd = main.commands[name]
    _check_fields_in_help(cmd, COMMANDS[name])
    for flag in CONTRACT[name]:
        assert flag in _wide_help(cmd), f"raykd {name}: contract flag {flag} is gone"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_config_field_is_a_flag_of_its_job(job):
    cmd = _job(job)
    for cls, prefix, only in JOBS[job]:
        _check_fields_in_help(cmd, cls, prefix, only)
    # and the script itself answers --help with them
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for cls, prefix, only in JOBS[job]:
        for f in dataclasses.fields(cls):
            if only is None or f.name in only:
                assert _param(cmd, f"{prefix}_{f.name}" if prefix else f.name).opts[0] in r.stdout


def _value_for(p: click.Option):
    """(argv setting ``p``, the field value it should produce) for any generated option."""
    flag = p.opts[0]
    if p.is_flag:
        if p.secondary_opts:
            return [p.secondary_opts[0]], False
        return [flag], True
    if isinstance(p.type, config.KeyValue):
        return [flag, "tau=0.5", flag, "mode=inbatch"], {"tau": 0.5, "mode": "inbatch"}
    if isinstance(p.type, click.Choice):
        one = [p.type.choices[-1]] * 2
    elif isinstance(p.type, click.types.IntParamType):
        one = [7, 8]
    elif isinstance(p.type, click.types.FloatParamType):
        one = [0.25, 0.5]
    else:
        one = ["x1", "x2"]
    if p.multiple:
        return [flag, str(one[0]), flag, str(one[1])], one
    return [flag, str(one[0])], one[0]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_field_is_settable_by_flag_and_by_config_file(name, tmp_path):
    """Through the command's own parser and ``build`` (what the command runs before its stage)."""
    cmd, cls = main.commands[name], COMMANDS[name]
    argv, expected = [], {}
    for f in dataclasses.fields(cls):
        args, value = _value_for(_param(cmd, f.name))
        argv += args
        expected[f.name] = value
    if name == "sample":
        argv += ["--out", str(tmp_path)]
    ctx = cmd.make_context(name, argv)
    from_flags = cmd.build(None, ctx.params)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(expected))
    from_file = cmd.build(str(cfg_file), cmd.make_context(name, ["--out", "o"] if name == "sample" else []).params)
    for f in dataclasses.fields(cls):
        for cfg in (from_flags, from_file):
            got = getattr(cfg, f.name)
            assert (list(got) if isinstance(got, tuple) else got) == expected[f.name], (name, f.name)


def test_precedence_flag_over_file_over_default_for_scalar_list_and_dict(tmp_path):
    cmd = main.commands["score"]

    def build(argv, file=None):
        return cmd.build(file, cmd.make_context("score", argv).params)

    default = build([])
    assert (default.batch_size, default.teachers, default.actor_resources) == (64, [], {})
    f = tmp_path / "score.yaml"
    f.write_text("score:\n  batch_size: 8\n  teachers: [a, b]\n  actor_resources: {gpu_node: 1, big: 2}\n")
    from_file = build([], str(f))
    assert (from_file.batch_size, from_file.teachers, from_file.actor_resources) == (8, ["a", "b"],
                                                                                     {"gpu_node": 1, "big": 2})
    flags = build(["--batch-size", "16", "--teacher", "c", "--actor-resource", "big=3"], str(f))
    # a list flag replaces the file's list; a dict flag changes the keys it names
    assert (flags.batch_size, flags.teachers, flags.actor_resources) == (16, ["c"], {"gpu_node": 1, "big": 3})
    # same rule straight through config.build
    assert config.build(ScoreConfig, str(f), batch_size=None, teachers=(), split="dev").split == "dev"


def test_sample_end_to_end_config_file_then_flag(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("seed: 3\ntrain_queries: 7\ndev_queries: 3\npassages: 60\nnegatives: 4\n")
    r = CliRunner().invoke(main, ["sample", "--out", str(tmp_path / "a"), "--config", str(f), "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"]["qidpidtriples.train.small.tsv"] == 28
    from raykd.sample import write_sample

    write_sample(str(tmp_path / "seed5"), SampleSpec(seed=5, train_queries=7, dev_queries=3, passages=60, negatives=4))
    write_sample(str(tmp_path / "seed3"), SampleSpec(seed=3, train_queries=7, dev_queries=3, passages=60, negatives=4))
    written = (tmp_path / "a" / "collection.tsv").read_text()
    assert written == (tmp_path / "seed5" / "collection.tsv").read_text()
    assert written != (tmp_path / "seed3" / "collection.tsv").read_text()


def test_dict_flags_are_key_value_with_yaml_values():
    cmd = main.commands["train"]
    argv = ["--loss-option", "tau=0.5", "--loss-option", "mode=inbatch", "--loss-option", "cross_device=true",
            "--student-option", "dim=128"]
    cfg = cmd.build(None, cmd.make_context("train", argv).params)
    assert cfg.loss_options == {"tau": 0.5, "mode": "inbatch", "cross_device": True}
    assert cfg.student_options == {"dim": 128}
    assert cmd.build(None, cmd.make_context("train", ["--loss-option", "tau=0.5"]).params).loss_options == {"tau": 0.5}
    r = CliRunner().invoke(main, ["train", "--loss-option", "tau"])
    assert r.exit_code == 2 and "'tau' is not KEY=VALUE" in r.output


def test_metrics_repeatable_and_comma_separated():
    cmd = main.commands["evaluate"]
    cfg = cmd.build(None, cmd.make_context("evaluate", ["--metrics", "nDCG@10,RR@10", "--metrics", "R@1000"]).params)
    assert cfg.metrics == ["nDCG@10", "RR@10", "R@1000"]


def test_unknown_config_key_is_refused_naming_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  lerning_rate: 3\n")
    r = CliRunner().invoke(main, ["train", "--config", str(f)])
    assert r.exit_code == 1 and "unknown option(s) lerning_rate for TrainConfig" in r.output


def test_verbose_flag_sets_the_environment(monkeypatch):
    import os

    monkeypatch.delenv("RAYKD_VERBOSE", raising=False)
    r = CliRunner().invoke(main, ["-v", "sample", "--help"])
    assert r.exit_code == 0 and os.environ.get("RAYKD_VERBOSE") == "1"


def test_score_job_without_data_scores_the_sample_sized_by_sample_flags(tmp_path, monkeypatch):
    """jobs/score_teachers.py's config when no --data is given: the embedded sample (sized by its --sample-*
    flags), prepared, with the two tiny teachers; flags given still win."""
    monkeypatch.setenv("RAYKD_SCORE_WORK", str(tmp_path / "work"))
    cmd = _job("score_teachers")
    argv = ["--sample-train-queries", "12", "--sample-dev-queries", "4", "--sample-negatives", "3",
            "--sample-passages", "80", "--batch-size", "8"]
    cfg = cmd.build(None, cmd.make_context("score_teachers.py", argv).params)
    from raykd.formats.store import TextStore

    assert cfg.data == str(tmp_path / "work" / "store") and cfg.out == str(tmp_path / "work" / "scores")
    assert len(cfg.teachers) == 2 and cfg.batch_size == 8
    assert TextStore(cfg.data).manifest["counts"]["triples"] == 12 * 3
