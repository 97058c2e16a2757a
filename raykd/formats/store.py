"""The text store: what ``raykd prepare`` writes and every later stage reads (format ``raykd.text_store`` v1).

Layout under the store URI::

    corpus/part-NNNNN.parquet     pid int64, doc_id string, title string, text string   (sharded, in input
                                  order)
    queries/<split>.parquet       qid int64, query_id string, text string
    qrels/<split>.parquet         qid int64, query_id string, pid int64 (null if not in the corpus),
                                  doc_id string, relevance int32
    triples/part-NNNNN.parquet    qid int64, pos_pid int64, neg_pid int64               (if triples were given)
    mined/<name>/                 named triples sets written later by ``raykd mine`` (format
                                  ``raykd.mined_triples``, each with its own manifest): triples/ and groups/
    quarantine/<file>.tsv         rejected input lines (lenient mode only): line, reason, raw
    manifest.json                 stage "prepare"; counts per table and split; written last

The default triples (``triples/``) are prepare's; a named set (:meth:`TextStore.triples` with a name) is one
``raykd mine`` wrote into ``mined/<name>/``. A named set is a finished output of its own (manifest, resume,
``--overwrite``), so mining never rewrites the store's manifest; prepare's ``--overwrite`` of the store removes
its named sets with it (they were mined from it).

``pid``/``qid`` are the integer keys every stage joins on. MS MARCO ids are integers and are kept as they
are; BEIR ids are strings in general ("MED-10"), so a BEIR corpus gets ``pid`` = its row number in
corpus.jsonl order and keeps the original id in ``doc_id`` (``query_id`` likewise). Run files use the
original ids. Qrels keep both: a judged document missing from the corpus keeps its ``doc_id`` with a null
``pid`` (and is counted in the manifest), so evaluation never loses a judgement.
"""

from __future__ import annotations

from functools import cached_property

import pyarrow as pa

from raykd import storage
from raykd.texts import DEFAULT_MAX_BLOCK_BYTES, TextLookup, passage_lookup
from raykd.texts import (
    passage_text as passage_text,  # its home was here; score and search import it from here
)

FORMAT = "raykd.text_store"
VERSION = 1

CORPUS_SCHEMA = pa.schema(
    [("pid", pa.int64()), ("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())]
)
QUERIES_SCHEMA = pa.schema([("qid", pa.int64()), ("query_id", pa.string()), ("text", pa.string())])
QRELS_SCHEMA = pa.schema(
    [
        ("qid", pa.int64()),
        ("query_id", pa.string()),
        ("pid", pa.int64()),
        ("doc_id", pa.string()),
        ("relevance", pa.int32()),
    ]
)
TRIPLES_SCHEMA = pa.schema([("qid", pa.int64()), ("pos_pid", pa.int64()), ("neg_pid", pa.int64())])
GROUPS_SCHEMA = pa.schema([("qid", pa.int64()), ("pos_pid", pa.int64()), ("neg_pids", pa.list_(pa.int64()))])
MINED = "mined"  # the folder of named triples sets under a store
MINED_FORMAT = "raykd.mined_triples"
MINED_VERSION = 1


class TextStore:
    """Read access to a finished text store. Refuses a store without a finished manifest."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.manifest = storage.read_manifest(self.uri, stage="prepare", format=FORMAT)

    @property
    def corpus_uri(self) -> str:
        return storage.join(self.uri, "corpus")

    @property
    def triples_uri(self) -> str:
        return storage.join(self.uri, "triples")

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["counts"].get("queries", {}))

    def has_triples(self) -> bool:
        return self.manifest["counts"].get("triples", 0) > 0

    def _split_uri(self, table: str, split: str) -> str:
        if split not in self.manifest["counts"].get(table, {}):
            raise KeyError(
                f"{self.uri}: no {table} for split {split!r}; this store has: "
                f"{', '.join(sorted(self.manifest['counts'].get(table, {}))) or 'none'}"
            )
        return storage.join(self.uri, table, f"{split}.parquet")

    def queries(self, split: str) -> pa.Table:
        return storage.read_parquet(self._split_uri("queries", split))

    def qrels(self, split: str) -> pa.Table:
        return storage.read_parquet(self._split_uri("qrels", split))

    def has_qrels(self, split: str) -> bool:
        return split in self.manifest["counts"].get("qrels", {})

    def corpus(self, columns: list[str] | None = None) -> pa.Table:
        """The whole corpus in memory: for small collections and tests. At scale, read parts or use Ray Data."""
        return storage.read_parquet(self.corpus_uri, columns=columns)

    def corpus_parts(self) -> list[str]:
        return storage.parquet_parts(self.corpus_uri)

    def triples(self, name: str | None = None) -> pa.Table:
        """prepare's triples, or (``name``) the triples of a named set mined into this store."""
        if name is None:
            return storage.read_parquet(self.triples_uri)
        return storage.read_parquet(storage.join(self.triples_set(name), "triples"))

    def groups(self, name: str) -> pa.Table:
        """The n-way groups (``qid, pos_pid, neg_pids``) of a named set mined into this store."""
        return storage.read_parquet(storage.join(self.triples_set(name), "groups"))

    def triples_set_uri(self, name: str) -> str:
        """Where the named triples set ``name`` lives (or will live): ``<store>/mined/<name>``."""
        if not is_set_name(name):
            raise ValueError(f"triples set name {name!r}: use letters, digits, '.', '_' and '-' only")
        return storage.join(self.uri, MINED, name)

    def triples_set(self, name: str) -> str:
        """The URI of the finished named triples set ``name``; refuses an unfinished or unknown one."""
        uri = self.triples_set_uri(name)
        if not storage.has_manifest(uri):
            known = ", ".join(self.triples_sets()) or "none"
            raise KeyError(f"{self.uri}: no finished triples set {name!r} (mine it with `raykd mine --out {name}`); "
                           f"finished sets: {known}")
        storage.read_manifest(uri, stage="mine", format=MINED_FORMAT)
        return uri

    def triples_sets(self) -> list[str]:
        """Names of the finished triples sets mined into this store."""
        root = storage.join(self.uri, MINED)
        return [n for n in storage.listdir(root) if storage.has_manifest(storage.join(root, n))]

    @cached_property
    def _passages(self) -> TextLookup:
        return self.passage_lookup()

    def passage_lookup(self, pids=None, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> TextLookup:
        """The corpus (or only ``pids`` of it) as pid-sorted blocks of at most ``max_block_bytes``
        (:mod:`raykd.texts`): no array over 2 GiB is built, however large the collection."""
        return passage_lookup(self.corpus_parts(), pids, max_block_bytes, where=f"the corpus of {self.uri}")

    def query_lookup(self, split: str) -> TextLookup:
        return TextLookup.from_table(self.queries(split), "qid", "text", "qid", f"split {split!r} of {self.uri}")

    def passages(self, pids) -> list[str]:
        """Texts (``title + " " + text`` when a title is present) of ``pids``, in order; a KeyError names a pid
        that is not in the corpus. Holds the whole corpus in this process: a stage uses :mod:`raykd.texts`."""
        return self._passages.texts(pids)

    def doc_ids(self, pids) -> list[str]:
        return self._doc_ids.texts(pids)

    @cached_property
    def _doc_ids(self) -> TextLookup:
        return passage_lookup(self.corpus_parts(), text_column="doc_id", where=f"the corpus of {self.uri}")


def is_set_name(name: str) -> bool:
    """A bare name of a triples set (``bm25-hn``), as opposed to a URI."""
    return bool(name) and all(c.isalnum() or c in "._-" for c in name) and name not in (".", "..")

