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
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
