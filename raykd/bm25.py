"""BM25 retrieval with bm25s (a maintained library; no hand-written scoring here).

Defaults follow Anserini's Lucene BM25 (the published BEIR and MS MARCO baselines): k1=0.9, b=0.4, Lucene's
idf ``log(1 + (N - df + 0.5) / (df + 0.5))`` (bm25s ``method="lucene"``).

Tokenisation, chosen to approximate Lucene's EnglishAnalyzer that Anserini uses:
- lower-case, tokens are runs of 2+ word characters (bm25s' default pattern ``\\b\\w\\w+\\b``; Lucene's
  StandardTokenizer also keeps 1-character tokens and splits a few cases differently);
- Lucene's 33 English stopwords (bm25s ``STOPWORDS_EN`` is that list);
- the Porter stemmer (PyStemmer's ``porter``, the algorithm of Lucene's PorterStemFilter; ``english`` is
  Snowball's Porter2; ``none`` turns stemming off).
Measured on BEIR SciFact test (docs/retrieval.md): nDCG@10 within 0.02 of Anserini's 0.6789.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

STEMMERS = ("porter", "english", "none")


@dataclass
class BM25Params:
    k1: float = 0.9
    b: float = 0.4
    stemmer: str = "porter"
    stopwords: str = "en"  # bm25s name: "en" (Lucene's 33) or "none"


def _stemmer(name: str):
    if name == "none":
        return None
    if name not in STEMMERS:
        raise ValueError(f"unknown stemmer {name!r}; use one of {', '.join(STEMMERS)}")
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(name)


class BM25Index:
    """A bm25s index over passages, searchable by query text; row i of the index is passage ``ids[i]``.

    Built in memory (:meth:`index`, or :meth:`index_batches` for a corpus read batch by batch with one shared
    vocabulary), saved with bm25s' ``save`` plus ``ids.parquet`` and ``raykd_bm25.json`` (:meth:`save`), and
    loaded memory-mapped (:meth:`load`): a loaded index keeps its score matrix on disk and pages it in as
    queries touch it, so several processes can search one copy."""

    PARAMS = "raykd_bm25.json"

    def __init__(self, params: BM25Params | None = None):
        self.params = params or BM25Params()
        self._stem = _stemmer(self.params.stemmer)
        self.ids: pa.Array | None = None

    def _stopwords(self):
        return None if self.params.stopwords == "none" else self.params.stopwords

    def _tokenize(self, texts: Sequence[str]):
        import bm25s

        return bm25s.tokenize(list(texts), stopwords=self._stopwords(), stemmer=self._stem, show_progress=False)

    def index(self, passages: Sequence[str], ids: Sequence) -> BM25Index:
        if len(passages) != len(ids):
            raise ValueError(f"{len(passages)} passages but {len(ids)} ids")
        return self.index_batches([(passages, ids)])

    def _tokenizer(self):
        from bm25s.tokenization import Tokenizer

        return Tokenizer(stopwords=self._stopwords() or [], stemmer=self._stem)

    def _token_ids(self, batches: Iterable[tuple[Sequence[str], Sequence]]):
        """``(tokenizer, token ids of each passage)`` of ``(passages, ids)`` batches; sets :attr:`ids`."""
        tok = self._tokenizer()
        token_ids: list[list[int]] = []
        ids = []
        for passages, batch_ids in batches:
            token_ids.extend(tok.tokenize(list(passages), update_vocab=True, return_as="ids", show_progress=False))
            ids.append(pa.array(batch_ids) if not isinstance(batch_ids, (pa.Array, pa.ChunkedArray)) else batch_ids)
        self.ids = pa.chunked_array(ids).combine_chunks() if ids else pa.array([], pa.string())
        if len(self.ids) != len(token_ids):
            raise ValueError(f"{len(token_ids)} passages but {len(self.ids)} ids")
        return tok, token_ids

    def index_batches(self, batches: Iterable[tuple[Sequence[str], Sequence]]) -> BM25Index:
        """Index ``(passages, ids)`` batches in order: each batch's texts are tokenised and dropped, only their
        token ids (one shared vocabulary) are kept until bm25s builds its score matrix."""
        import bm25s

        tok, token_ids = self._token_ids(batches)
        self._bm25 = bm25s.BM25(k1=self.params.k1, b=self.params.b, method="lucene")
        self._bm25.index((token_ids, tok.get_vocab_dict()), show_progress=False)
        return self

    def index_shard(self, batches: Iterable[tuple[Sequence[str], Sequence]], stats: CorpusStats) -> BM25Index:
        """Index one shard of a corpus (``(passages, ids)`` batches) with the WHOLE corpus's statistics
        ``stats`` (N, avgdl, df; :class:`CorpusStats`): the shard's score matrix holds exactly the entries an
        index of the whole corpus holds for these passages, over the corpus's vocabulary, so shards' scores
        are comparable and their merged top-k is the whole index's. bm25s' own scoring functions build it
        (what ``BM25.index`` runs, with the global idf and avgdl in place of the shard's)."""
        import bm25s
        from bm25s.scoring import _build_scores_and_indices_for_matrix

        tok, token_ids = self._token_ids(batches)
        vocab = {t: i for i, t in enumerate(stats.terms)}
        local = tok.get_vocab_dict()
        remap = np.empty(len(local), dtype=np.int64)
        for term, i in local.items():
            if term not in vocab:
                raise ValueError(f"term {term!r} of this shard is not in the corpus statistics (another corpus?)")
            remap[i] = vocab[term]
        del local, tok
        token_ids = [remap[np.asarray(d, dtype=np.int64)].tolist() if d else [] for d in token_ids]
        bm = bm25s.BM25(k1=self.params.k1, b=self.params.b, method="lucene")
        # bm25s sizes its arrays by the sum of the (shard's) document frequencies: (passage, term) pairs
        pairs = np.fromiter((t for d in token_ids for t in set(d)), dtype=np.int64)
        shard_df = np.bincount(pairs, minlength=len(vocab))
        del pairs
        nz = np.flatnonzero(shard_df)
        data, rows, cols = _build_scores_and_indices_for_matrix(
            corpus_token_ids=token_ids, idf_array=stats.idf(bm.idf_method, bm.dtype), avg_doc_len=stats.avgdl,
            doc_frequencies=dict(zip(nz.tolist(), shard_df[nz].tolist())), k1=bm.k1, b=bm.b, delta=bm.delta,
            nonoccurrence_array=None, method=bm.method, dtype=bm.dtype, int_dtype=bm.int_dtype,
            show_progress=False)
        n_docs = len(token_ids)
        del token_ids
        data, indices, indptr = bm._np_csc(data=data, rows=rows, cols=cols, shape=(n_docs, len(vocab)))
        bm.scores = {"data": data.astype(bm.dtype), "indices": indices, "indptr": indptr, "num_docs": n_docs}
        bm.nonoccurrence_array = None
        if "" not in vocab:  # as BM25.index(create_empty_token=True)
            vocab[""] = len(vocab)
        bm.vocab_dict = vocab
        bm.unique_token_ids_set = set(vocab.values())
        self._bm25 = bm
        return self

    def save(self, folder: str) -> None:
        """bm25s' files, ``ids.parquet`` (doc_id of each row) and the parameters, into a local folder."""
        import pyarrow.parquet as pq

        self._bm25.save(folder, show_progress=False)
        pq.write_table(pa.table({"doc_id": self.ids}), os.path.join(folder, "ids.parquet"))
        with open(os.path.join(folder, self.PARAMS), "w") as f:
            json.dump(dataclasses.asdict(self.params), f, sort_keys=True)

    @classmethod
    def load(cls, folder: str, mmap: bool = True) -> BM25Index:
        """A saved index from a local folder, its score matrix memory-mapped (``mmap=True``)."""
        import bm25s
        import pyarrow.parquet as pq

        with open(os.path.join(folder, cls.PARAMS)) as f:
            self = cls(BM25Params(**json.load(f)))
        self._bm25 = bm25s.BM25.load(folder, mmap=mmap, load_corpus=False)
        self.ids = pq.read_table(os.path.join(folder, "ids.parquet"))["doc_id"].combine_chunks()
        return self

    def search_rows(self, queries: Sequence[str], k: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)``, each of shape ``(len(queries), min(k, n_passages))``, best first; row i is
        ``ids[i]``. A query whose terms match nothing gets score-0 rows (bm25s fills them with arbitrary
        documents at score 0; callers drop zero scores)."""
        if self.ids is None:
            raise RuntimeError("index() or load() first")
        k = min(k, len(self.ids))
        docs, scores = self._bm25.retrieve(self._tokenize(queries), k=k, show_progress=False, n_threads=0)
        return docs, scores

    def search(self, queries: Sequence[str], k: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, scores)`` as :meth:`search_rows`, with the passages' ids (small query sets)."""
        rows, scores = self.search_rows(queries, k)
        ids = np.asarray(self.ids.take(pa.array(rows.ravel())).to_pylist(), dtype=object).reshape(rows.shape)
        return ids, scores


@dataclass
class CorpusStats:
    """BM25's statistics of a whole corpus: its terms (the vocabulary, in first-seen order), each term's
    document frequency, the number of passages and of tokens (avgdl = tokens / passages), counted with
    :class:`BM25Index`'s tokenisation. :meth:`count` counts one part of a corpus; :meth:`merge` adds parts."""

    terms: list[str]
    df: np.ndarray  # int64, df[i] of terms[i]
    n_docs: int
    n_tokens: int

    @property
    def avgdl(self) -> np.float64:
        # np.float64 as bm25s' own mean (a NumPy scalar keeps bm25s' float arithmetic bit-identical)
        return np.float64(self.n_tokens) / self.n_docs if self.n_docs else np.float64(0.0)

    @classmethod
    def count(cls, batches: Iterable[Sequence[str]], params: BM25Params | None = None) -> CorpusStats:
        """Statistics of passages read in batches (each batch's token ids are dropped after counting)."""
        index = BM25Index(params)
        tok = index._tokenizer()
        df = np.zeros(0, dtype=np.int64)
        n_docs = n_tokens = 0
        for passages in batches:
            token_ids = tok.tokenize(list(passages), update_vocab=True, return_as="ids", show_progress=False)
            n_docs += len(token_ids)
            n_tokens += sum(len(d) for d in token_ids)
            seen = np.bincount(np.fromiter((t for d in token_ids for t in set(d)), dtype=np.int64),
                               minlength=len(tok.get_vocab_dict()))
            df = np.concatenate([df, np.zeros(len(seen) - len(df), dtype=np.int64)]) + seen
        terms = [""] * len(df)
        for term, i in tok.get_vocab_dict().items():
            terms[i] = term
        return cls(terms, df, n_docs, n_tokens)

    @classmethod
    def merge(cls, parts: Sequence[CorpusStats]) -> CorpusStats:
        df: dict[str, int] = {}
        for p in parts:
            for term, n in zip(p.terms, p.df.tolist()):
                df[term] = df.get(term, 0) + n
        return cls(list(df), np.fromiter(df.values(), dtype=np.int64, count=len(df)),
                   sum(p.n_docs for p in parts), sum(p.n_tokens for p in parts))

    def idf(self, method: str = "lucene", dtype: str = "float32") -> np.ndarray:
        """The idf of each term (bm25s' ``_build_idf_array`` with its ``method`` formula)."""
        from bm25s.scoring import _build_idf_array, _select_idf_scorer

        return _build_idf_array(dict(enumerate(self.df.tolist())), n_docs=self.n_docs,
                                compute_idf_fn=_select_idf_scorer(method), dtype=dtype)


class BM25PairScorer:
    """BM25 of given (query, passage) pairs with a fixed corpus's statistics: the score BM25 search gives that
    passage for that query, computed from the pair's texts alone (what the ``bm25`` teacher scores with).

        s(q, p) = Σ_{t ∈ q} idf(t) · tf(t, p) / (tf(t, p) + k1 · (1 - b + b · |p| / avgdl))
        idf(t)  = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))          (Lucene's, bm25s ``method="lucene"``)

    N, df and avgdl come from ``corpus`` (built once: ~one pass of tokenising it), with the same tokenisation
    (stopwords, stemmer) and parameters as :class:`BM25Index`; a term of q counts once per occurrence in q, as
    in bm25s. A passage outside the corpus is scored with the corpus's statistics all the same."""

    def __init__(self, corpus: Sequence[str], params: BM25Params | None = None):
        self.params = params or BM25Params()
        self._index = BM25Index(self.params)  # its tokenizer: the one search uses
        tokens = self._index._tokenize(corpus)
        self.vocab: dict[str, int] = dict(tokens.vocab)
        lengths = np.fromiter((len(d) for d in tokens.ids), dtype=np.int64, count=len(tokens.ids))
        flat = np.fromiter((t for d in tokens.ids for t in set(d)), dtype=np.int64)
        self.df = np.bincount(flat, minlength=len(self.vocab)).astype(np.float64)
        self.n_docs = len(tokens.ids)
        self.avgdl = float(lengths.mean()) if len(lengths) else 0.0

    def _terms(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        stop = None if self.params.stopwords == "none" else self.params.stopwords
        return bm25s.tokenize(list(texts), stopwords=stop, stemmer=self._index._stem, return_ids=False,
                              show_progress=False)

    def idf(self, term: str) -> float:
        df = self.df[self.vocab[term]] if term in self.vocab else 0.0
        return float(np.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5)))

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """float32 BM25 scores of (queries[i], passages[i])."""
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        from collections import Counter

        k1, b = self.params.k1, self.params.b
        qs, ps = self._terms(queries), self._terms(passages)
        out = np.zeros(len(qs), dtype=np.float64)
        for i, (q, p) in enumerate(zip(qs, ps)):
            tf = Counter(p)
            norm = k1 * (1 - b + b * len(p) / self.avgdl) if self.avgdl else k1
            out[i] = sum(self.idf(t) * tf[t] / (tf[t] + norm) for t in q if t in tf)
        return out.astype(np.float32)
