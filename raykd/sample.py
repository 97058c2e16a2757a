"""The embedded sample: a deterministic, MS MARCO-shaped collection with planted relevance.

Words come from a fixed lexicon of pseudo-words (the same for every seed, so one tiny tokenizer covers every
sample). Each query has three key terms; its relevant passage contains all of them among filler words. A query
writes each key term either as the word itself or as its planted synonym (``synonym_rate``), so exact term
matching (BM25) finds only part of the signal and a learned model can find more. Hard negatives share one key
term with the query. Every training query is repeated with ``negatives`` negatives in the id triples, the way
MS MARCO repeats each (query, positive) pair ~100 times. Some negatives are other queries' positives, so the
relevance cannot be learnt as a property of the passage alone.

Files written (MS MARCO's official names, tab-separated, UTF-8):
``collection.tsv`` (pid, text), ``queries.train.tsv`` / ``queries.dev.small.tsv`` (qid, text),
``qrels.train.tsv`` / ``qrels.dev.small.tsv`` (qid 0 pid 1), ``qidpidtriples.train.small.tsv``
(qid, pos_pid, neg_pid) and, with ``text_triples``, ``triples.train.small.tsv`` (query, pos, neg).

``preset="msmarco-full"`` writes MS MARCO's shape at full size instead (or a ``scale`` of it), streaming: see
:func:`write_msmarco_full`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd import storage
from raykd.config import field

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
LEXICON_SIZE = 1600
N_FILLER = 120
N_KEYS = 150


def lexicon() -> list[str]:
    """The fixed pseudo-word lexicon (independent of any seed)."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words = sorted({a + b for a in syllables for b in syllables} | {a + b + c for a in syllables[:20] for b in syllables[:20] for c in syllables[:4]})
    rng = random.Random(1234)
    rng.shuffle(words)
    return words[:LEXICON_SIZE]


@dataclass
class SampleSpec:
    """Size and shape of the sample. Defaults run the whole demo in a few minutes on 2 CPU cores."""

    seed: int = field(13, help="Random seed of the sample.")
    train_queries: int = field(200, help="Training queries (each with one positive).")
    dev_queries: int = field(100, help="Dev queries with qrels.")
    passages: int = field(4000, help="Passages in the collection.")
    negatives: int = field(100, help="Negatives per training query in the triples.")
    hard_negative_rate: float = field(0.3, help="Share of triple negatives drawn from the query's hard negatives "
                                                                     "(passages sharing a key term with it).")
    other_positive_rate: float = field(0.3, help="Share of triple negatives that are other training queries' "
                                                                      "positives.")
    synonym_rate: float = field(0.4, help="Chance that a query writes a key term as its planted synonym "
                                                               "(BM25 misses it).")
    passage_words: tuple[int, int] = field((20, 45), help="Words per passage (min, max).")
    text_triples: bool = field(False, help="Also write text triples (triples.train.small.tsv).")
    preset: str = field("demo", help="demo: the sizes above; msmarco-full: MS MARCO's sizes and file names, "
                                     "streamed (times --scale).", choices=["demo", "msmarco-full"])
    scale: float = field(1.0, help="msmarco-full only: the fraction of MS MARCO's sizes to write (0.01: 88,418 "
                                   "passages).")
    extra: dict = field({}, help="Free-form KEY=VALUE notes kept with the spec (the generator ignores them).")


def _vocab_split() -> tuple[list[str], list[str], dict[str, str]]:
    words = lexicon()
    filler = words[:N_FILLER]
    content = words[N_FILLER:]
    # a small topical vocabulary, so that every key term (and its synonym) recurs across training queries and a
    # model can learn the synonym pairs that exact term matching cannot see
    keys = content[:N_KEYS]
    synonyms = dict(zip(keys, content[N_KEYS : 2 * N_KEYS]))
    return filler, keys, synonyms


