"""evaluate: the stage, the `raykd evaluate` command (--json) and the report files."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from raykd import storage
from raykd.cli import main
from raykd.errors import FormatError, UserError
from raykd.formats import trec
from raykd.stages.evaluate import EvaluateConfig, evaluate


def _expected(path) -> dict:
    out: dict = {}
    for line in open(path):
        name, qid, value = line.split()
        try:
            out.setdefault(name, {})[qid] = float(value)
        except ValueError:
            pass
    return out


def test_cli_json_equals_trec_eval_per_query(shared):
    d = shared("trec_eval_ref")
    expected = _expected(d / "out.test.aq")
    result = CliRunner().invoke(
        main, ["evaluate", "--run", str(d / "results.test"), "--qrels", str(d / "qrels.test"),
               "--metrics", "map,recip_rank,ndcg_cut_10", "--metrics", "recall_1000", "--metrics", "P_10", "--json"],
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["results.test"]
    for name in ("map", "recip_rank", "ndcg_cut_10", "recall_1000", "P_10"):
        assert round(got["mean"][name], 4) == expected[name]["all"]
        for q, v in got["per_query"].items():
            assert round(v[name], 4) == expected[name][q]


def test_cli_table_and_clean_errors(shared, tmp_path):
    d = shared("trec_eval_ref")
    result = CliRunner().invoke(main, ["evaluate", "--run", str(d / "results.test"), "--qrels", str(d / "qrels.test")])
    assert result.exit_code == 0, result.output
    assert "| run | MRR@10 | R@1000 | nDCG@10 | MAP | P@10 | queries |" in result.output
    assert "| results.test | 0.3889 | 0.5997 | 0.3016 | 0.1785 | 0.3000 | 3 |" in result.output
    bad = tmp_path / "bad.trec"
    bad.write_text("301 Q0 doc 1 0.5\n")
    result = CliRunner().invoke(main, ["evaluate", "--run", str(bad), "--qrels", str(d / "qrels.test")])
    assert result.exit_code == 1 and f"{bad}, line 1: expected 6 columns" in result.output


def test_store_qrels_refuse_unknown_documents_and_list_unjudged_queries(shared, tmp_path):
    from raykd.stages.prepare import PrepareConfig, prepare

    store = str(tmp_path / "store")
    prepare(PrepareConfig(beir=str(shared("scifact-mini")), out=store))
    from raykd.formats.store import TextStore

    s = TextStore(store)
    qrels = s.qrels("test").to_pylist()
    q, doc = qrels[0]["query_id"], qrels[0]["doc_id"]
    run = tmp_path / "run.trec"
    run.write_text(f"{q} Q0 {doc} 1 1.0 x\nunjudged Q0 {doc} 1 1.0 x\n")
    res = evaluate(EvaluateConfig(run=[str(run)], names=["r"], data=store, split="test", metrics=["RR@10"]))["r"]
    assert res["mean"]["RR@10"] == 1.0 and res["queries_without_qrels"] == ["unjudged"]
    assert res["num_queries"] == 1 and len(res["queries_without_results"]) == 99
    full = evaluate(EvaluateConfig(run=[str(run)], names=["r"], data=store, split="test", metrics=["RR@10"],
                                   complete=True))
    assert full["r"]["mean"]["RR@10"] == pytest.approx(1 / 100)
    run.write_text(f"{q} Q0 {doc} 1 1.0 x\n{q} Q0 ghost-doc 2 0.5 x\n")
    with pytest.raises(FormatError, match=r"run.trec, line 2: document ghost-doc is not in the corpus"):
        evaluate(EvaluateConfig(run=[str(run)], data=store, split="test"))
    with pytest.raises(UserError, match="none of the run's 1 queries has qrels"):
        run.write_text(f"nobody Q0 {doc} 1 1.0 x\n")
        evaluate(EvaluateConfig(run=[str(run)], data=store, split="test"))


def test_report_files_with_latency_from_search_outputs(shared, tmp_path):
    d = shared("trec_eval_ref")
    # a search output: run.trec + a manifest carrying per-query latency
    out = str(tmp_path / "search-out")
    trec.write_run(trec.read_run(str(d / "results.test")), storage.join(out, "run.trec"))
    storage.write_manifest(out, "search", format="raykd.run", stats={"latency_ms": {"search": 2.0, "total": 2.5}})
    rep = str(tmp_path / "report")
    res = evaluate(EvaluateConfig(run=[out, str(d / "results.test")], names=["dense", "plain"],
                                  qrels=str(d / "qrels.test"), metrics=["nDCG@10", "AP"], out=rep))
    assert res["dense"]["mean"] == res["plain"]["mean"]
    md = storage.read_bytes(storage.join(rep, "report.md")).decode()
    assert "| dense | 0.3016 | 0.1785 | 3 | 2.00 | 2.50 |" in md and "| plain | 0.3016 | 0.1785 | 3 |  |  |" in md
    assert storage.read_bytes(storage.join(rep, "efficiency.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.read_manifest(rep, stage="evaluate")["counts"] == {"runs": 2}
    per_q = storage.read_parquet(storage.join(rep, "per_query.parquet"))
    assert per_q.num_rows == 2 * 3 * 2


def test_a_run_is_evaluated_by_query_blocks_as_a_whole_dict_was(shared, tmp_path):
    """evaluate reads the run as an Arrow table and evaluates blocks of whole queries (no whole-run dict): the
    values equal the dict of dicts evaluated at once; a document repeated for a query is named by line."""
    from raykd import metrics
    from raykd.runs import checked_run, query_blocks

    d = shared("trec_eval_ref")
    qrels = trec.read_qrels(str(d / "qrels.test"))
    measures = ["map", "recip_rank", "nDCG@10", "R@1000", "P@10"]
    whole = metrics.evaluate(trec.read_run(str(d / "results.test")), qrels, measures)
    blocks = list(query_blocks(checked_run(str(d / "results.test")), queries=2))
    assert [len(b) for b in blocks] == [2, 1]
    assert metrics.evaluate_blocks(blocks, qrels, measures) == whole
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 a 1 2.0 x\nq2 Q0 a 1 2.0 x\nq1 Q0 b 2 1.0 x\nq1 Q0 a 3 0.5 x\n")
    with pytest.raises(FormatError, match=r"run.trec, line 4: document a appears twice for query q1"):
        evaluate(EvaluateConfig(run=[str(run)], qrels=str(d / "qrels.test")))
