"""search: BM25, re-ranking, hybrid fusion and the run outputs; bad input gets a clear error."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd import fusion, metrics, storage
from raykd.errors import FormatError, UserError
from raykd.formats import trec
from raykd.formats.store import TextStore
from raykd.runs import store_qrels
from raykd.stages.search import SearchConfig, search


@pytest.fixture(scope="module")
def mini_store(shared, tmp_path_factory) -> str:
    from raykd.stages.prepare import PrepareConfig, prepare

    out = str(tmp_path_factory.mktemp("mini-store"))
    prepare(PrepareConfig(beir=str(shared("scifact-mini")), out=out))
    return out


@pytest.fixture(scope="module")
def bm25_test(mini_store, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("bm25-test"))
    search(SearchConfig(data=mini_store, bm25=True, split="test", k=100, out=out))
    return out


def test_bm25_run_files_and_effectiveness(bm25_test, mini_store):
    m = storage.read_manifest(bm25_test, stage="search", format="raykd.run")
    assert m["counts"]["queries"] == 100 and m["stats"]["mode"] == "bm25"
    assert m["stats"]["latency_ms"]["search"] > 0
    run = trec.read_run(storage.join(bm25_test, "run.trec"))
    table = pq.read_table(storage.join(bm25_test, "run.parquet"))
    assert table.num_rows == sum(len(d) for d in run.values()) and all(len(d) <= 100 for d in run.values())
    first = table.filter(pa.compute.equal(table["rank"], 1)).to_pylist()[0]
    assert trec.trec_order(run[first["query_id"]])[0][0] == first["doc_id"]
    store = TextStore(mini_store)
    assert store.doc_ids([first["pid"]]) == [first["doc_id"]]
    # Porter-stemmed Lucene BM25 on scifact-mini test: README reference ~0.82 for plain BM25
    ev = metrics.evaluate(run, store_qrels(store, "test"), ["nDCG@10"])
    assert ev.mean["nDCG@10"] == pytest.approx(0.82, abs=0.02)


def test_rerun_with_same_out_returns_the_finished_run(bm25_test, mini_store):
    before = storage.read_bytes(storage.join(bm25_test, "manifest.json"))
    search(SearchConfig(data=mini_store, bm25=True, split="test", k=100, out=bm25_test))
    assert storage.read_bytes(storage.join(bm25_test, "manifest.json")) == before


def test_rerank_scores_candidates_with_a_scorer(bm25_test, mini_store, tiny_models, tmp_path):
    scorer = tiny_models("bert", "cross_encoder", seed=5)
    out = str(tmp_path / "rr")
    # candidates: BM25's lists of 4 queries (a search output would do too, see the hybrid test)
    cands = dict(list(trec.read_run(storage.join(bm25_test, "run.trec")).items())[:4])
    trec.write_run(cands, str(tmp_path / "cands.trec"))
    m = search(SearchConfig(data=mini_store, rerank=str(tmp_path / "cands.trec"), scorer=scorer, split="test", k=5,
                            out=out))
    assert m.stats["latency_ms"]["rerank"] > 0 and m.counts["queries"] == 4
    got = trec.read_run(storage.join(out, "run.trec"))
    store = TextStore(mini_store)
    from raykd.models.registry import load_scorer

    model = load_scorer(scorer).eval()
    q = next(iter(got))
    assert set(got[q]) == {d for d, _ in trec.trec_order(cands[q])[:5]}  # the top-5 candidates, re-scored
    qtext = dict(zip(store.queries("test")["query_id"].to_pylist(), store.queries("test")["text"].to_pylist()))[q]
    pid = store.pid_of_doc_id()
    docs = list(got[q])
    want = model.score([qtext] * len(docs), store.passages([pid[d] for d in docs])).tolist()
    assert [got[q][d] for d in docs] == pytest.approx(want, abs=1e-4)


@pytest.fixture(scope="module")
def colbert_student(tiny_models, tmp_path_factory) -> str:
    """A raykd ColBERT student as `raykd train` saves one (raykd_model.json, its projection)."""
    import torch

    from raykd.models.registry import load_student

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("colbert-student") / "model")
    load_student("colbert", tiny_models("bert", "encoder", seed=3), dim=16).save_pretrained(out)
    return out


@pytest.mark.parametrize("which", ["cross_encoder", "colbert"])
def test_rerank_through_the_pipeline_equals_the_scorer_in_process(which, bm25_test, mini_store, tiny_models,
                                                                   colbert_student, tmp_path):
    """Re-ranking through the scorer pipeline (pairs -> texts -> CPU tokenising -> actor pool, length-sorted
    forward passes) gives every pair the score the loaded scorer gives it in this process, and writes each block
    of whole queries as a part holding run.parquet's rows."""
    import numpy as np

    from raykd.models.registry import load_scorer

    scorer = tiny_models("bert", "cross_encoder", seed=5) if which == "cross_encoder" else colbert_student
    cands = dict(list(trec.read_run(storage.join(bm25_test, "run.trec")).items())[:6])
    trec.write_run(cands, str(tmp_path / "cands.trec"))
    out = str(tmp_path / "rr")
    m = search(SearchConfig(data=mini_store, rerank=str(tmp_path / "cands.trec"), scorer=scorer, split="test", k=7,
                            rerank_block=16, batch_size=4, out=out))
    table = pq.read_table(storage.join(out, "run.parquet"))
    assert m.counts == {"queries": 6, "results": 42, "k": 7} and table.num_rows == 42
    assert m.stats["rerank"]["blocks"] == 3 and len([p for p in m.parts if p.startswith("parts/")]) == 3
    parts = pa.concat_tables([pq.read_table(storage.join(out, p)) for p in m.parts if p.startswith("parts/")])
    assert parts.sort_by([("qid", "ascending"), ("rank", "ascending")]).equals(table)
    store = TextStore(mini_store)
    qtext = dict(zip(store.queries("test")["qid"].to_pylist(), store.queries("test")["text"].to_pylist()))
    model = load_scorer(scorer).eval()
    want = model.score([qtext[q] for q in table["qid"].to_pylist()], store.passages(table["pid"].to_numpy()))
    np.testing.assert_allclose(table["score"].to_numpy(), want.numpy(), atol=1e-5, rtol=0)
    got = trec.read_run(storage.join(out, "run.trec"))
    for q, docs in cands.items():  # each query's top-7 candidates, re-scored and ranked in trec_eval's order
        assert set(got[q]) == {d for d, _ in trec.trec_order(docs)[:7]}
    rows = table.to_pylist()
    assert [(r["query_id"], r["doc_id"]) for r in rows] == [(q, d) for q in dict.fromkeys(r["query_id"] for r in rows)
                                                            for d, _ in trec.trec_order(got[q])]


