"""The embedded sample: deterministic, MS MARCO-shaped, relevance planted (learnable), pairs repeated."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raykd import storage
from raykd.errors import FormatError
from raykd.formats.store import TextStore
from raykd.sample import SampleSpec, generate, lexicon, write_sample
from raykd.stages.prepare import PrepareConfig, prepare
from raykd.tiny import vocabulary


def test_deterministic_per_seed_and_different_across_seeds():
    a, b, c = generate(SampleSpec(seed=1)), generate(SampleSpec(seed=1)), generate(SampleSpec(seed=2))
    assert a["triples"] == b["triples"] and a["collection"] == b["collection"]
    assert a["triples"] != c["triples"]


def test_triples_repeat_each_query_positive_pair_like_msmarco():
    spec = SampleSpec(train_queries=50, negatives=100, passages=1000, dev_queries=10)
    rows = generate(spec)
    pairs = Counter((q, p) for q, p, _ in rows["triples"])
    assert len(pairs) == 50 and set(pairs.values()) == {100}
    unique = {(q, p) for q, p, _ in rows["triples"]} | {(q, n) for q, _, n in rows["triples"]}
    # scoring unique pairs instead of 2 x triples saves at least the (query, positive) repeats: 99 of every
    # 200 passes, MS MARCO's ~49.5% (hard negatives repeat too, so a little more here)
    assert 0.495 <= 1 - len(unique) / (2 * len(rows["triples"])) < 0.7


def test_relevance_is_planted_not_random():
    """The positive shares more (query term or its synonym) words with the query than negatives do."""
    from raykd.sample import _vocab_split

    _, _, synonyms = _vocab_split()
    back = {v: k for k, v in synonyms.items()}
    rows = generate(SampleSpec(train_queries=100, dev_queries=10, passages=1000, negatives=20))
    q, p = rows["queries"], rows["passages"]

    def overlap(qid, pid):
        terms = {back.get(w, w) for w in q[qid].split()}
        return len(terms & set(p[pid].split()))

    pos = [overlap(a, b) for a, b, _ in rows["triples"]]
    neg = [overlap(a, c) for a, _, c in rows["triples"]]
    wins = sum(x > y for x, y in zip(pos, neg)) / len(pos)
    assert wins > 0.95  # a term-and-synonym matcher ranks the positive first almost always
    assert sum(pos) / len(pos) >= 3
    # ... but exact matching alone does not: synonyms hide part of the signal from BM25
    exact = [len(set(q[a].split()) & set(p[b].split())) for a, b, _ in rows["triples"]]
    assert sum(e < 3 for e in exact) / len(exact) > 0.5


def test_tiny_vocabulary_covers_the_lexicon():
    vocab = set(vocabulary())
    assert set(lexicon()) <= vocab and {"[CLS]", "[SEP]", "[MASK]", "[Q]", "[D]"} <= vocab


def test_tiny_tokenizer_can_hold_the_full_presets_words(tmp_path):
    from raykd.sample import full_lexicon
    from raykd.tiny import write_tokenizer

    words = full_lexicon()
    assert len(set(vocabulary(words)) & set(words)) == len(words)
    tok = write_tokenizer(str(tmp_path), words)
    assert tok.tokenize(f"{words[0]} {words[-1]}") == [words[0], words[-1]]  # whole words, not characters
    assert "[UNK]" not in write_tokenizer(str(tmp_path / "demo")).tokenize(words[-1])  # characters, never [UNK]


def _digest(folder) -> str:
    import hashlib
    import os

    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode())
        h.update(open(os.path.join(folder, name), "rb").read())
    return h.hexdigest()


def test_default_sample_files_are_unchanged(tmp_path):
    """The demo and the tests rely on the default sample: its files stay byte-identical."""
    write_sample(str(tmp_path / "d"))
    assert _digest(tmp_path / "d") == "a503d834b71ef2d318f4ab7ba65408f0329419220a9729a23d2a772be70212e5"


# ------------------------------------------------------------------------------------------------ msmarco-full

TINY_FULL = SampleSpec(preset="msmarco-full", scale=0.001)


def _tsv(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_msmarco_full_has_msmarcos_shape(tmp_path):
    counts = write_sample(str(tmp_path / "m"), TINY_FULL)
    # MS MARCO's sizes x 0.001: 8,841,823 passages, 808,731 train queries, 532,761 train judgements of 502,939
    # queries, 39,780,811 triples over ~400K queries, 6,980 dev queries with 7,437 judgements
    assert counts == {
        "collection.tsv": 8842, "queries.train.tsv": 809, "queries.dev.small.tsv": 7, "qrels.train.tsv": 533,
        "qrels.dev.small.tsv": 7, "qidpidtriples.train.small.tsv": 39781,
    }
    d = tmp_path / "m"
    coll = _tsv(d / "collection.tsv")
    assert [int(p) for p, _ in coll] == list(range(8842))
    words = np.array([len(t.split()) for _, t in coll])
    assert 52 <= words.mean() <= 60 and 20 <= words.std() <= 30 and words.min() >= 2 and words.max() <= 200
    queries = {int(q): t for q, t in _tsv(d / "queries.train.tsv") + _tsv(d / "queries.dev.small.tsv")}
    assert len(queries) == 816 and 5 <= np.mean([len(t.split()) for t in queries.values()]) <= 7
    passages = {int(p): set(t.split()) for p, t in coll}
    qrels = _tsv(d / "qrels.train.tsv") + _tsv(d / "qrels.dev.small.tsv")
    assert all(r[1] == "0" and r[3] == "1" for r in qrels)
    assert all(set(queries[int(q)].split()) <= passages[int(p)] for q, _, p, _ in qrels)  # relevance planted
    triples = np.array(_tsv(d / "qidpidtriples.train.small.tsv"), dtype=np.int64)
    qs, per = np.unique(triples[:, 0], return_counts=True)
    assert len(qs) == 400 and set(per) <= {99, 100} and (triples[:, 1] != triples[:, 2]).all()
    assert {(int(q), int(p)) for q, _, p, _ in qrels} >= {(int(q), int(p)) for q, p, _ in triples}


def test_msmarco_full_is_deterministic_and_streams_to_s3(tmp_path, s3_uri):
    write_sample(str(tmp_path / "a"), TINY_FULL)
    remote = storage.join(s3_uri, "m")
    write_sample(remote, TINY_FULL)
    for name in storage.listdir(remote):
        assert storage.read_bytes(storage.join(remote, name)) == (tmp_path / "a" / name).read_bytes()
    assert sorted(storage.listdir(remote)) == sorted(p.name for p in (tmp_path / "a").iterdir())
    write_sample(str(tmp_path / "b"), SampleSpec(preset="msmarco-full", scale=0.001, seed=14))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "b")


def test_msmarco_full_prepares_into_a_store_with_its_counts(tmp_path, s3_uri):
    """sample -> prepare at MS MARCO's shape, from S3: every row arrives; an unknown pid is reported by line."""
    raw = storage.join(s3_uri, "raw")
    counts = write_sample(raw, TINY_FULL)
    m = prepare(PrepareConfig(msmarco=raw, out=str(tmp_path / "store"), part_rows=10_000))
    assert m.counts["corpus"] == counts["collection.tsv"] and m.counts["triples"] == counts["qidpidtriples.train.small.tsv"]
    assert m.counts["queries"] == {"train": 809, "dev": 7} and m.counts["qrels"] == {"train": 533, "dev": 7}
    assert m.counts["qrels_docs_not_in_corpus"] == {"train": 0, "dev": 0}
    assert len(TextStore(str(tmp_path / "store")).corpus_parts()) == 1
    data = storage.read_bytes(storage.join(raw, "qidpidtriples.train.small.tsv")).splitlines(keepends=True)
    data[30_000] = data[30_000].rsplit(b"\t", 1)[0] + b"\t99999999\n"
    storage.write_bytes_atomic(storage.join(raw, "qidpidtriples.train.small.tsv"), b"".join(data))
    with pytest.raises(FormatError, match=r"qidpidtriples.train.small.tsv, line 30001: passage 99999999 does not exist"):
        prepare(PrepareConfig(msmarco=raw, out=str(tmp_path / "bad")))
    m = prepare(PrepareConfig(msmarco=raw, out=str(tmp_path / "lenient"), lenient=True))
    assert m.counts["triples"] == counts["qidpidtriples.train.small.tsv"] - 1
    assert m.counts["quarantined"] == {"qidpidtriples.train.small.tsv": 1}