def generate(spec: SampleSpec) -> dict[str, list]:
    """The sample's rows, in memory (small by construction)."""
    rng = random.Random(spec.seed)
    filler, keys, synonyms = _vocab_split()
    n_queries = spec.train_queries + spec.dev_queries
    if spec.passages < n_queries * 2:
        raise ValueError(f"passages ({spec.passages}) must be at least twice the number of queries ({n_queries})")

    def passage_text(key_terms: list[str]) -> str:
        n = rng.randint(*spec.passage_words)
        words = [rng.choice(filler) for _ in range(n - len(key_terms))]
        for t in key_terms:
            words.insert(rng.randrange(len(words) + 1), t)
        return " ".join(words)

    def query_text(key_terms: list[str]) -> str:
        words = [synonyms[t] if rng.random() < spec.synonym_rate else t for t in key_terms]
        words.insert(rng.randrange(len(words) + 1), rng.choice(filler[:20]))
        return " ".join(words)

    # passage ids are shuffled integers, like MS MARCO's, not positions
    pids = rng.sample(range(spec.passages * 3), spec.passages)
    qids = rng.sample(range(1_000_000, 1_000_000 + n_queries * 20), n_queries)
    query_terms = [rng.sample(keys, 3) for _ in range(n_queries)]
    passages: dict[int, str] = {}
    positives: dict[int, int] = {}
    hard: dict[int, list[int]] = {}
    it = iter(pids)
    for qi, qid in enumerate(qids):
        pos = next(it)
        passages[pos] = passage_text(query_terms[qi])
        positives[qid] = pos
        # one hard negative per query: shares one key term, the others come from elsewhere
        hn = next(it)
        shared = [query_terms[qi][rng.randrange(3)]]
        passages[hn] = passage_text(shared + rng.sample(keys, 2))
        hard.setdefault(qid, []).append(hn)
    for pid in it:
        passages[pid] = passage_text(rng.sample(keys, 3))
    # more hard negatives: passages that happen to share a key term with the query
    by_term: dict[str, list[int]] = {}
    for pid, text in passages.items():
        for w in set(text.split()):
            by_term.setdefault(w, []).append(pid)
    for qi, qid in enumerate(qids):
        for t in query_terms[qi]:
            hard[qid].extend(p for p in by_term.get(t, []) if p != positives[qid])

    train_qids, dev_qids = qids[: spec.train_queries], qids[spec.train_queries :]
    all_pids = sorted(passages)
    triples = []
    for qid in train_qids:
        pos = positives[qid]
        for _ in range(spec.negatives):
            r = rng.random()
            if hard[qid] and r < spec.hard_negative_rate:
                neg = rng.choice(hard[qid])
            elif r < spec.hard_negative_rate + spec.other_positive_rate:
                # another query's positive: a good passage, but not for this query, so a model cannot learn
                # "this passage is a positive" and must match the query
                neg = positives[rng.choice(train_qids)]
                while neg == pos:
                    neg = positives[rng.choice(train_qids)]
            else:
                neg = rng.choice(all_pids)
                while neg == pos:
                    neg = rng.choice(all_pids)
            triples.append((qid, pos, neg))
    qtext = {qid: query_text(query_terms[i]) for i, qid in enumerate(qids)}
    return {
        "collection": [(pid, passages[pid]) for pid in all_pids],
        "queries.train": [(q, qtext[q]) for q in train_qids],
        "queries.dev.small": [(q, qtext[q]) for q in dev_qids],
        "qrels.train": [(q, positives[q]) for q in train_qids],
        "qrels.dev.small": [(q, positives[q]) for q in dev_qids],
        "triples": triples,
        "passages": passages,
        "queries": qtext,
    }


