"""The command line: help everywhere, version, the command names of DESIGN.md, --config with flag overrides."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from raykd import __version__
from raykd.cli import main

COMMANDS = ["sample", "prepare", "score", "train", "index", "search", "evaluate", "export-nrkd", "import-nrkd", "import-scores", "export-scores", "demo"]


def test_version_and_help_everywhere():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.output
        h = CliRunner().invoke(main, [cmd, "--help"])
        assert h.exit_code == 0 and "--config" in h.output, cmd


def test_sample_then_prepare_with_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_queries: 7\ndev_queries: 3\npassages: 60\nnegatives: 4\nseed: 5\n")
    r = CliRunner().invoke(main, ["sample", "--config", str(cfg), "--negatives", "6", "--out", str(tmp_path / "raw")])
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)["files"]
    assert files["queries.train.tsv"] == 7 and files["qidpidtriples.train.small.tsv"] == 42  # flag beat the file
    pcfg = tmp_path / "p.yaml"
    pcfg.write_text(f"prepare:\n  msmarco: {tmp_path / 'raw'}\n  part_rows: 10\n")
    r = CliRunner().invoke(main, ["prepare", "--config", str(pcfg), "--out", str(tmp_path / "store")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["corpus"] == 60


def test_bad_config_and_bad_input_give_one_clean_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trian_queries: 7\n")
    r = CliRunner().invoke(main, ["sample", "--config", str(cfg), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "Error: ValueError" in r.output and "unknown option(s) trian_queries" in r.output
    (tmp_path / "raw").mkdir()
    r = CliRunner().invoke(main, ["prepare", "--msmarco", str(tmp_path / "raw"), "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "Error: FileNotFoundError" in r.output and "no collection.tsv" in r.output


@pytest.mark.parametrize("cmd", ["prepare"])
def test_prepare_needs_an_input(cmd, tmp_path):
    r = CliRunner().invoke(main, [cmd, "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "nothing to prepare" in r.output