def test_rerank_refuses_runs_naming_unknown_ids(mini_store, tiny_models, tmp_path):
    scorer = tiny_models("bert", "cross_encoder", seed=5)
    bad = tmp_path / "bad.trec"
    store = TextStore(mini_store)
    q, d = store.queries("test")["query_id"].to_pylist()[0], store.doc_ids([0])[0]
    bad.write_text(f"{q} Q0 {d} 1 2.0 x\n{q} Q0 NOT-A-DOC 2 1.0 x\n")
    with pytest.raises(FormatError, match=r"bad.trec, line 2: document NOT-A-DOC is not in the corpus"):
        search(SearchConfig(data=mini_store, rerank=str(bad), scorer=scorer, split="test", out=str(tmp_path / "o")))
    bad.write_text(f"no-such-query Q0 {d} 1 2.0 x\n")
    with pytest.raises(FormatError, match=r"line 1: query no-such-query is not in split 'test'"):
        search(SearchConfig(data=mini_store, rerank=str(bad), scorer=scorer, split="test", out=str(tmp_path / "o")))


def test_hybrid_with_given_alpha_is_eq7(bm25_test, mini_store, tmp_path):
    # a second "dense" list: BM25 without stemming, so the two lists differ
    other = str(tmp_path / "plain")
    search(SearchConfig(data=mini_store, bm25=True, stemmer="none", split="test", k=100, out=other))
    out = str(tmp_path / "h")
    m = search(SearchConfig(data=mini_store, hybrid=True, dense=other, sparse=bm25_test, alpha=0.3, split="test",
                            k=100, out=out))
    assert m.stats["alpha"] == 0.3
    want = fusion.hybrid(trec.read_run(storage.join(other, "run.trec")),
                         trec.read_run(storage.join(bm25_test, "run.trec")), 0.3, 100)
    got = trec.read_run(storage.join(out, "run.trec"))
    assert got.keys() == want.keys()
    for q in got:
        assert got[q] == pytest.approx(want[q], rel=1e-6)
    with pytest.raises(UserError, match="give --tune-dense and --tune-sparse"):
        search(SearchConfig(data=mini_store, hybrid=True, dense=other, sparse=bm25_test, split="test",
                            out=str(tmp_path / "h2")))


