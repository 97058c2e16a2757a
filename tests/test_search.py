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
from raykd.runs import corpus_ids, pids_of, store_qrels
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
    docs = list(got[q])
    pids = pids_of(corpus_ids(store), pa.array(docs, pa.string())).tolist()
    want = model.score([qtext] * len(docs), store.passages(pids)).tolist()
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
    # the run the dict-based fusion of the two run.trec files gave, to the byte (inputs read from run.parquet)
    assert storage.read_bytes(storage.join(out, "run.trec")).decode() == trec.format_run(want, "raykd-hybrid", 100)
    table = pq.read_table(storage.join(out, "run.parquet"))
    assert table["score"].to_pylist() == pa.array([s for d in want.values() for _, s in trec.trec_order(d)],
                                                  pa.float32()).to_pylist()
    assert m.counts == {"queries": len(want), "results": sum(map(len, want.values())), "k": 100}
    # the inputs given as their run.trec files fuse to the same run
    files = str(tmp_path / "h-files")
    search(SearchConfig(data=mini_store, hybrid=True, dense=storage.join(other, "run.trec"),
                        sparse=storage.join(bm25_test, "run.trec"), alpha=0.3, split="test", k=100, out=files))
    assert storage.read_bytes(storage.join(files, "run.trec")) == storage.read_bytes(storage.join(out, "run.trec"))
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
    want = fusion.hybrid(trec.read_run(storage.join(runs["test", "plain"], "run.trec")),
                         trec.read_run(storage.join(runs["test", "bm25"], "run.trec")), alpha, 100)
    got = storage.read_bytes(storage.join(str(tmp_path / "full"), "run.trec")).decode()
    assert got == trec.format_run(want, "raykd-hybrid", 100)
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


def _old_run_of(query_ids, doc_ids, rows, scores, keep):
    """The dict of dicts search built before runs stayed Arrow tables (its ``_run_of``)."""
    docs = doc_ids.take(pa.array(rows[keep].astype(np.int64))).to_pylist()
    vals = scores[keep].astype(float).tolist()
    run, pos = {}, 0
    for qid, n in zip(query_ids, keep.sum(axis=1).tolist()):
        run[qid] = dict(zip(docs[pos : pos + n], vals[pos : pos + n]))
        pos += n
    return run


def _old_write_run(store, split, run, out, tag, k):
    """run.parquet and run.trec as search wrote them from that dict (its ``_write_run``)."""
    queries = store.queries(split)
    qid_of = dict(zip(queries["query_id"].to_pylist(), queries["qid"].to_pylist()))
    cols = {"qid": [], "query_id": [], "doc_id": [], "rank": [], "score": []}
    for q, docs in run.items():
        for rank, (d, s) in enumerate(trec.trec_order(docs)[:k], start=1):
            for name, v in zip(cols, (qid_of[q], q, d, rank, s)):
                cols[name].append(v)
    doc_ids = pa.array(cols["doc_id"], pa.string())
    storage.write_parquet_atomic(pa.table({
        "qid": pa.array(cols["qid"], pa.int64()), "query_id": pa.array(cols["query_id"], pa.string()),
        "pid": pa.array(pids_of(corpus_ids(store), doc_ids), pa.int64()), "doc_id": doc_ids,
        "rank": pa.array(cols["rank"], pa.int32()), "score": pa.array(cols["score"], pa.float32())}),
        storage.join(out, "run.parquet"))
    trec.write_run(run, storage.join(out, "run.trec"), tag=tag, k=k)


def test_search_results_stay_tables_and_write_what_the_dict_run_wrote(mini_store, tmp_path):
    """A searcher's (queries, k) rows and scores become a ranked Arrow table (no dict run), and run.parquet and
    run.trec written from it are, byte for byte, what the former dict-of-dicts path wrote: dense's rows >= 0
    and BM25's scores > 0 kept, ties (scores rounded to 0.1) ordered by doc_id descending, an empty query."""
    from raykd.runs import corpus_ids, run_columns, top_k_table, write_run

    store = TextStore(mini_store)
    query_ids = store.queries("test")["query_id"].combine_chunks()
    doc_ids = corpus_ids(store)["doc_id"].combine_chunks()
    rng = np.random.default_rng(11)
    nq, k = len(query_ids), 30
    rows = np.argsort(rng.random((nq, len(doc_ids))), axis=1)[:, :k]
    scores = np.round(rng.normal(size=(nq, k)), 1).astype(np.float32)
    dense_rows = rows.copy()  # faiss: -1 where a query found fewer than k
    dense_rows[rng.random((nq, k)) < 0.1] = -1
    dense_rows[3] = -1
    for mode, got, keep in (("dense", dense_rows, dense_rows >= 0), ("bm25", rows, scores > 0)):
        table = top_k_table(query_ids, doc_ids, got, scores, keep)
        assert isinstance(table, pa.Table) and table.column_names == ["query_id", "doc_id", "score"]
        write_run(run_columns(table, store, "test"), str(tmp_path / mode / "new"), tag=f"raykd-{mode}")
        old = _old_run_of(query_ids.to_pylist(), doc_ids, got, scores, keep)
        _old_write_run(store, "test", old, str(tmp_path / mode / "old"), f"raykd-{mode}", k)
        for name in ("run.trec", "run.parquet"):
            assert (tmp_path / mode / "new" / name).read_bytes() == (tmp_path / mode / "old" / name).read_bytes()


def test_bm25_run_returns_a_table(bm25_test, mini_store):
    from raykd.stages.search import bm25_run

    cfg = SearchConfig(data=mini_store, bm25=True, split="test", k=100, bm25_index=storage.join(bm25_test,
                                                                                               "bm25-index"))
    table = bm25_run(cfg, TextStore(mini_store), "test", {})
    assert isinstance(table, pa.Table) and table.column_names == ["query_id", "doc_id", "score"]
    written = pq.read_table(storage.join(bm25_test, "run.parquet"))
    assert table.select(["query_id", "doc_id"]).equals(written.select(["query_id", "doc_id"]))


def test_hybrid_refuses_search_outputs_naming_unknown_or_repeated_documents(bm25_test, mini_store, tmp_path):
    """A search output given as input is read from its run.parquet: a bad entry is named by file and row."""
    bad = tmp_path / "bad"
    shutil.copytree(bm25_test, bad, ignore=shutil.ignore_patterns("bm25-index"))
    path = str(bad / "run.parquet")
    t = pq.read_table(path)
    docs = t["doc_id"].to_pylist()
    for row, doc, message in ((5, "NOT-A-DOC", "document NOT-A-DOC is not in the corpus"),
                              (1, docs[0], f"document {docs[0]} appears twice for query {t['query_id'][1].as_py()}")):
        changed = list(docs)
        changed[row] = doc
        pq.write_table(t.set_column(t.schema.get_field_index("doc_id"), "doc_id", pa.array(changed)), path)
        with pytest.raises(FormatError, match=rf"bad/run.parquet: row {row}: {message}"):
            search(SearchConfig(data=mini_store, hybrid=True, dense=str(bad), sparse=bm25_test, alpha=0.5,
                                split="test", out=str(tmp_path / "o")))