def write_sample(out_uri: str, spec: SampleSpec | None = None) -> dict[str, int]:
    """Write the sample's raw files under ``out_uri`` (local or s3://). Returns row counts per file."""
    spec = spec or SampleSpec()
    if spec.preset == "msmarco-full":
        return write_msmarco_full(out_uri, spec)
    if spec.preset != "demo":
        raise ValueError(f"unknown sample preset {spec.preset!r}: expected 'demo' or 'msmarco-full'")
    rows = generate(spec)
    storage.makedirs(out_uri)

    def tsv(name: str, lines) -> int:
        text = "".join("\t".join(str(c) for c in line) + "\n" for line in lines)
        storage.write_bytes_atomic(storage.join(out_uri, name), text.encode("utf-8"))
        return text.count("\n")

    counts = {
        "collection.tsv": tsv("collection.tsv", rows["collection"]),
        "queries.train.tsv": tsv("queries.train.tsv", rows["queries.train"]),
        "queries.dev.small.tsv": tsv("queries.dev.small.tsv", rows["queries.dev.small"]),
        "qrels.train.tsv": tsv("qrels.train.tsv", [(q, 0, p, 1) for q, p in rows["qrels.train"]]),
        "qrels.dev.small.tsv": tsv("qrels.dev.small.tsv", [(q, 0, p, 1) for q, p in rows["qrels.dev.small"]]),
        "qidpidtriples.train.small.tsv": tsv("qidpidtriples.train.small.tsv", rows["triples"]),
    }
    if spec.text_triples:
        p, q = rows["passages"], rows["queries"]
        counts["triples.train.small.tsv"] = tsv(
            "triples.train.small.tsv", [(q[a], p[b], p[c]) for a, b, c in rows["triples"]]
        )
    return counts


# ------------------------------------------------------------------------------------------------ msmarco-full
# MS MARCO passage ranking's sizes (v1): collection.tsv, queries.train.tsv, qrels.train.tsv (532,761 judgements of
# 502,939 queries), the small training triples (39,780,811 rows over ~400K queries, ~100 negatives each),
# queries.dev.small.tsv and qrels.dev.small.tsv (7,437 judgements of 6,980 queries)
MSMARCO_SIZES = {
    "passages": 8_841_823,
    "train_queries": 808_731,
    "train_judged_queries": 502_939,
    "train_qrels": 532_761,
    "triple_queries": 400_000,
    "triples": 39_780_811,
    "dev_queries": 6_980,
    "dev_qrels": 7_437,
}
# words per passage: MS MARCO's are ~56 on average (sd ~25, 2 to ~200): a log-normal with that mean and sd,
# rounded and clipped to [2, 200]; words per query ~6: 1 + Poisson(5), clipped to [2, 20]
PASSAGE_WORDS_MEAN, PASSAGE_WORDS_SD, PASSAGE_WORDS_RANGE = 56.0, 25.0, (2, 200)
QUERY_WORDS_POISSON, QUERY_WORDS_RANGE = 5.0, (2, 20)
FULL_LEXICON_SIZE = 50_000
ZIPF_EXPONENT = 1.0
FUNCTION_WORDS = 100  # the most frequent ranks; query words are drawn from the rest
PASSAGE_BLOCK = 100_000
QUERY_BLOCK = 20_000