def test_empty_query_and_missing_mode_are_errors(mini_store, tmp_path):
    store = str(tmp_path / "store")
    shutil.copytree(mini_store, store)
    path = storage.join(store, "queries", "test.parquet")
    t = pq.read_table(path)
    texts = t["text"].to_pylist()
    texts[3] = "   "
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts)), path)
    qid = t["query_id"][3].as_py()
    with pytest.raises(FormatError, match=rf"test.parquet: row 3: query {qid} has an empty text"):
        search(SearchConfig(data=store, bm25=True, split="test", out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="search needs --index"):
        search(SearchConfig(data=mini_store, split="test", out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="choose one of"):
        search(SearchConfig(data=mini_store, bm25=True, hybrid=True, split="test", out=str(tmp_path / "o")))


def test_bm25_index_is_saved_once_and_loaded_memory_mapped(bm25_test, mini_store, tmp_path):
    from raykd.bm25 import BM25Index
    from raykd.formats.store import passage_text

    idx = storage.join(bm25_test, "bm25-index")
    assert storage.has_manifest(idx)
    assert storage.read_manifest(bm25_test)["stats"]["bm25_build"]["passages"] == 1000
    # an index built in memory over the same corpus gives the run the saved, memory-mapped one gave
    store = TextStore(mini_store)
    corpus = store.corpus()
    memory = BM25Index().index(passage_text(corpus["title"], corpus["text"]).to_pylist(), corpus["doc_id"].to_pylist())
    queries = store.queries("test")
    ids, scores = memory.search(queries["text"].to_pylist(), 100)
    want = {q: {d: float(s) for d, s in zip(ids[i], scores[i]) if s > 0}
            for i, q in enumerate(queries["query_id"].to_pylist())}
    got = trec.read_run(storage.join(bm25_test, "run.trec"))
    assert got.keys() == want.keys()
    for q in got:
        assert got[q] == pytest.approx(want[q], rel=1e-5)
    # a later search names the index: loaded, not rebuilt; its queries retrieved over 3 parallel tasks
    out = str(tmp_path / "again")
    m = search(SearchConfig(data=mini_store, bm25=True, split="test", k=100, bm25_index=idx, bm25_workers=3,
                            out=out))
    assert "bm25_build" not in m.stats
    assert trec.read_run(storage.join(out, "run.trec")) == got


def test_hybrid_tuned_on_a_sample_equals_full_tuning(mini_store, tmp_path):
    runs = {}
    for split in ("train", "test"):
        for name, stemmer in (("plain", "none"), ("bm25", "porter")):
            runs[split, name] = str(tmp_path / f"{split}-{name}")
            search(SearchConfig(data=mini_store, bm25=True, stemmer=stemmer, split=split, k=100,
                                bm25_index=str(tmp_path / f"bm25-index-{name}"), out=runs[split, name]))
    common = dict(data=mini_store, hybrid=True, dense=runs["test", "plain"], sparse=runs["test", "bm25"],
                  tune_split="train", tune_dense=runs["train", "plain"], tune_sparse=runs["train", "bm25"],
                  split="test", k=100)
    full = search(SearchConfig(out=str(tmp_path / "full"), tune_queries=0, **common))
    big = search(SearchConfig(out=str(tmp_path / "big"), **common))  # default 1,000 >= the 200 judged queries
    half = search(SearchConfig(out=str(tmp_path / "half"), tune_queries=100, tune_seed=1, **common))
    assert full.stats["alpha_tuning"]["queries"] == 200 and half.stats["alpha_tuning"]["queries"] == 100
    assert big.stats["alpha_tuning"]["curve"] == full.stats["alpha_tuning"]["curve"]
    # the parallel sweep equals the library's tuning in one process (fusion.tune_alpha, every judged query)
    store = TextStore(mini_store)
    alpha, curve = fusion.tune_alpha(trec.read_run(storage.join(runs["train", "plain"], "run.trec")),
                                     trec.read_run(storage.join(runs["train", "bm25"], "run.trec")),
                                     store_qrels(store, "train"), k=100)
    assert full.stats["alpha"] == alpha
    assert full.stats["alpha_tuning"]["curve"] == [list(av) for av in curve]
    # a sample of 100 of the 200 tunes on those only (here it picks another alpha: 7.94 vs 1.995)
    assert half.stats["alpha"] in fusion.DEFAULT_ALPHA_GRID
    assert half.stats["alpha_tuning"]["curve"] != full.stats["alpha_tuning"]["curve"]


def test_bm25_shards_give_the_single_index_run(bm25_test, mini_store, tmp_path):
    """3 BM25 shards built with the whole corpus's statistics: the run of one index (docs, order, scores)."""
    out = str(tmp_path / "sharded")
    m = search(SearchConfig(data=mini_store, bm25=True, split="test", k=100, out=out, bm25_shards=3))
    build = m.stats["bm25_build"]
    assert build["passages"] == 1000 and [s["passages"] for s in build["shards"]] == [333, 333, 334]
    assert all(s["peak_rss_bytes"] > 0 and s["memory_requested"] > 0 for s in build["shards"])
    idx = storage.join(out, "bm25-index")
    assert storage.read_manifest(idx)["counts"]["shards"] == 3
    one = trec.read_run(storage.join(bm25_test, "run.trec"))
    got = trec.read_run(storage.join(out, "run.trec"))
    assert got.keys() == one.keys()
    for qid in one:
        assert list(got[qid]) == list(one[qid]), qid
        np.testing.assert_allclose(list(got[qid].values()), list(one[qid].values()), rtol=0, atol=1e-5)