def full_lexicon(n: int = FULL_LEXICON_SIZE) -> list[str]:
    """``n`` pseudo-words in frequency-rank order: the 2-syllable words first (frequent words are short), then
    3-syllable ones; fixed, independent of any seed."""
    syl = [c + v for c in CONSONANTS for v in VOWELS]
    rng = np.random.default_rng(1234)
    two = [syl[i // len(syl)] + syl[i % len(syl)] for i in rng.permutation(len(syl) ** 2)]
    picked = rng.choice(len(syl) ** 3, size=max(0, n - len(two)), replace=False)
    three = [syl[i // len(syl) ** 2] + syl[i // len(syl) % len(syl)] + syl[i % len(syl)] for i in picked]
    return (two + three)[:n]


def _scaled(scale: float) -> dict[str, int]:
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    n = {k: max(1, round(v * scale)) for k, v in MSMARCO_SIZES.items()}
    n["train_judged_queries"] = min(n["train_judged_queries"], n["train_queries"])
    n["train_qrels"] = min(max(n["train_qrels"], n["train_judged_queries"]), 2 * n["train_judged_queries"])
    n["triple_queries"] = min(n["triple_queries"], n["train_judged_queries"])
    n["triples"] = max(n["triples"], n["triple_queries"])
    n["dev_qrels"] = min(max(n["dev_qrels"], n["dev_queries"]), 2 * n["dev_queries"])
    if n["passages"] < n["train_qrels"] + n["dev_qrels"] + 1:
        raise ValueError(f"scale {scale} is too small: fewer passages than judgements")
    return n


def _lines(*columns: pa.Array) -> memoryview:
    """The bytes of ``col1<TAB>col2...<NEWLINE>`` for every row, joined in C++ (no Python loop per row)."""
    cols = [c if pa.types.is_string(c.type) else pc.cast(c, pa.string()) for c in columns]
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(*cols, "\t"), pa.array([""] * len(cols[0])), "\n")
    off = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[off[0] : off[-1]]


class _Words:
    """Texts from word ids: Zipf-distributed draws over :func:`full_lexicon`, joined in C++. A draw looks up a
    table of the inverse CDF at 2^22 points (every word gets >= 7 slots: exact enough, and ~10x faster than a
    binary search per word)."""

    TABLE = 1 << 22

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.lexicon = pa.array(full_lexicon())
        w = 1.0 / np.arange(1, len(self.lexicon) + 1) ** ZIPF_EXPONENT
        self.table = self._inverse_cdf(w)
        self.query_table = self._inverse_cdf(w[FUNCTION_WORDS:]) + FUNCTION_WORDS

    def _inverse_cdf(self, w: np.ndarray) -> np.ndarray:
        ends = np.rint(np.cumsum(w) / w.sum() * self.TABLE).astype(np.int64)
        return np.repeat(np.arange(len(w), dtype=np.int32), np.diff(ends, prepend=0))

    def draw(self, n: int, query: bool = False) -> np.ndarray:
        return (self.query_table if query else self.table)[self.rng.integers(0, self.TABLE, n, dtype=np.int32)]

    def texts(self, ids: np.ndarray, lengths: np.ndarray) -> pa.Array:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        words = pa.ListArray.from_arrays(pa.array(offsets), self.lexicon.take(pa.array(ids)))
        return pc.binary_join(words, " ")


def _lengths(rng: np.random.Generator, n: int, query: bool = False) -> np.ndarray:
    if query:
        lo, hi = QUERY_WORDS_RANGE
        return np.clip(1 + rng.poisson(QUERY_WORDS_POISSON, n), lo, hi).astype(np.int32)
    sigma2 = np.log(1 + (PASSAGE_WORDS_SD / PASSAGE_WORDS_MEAN) ** 2)
    mu = np.log(PASSAGE_WORDS_MEAN) - sigma2 / 2
    lo, hi = PASSAGE_WORDS_RANGE
    return np.clip(np.rint(rng.lognormal(mu, np.sqrt(sigma2), n)), lo, hi).astype(np.int32)


def write_msmarco_full(out_uri: str, spec: SampleSpec) -> dict[str, int]:
    """MS MARCO passage ranking's shape at full size (``spec.scale`` = 1) or a fraction of it, streamed to
    ``out_uri`` (local or s3://) a block at a time: the collection is never held in memory (what is held: one
    int32 a passage marking the positives, and the queries' word ids).

    Files: ``collection.tsv`` (pids 0..N-1 in order, like MS MARCO's), ``queries.train.tsv``,
    ``qrels.train.tsv`` (some queries judged twice, none for ~38% of train queries, as in MS MARCO),
    ``qidpidtriples.train.small.tsv`` (the id version of MS MARCO's small triples: every triple query with
    ~100 negatives), ``queries.dev.small.tsv``, ``qrels.dev.small.tsv``. A judged passage contains every word
    of its query (relevance is planted, so BM25 finds it); negatives are drawn uniformly from the collection.
    Deterministic per seed and scale. Returns row counts per file."""
    if spec.text_triples:
        raise ValueError("text triples at msmarco-full size are ~27 GB of passage text; use the id triples")
    n = _scaled(spec.scale)
    rng = np.random.default_rng(spec.seed)
    words = _Words(rng)
    storage.makedirs(out_uri)
    counts: dict[str, int] = {}

    # queries: train (first the judged ones, of which the first are in the triples), then dev; ids are random
    n_q = n["train_queries"] + n["dev_queries"]
    qids = rng.choice(max(2 * n_q, round(1_200_000 * spec.scale)), size=n_q, replace=False).astype(np.int64)
    qlen = _lengths(rng, n_q, query=True)
    qoff = np.zeros(n_q + 1, dtype=np.int64)
    np.cumsum(qlen, out=qoff[1:])
    qwords = words.draw(int(qoff[-1]), query=True)
    # judgements: (query index, pid); each judged query once, the first few twice; pids distinct
    tr, dv = n["train_queries"], n["dev_queries"]
    judged = np.concatenate(
        [
            np.arange(n["train_judged_queries"]),
            np.arange(n["train_qrels"] - n["train_judged_queries"]),
            tr + np.arange(dv),
            tr + np.arange(n["dev_qrels"] - dv),
        ]
    )
    judged_pid = rng.permutation(n["passages"])[: len(judged)].astype(np.int64)
    query_of_pid = np.full(n["passages"], -1, dtype=np.int32)
    query_of_pid[judged_pid] = judged

    def write(name: str, blocks) -> None:
        rows = 0
        with storage.open_write_atomic(storage.join(out_uri, name)) as f:
            for k, data in blocks:
                f.write(data)
                rows += k
        counts[name] = rows

    def passage_blocks():
        for start in range(0, n["passages"], PASSAGE_BLOCK):
            pids = np.arange(start, min(start + PASSAGE_BLOCK, n["passages"]), dtype=np.int64)
            lengths = _lengths(rng, len(pids))
            q = query_of_pid[pids]
            planted = np.flatnonzero(q >= 0)
            lengths[planted] = np.maximum(lengths[planted], qlen[q[planted]] + 1)
            off = np.zeros(len(pids) + 1, dtype=np.int64)
            np.cumsum(lengths, out=off[1:])
            ids = words.draw(int(off[-1]))
            # a positive holds its query's words at spread positions (distinct: the passage is longer)
            k = qlen[q[planted]]
            row = np.repeat(planted, k)
            j = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
            u = np.repeat(rng.random(len(planted)), k)
            kk = np.repeat(k, k)
            pos = off[row] + ((j + u) * lengths[row] / kk).astype(np.int64)
            ids[pos] = qwords[qoff[q[row]] + j]
            yield len(pids), _lines(pa.array(pids), words.texts(ids, lengths))

    def query_blocks(lo: int, hi: int):
        for start in range(lo, hi, QUERY_BLOCK):
            idx = np.arange(start, min(start + QUERY_BLOCK, hi))
            ids = np.concatenate([qwords[qoff[i] : qoff[i + 1]] for i in idx]) if len(idx) else np.empty(0, np.int32)
            yield len(idx), _lines(pa.array(qids[idx]), words.texts(ids, qlen[idx]))

    def qrels_blocks(lo: int, hi: int):
        sel = (judged >= lo) & (judged < hi)
        q, p = qids[judged[sel]], judged_pid[sel]
        zeros, ones = pa.array(np.zeros(len(q), np.int64)), pa.array(np.ones(len(q), np.int64))
        yield len(q), _lines(pa.array(q), zeros, pa.array(p), ones)

    def triple_blocks():
        nq, total = n["triple_queries"], n["triples"]
        per = np.full(nq, total // nq, dtype=np.int64)
        per[: total % nq] += 1
        first_pid = judged_pid[:nq]  # the triple queries are the first judged ones: their first positive
        for start in range(0, nq, QUERY_BLOCK):
            idx = np.arange(start, min(start + QUERY_BLOCK, nq))
            q = np.repeat(qids[idx], per[idx])
            p = np.repeat(first_pid[idx], per[idx])
            neg = rng.integers(0, n["passages"], len(q), dtype=np.int64)
            neg = np.where(neg == p, (neg + 1) % n["passages"], neg)
            yield len(q), _lines(pa.array(q), pa.array(p), pa.array(neg))

    write("collection.tsv", passage_blocks())
    write("queries.train.tsv", query_blocks(0, tr))
    write("queries.dev.small.tsv", query_blocks(tr, tr + dv))
    write("qrels.train.tsv", qrels_blocks(0, tr))
    write("qrels.dev.small.tsv", qrels_blocks(tr, tr + dv))
    write("qidpidtriples.train.small.tsv", triple_blocks())
    return counts
