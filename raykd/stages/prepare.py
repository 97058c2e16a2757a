"""prepare: raw inputs (an MS MARCO folder or a BEIR folder, plus extra query/qrels files) -> the text store.

Writes the layout of :mod:`raykd.formats.store`: corpus and triples as Parquet parts of ``part_rows`` rows,
queries and qrels per split, an optional quarantine, then ``manifest.json``. It streams: the collection and the
triples are read line by line and written part by part, so neither needs to fit in memory (what is kept is the
sorted array of passage ids, 8 bytes a passage, to catch duplicates and check triples; text triples also need a
hash of every passage text).

Parts are numbered by position in the input, so a re-run over the same inputs rewrites nothing that is already
committed and can never duplicate rows: a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raykd import finished, storage
from raykd.config import field
from raykd.errors import FormatError, UserError
from raykd.formats import raw
from raykd.formats.lines import Quarantine, open_text_lines
from raykd.formats.store import CORPUS_SCHEMA, FORMAT, QRELS_SCHEMA, QUERIES_SCHEMA, TRIPLES_SCHEMA, VERSION
from raykd.log import Progress, get_logger

log = get_logger("prepare")


@dataclass
class PrepareConfig:
    SECTION = "prepare"

    msmarco: str | None = field(None, help="Folder (or s3:// prefix) with MS MARCO's official file names.")
    beir: str | None = field(None, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    out: str | None = field(None, help="Output URI of the text store.", fingerprint=False)
    extra_queries: list[str] = field([], help="Extra query splits as SPLIT=FILE (qid<TAB>text, e.g. "
                                                 "dl19=topics.dl19-passage.txt).", flag="--queries")
    extra_qrels: list[str] = field([], help="Extra qrels as SPLIT=FILE (TREC 4 columns or BEIR tsv).",
                                    flag="--qrels")
    triples: str | None = field(None, help="Triples file (id or text triples) instead of the folder's own.")
    part_rows: int = field(500_000, help="Rows per Parquet part of the corpus and of the triples.")
    lenient: bool = field(False, help="Quarantine bad rows (listed in quarantine/, counted) instead of failing.",
                          flag="--lenient/--strict")
    overwrite: bool = field(False, help="Replace an existing output made with other settings instead of refusing.",
                            fingerprint=False)


def _find(folder: str, names: list[str]) -> str | None:
    for name in names:
        for candidate in (name, name + ".gz"):
            uri = storage.join(folder, candidate)
            if storage.exists(uri):
                return uri
    return None


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    if "=" not in spec:
        raise UserError(f"{what} {spec!r}: expected SPLIT=FILE, e.g. dl19=topics.dl19-passage.txt")
    split, uri = spec.split("=", 1)
    return split.strip(), uri.strip()


class _IdSet:
    """Sorted int64 ids seen so far; membership and duplicate checks in O(n log n) numpy work per chunk."""

    def __init__(self) -> None:
        self.ids = np.empty(0, dtype=np.int64)

    def add_chunk(self, ids: np.ndarray) -> np.ndarray:
        """Add ``ids``; returns a boolean mask of those that are duplicates (of earlier chunks or earlier in this
        chunk). Duplicates are not added twice."""
        dup = np.isin(ids, self.ids)
        _, first = np.unique(ids, return_index=True)
        within = np.ones(len(ids), dtype=bool)
        within[first] = False
        dup |= within
        self.ids = np.union1d(self.ids, ids[~dup])
        return dup

    def contains(self, ids: np.ndarray) -> np.ndarray:
        if len(self.ids) == 0:
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids


class _PartWriter:
    """Buffers rows and commits them as numbered Parquet parts; a part that already exists is skipped."""

    def __init__(self, uri: str, schema: pa.Schema, part_rows: int):
        self.uri, self.schema, self.part_rows = uri, schema, part_rows
        self.rows: list[tuple] = []
        self.parts: list[str] = []
        self.count = 0
        self.skipped = 0

    def add(self, row: tuple) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"part-{len(self.parts):05d}.parquet"
        uri = storage.join(self.uri, name)
        if storage.exists(uri):
            self.skipped += 1
        else:
            cols = list(zip(*self.rows))
            table = pa.table({f.name: pa.array(c, type=f.type) for f, c in zip(self.schema, cols)}, schema=self.schema)
            storage.write_parquet_atomic(table, uri)
        self.parts.append(name)
        self.count += len(self.rows)
        self.rows = []


def prepare(cfg: PrepareConfig) -> storage.Manifest:
    """Run the prepare stage; returns its manifest (the existing one if the output is already finished)."""
    if not cfg.out:
        raise UserError("prepare needs --out: where to write the text store")
    if cfg.msmarco and cfg.beir:
        raise UserError("give either --msmarco or --beir, not both")
    if not (cfg.msmarco or cfg.beir or cfg.extra_queries):
        raise UserError("nothing to prepare: give --msmarco DIR, --beir DIR or --queries SPLIT=FILE")
    if cfg.part_rows < 1:
        raise UserError(f"part_rows must be positive, got {cfg.part_rows}")
    claim = finished.claim(cfg.out, "prepare", finished.fingerprint(cfg), cfg.overwrite)
    if claim.finished:
        log.info("%s is already a finished text store; nothing to do", cfg.out)
        return claim.manifest
    return _Prepare(cfg, claim.fingerprint).run()


class _Prepare:
    def __init__(self, cfg: PrepareConfig, fingerprint: dict):
        self.cfg, self.fingerprint = cfg, fingerprint
        self.q = Quarantine(cfg.out, strict=not cfg.lenient)
        self.beir = bool(cfg.beir)
        self.inputs: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.pids = _IdSet()
        self.doc_pid: dict[str, int] = {}  # BEIR: original doc id -> pid
        self.query_qid: dict[str, int] = {}  # BEIR: original query id -> qid
        self.text_pid: dict[int, int] | None = None  # text triples: hash(passage text) -> pid
        self.queries: dict[str, list[tuple[int, str, str]]] = {}
        self.counts: dict = {"queries": {}, "qrels": {}, "qrels_docs_not_in_corpus": {}, "qrels_queries_without_text": {}}

    # ------------------------------------------------------------------------------------------- driver
    def run(self) -> storage.Manifest:
        cfg, t0 = self.cfg, time.time()
        storage.makedirs(cfg.out)
        triples_uri = self._triples_input()
        if triples_uri:
            first = next(iter(open_text_lines(triples_uri)))[1]
            self.text_triples = raw.looks_like_text_triples(first)
            if self.text_triples:
                self.text_pid = {}
        corpus_uri = self._corpus_input()
        if corpus_uri:
            self._corpus(corpus_uri)
        self._all_queries()
        self._all_qrels()
        if triples_uri:
            self._triples(triples_uri)
        else:
            self.counts["triples"] = 0
        self.counts["quarantined"] = self.q.write()
        self.timings["total_s"] = round(time.time() - t0, 3)
        m = storage.write_manifest(
            cfg.out,
            "prepare",
            format=FORMAT,
            format_version=VERSION,
            config=dataclasses.asdict(cfg),
            inputs=self.inputs,
            counts=self.counts,
            stats={"id_mode": "beir_row_number" if self.beir else "msmarco_integer"},
            parts=self.parts,
            timings=self.timings,
            fingerprint=self.fingerprint,
        )
        log.info("text store written to %s: %s", cfg.out, {k: v for k, v in self.counts.items() if v})
        return m

    @property
    def parts(self) -> list[str]:
        return getattr(self, "_parts", [])

    def _add_parts(self, prefix: str, names: list[str]) -> None:
        self._parts = self.parts + [f"{prefix}/{n}" for n in names]

    # ------------------------------------------------------------------------------------------- inputs
    def _corpus_input(self) -> str | None:
        if self.cfg.msmarco:
            uri = _find(self.cfg.msmarco, raw.MSMARCO_FILES["collection"])
            if uri is None:
                raise FileNotFoundError(f"{self.cfg.msmarco}: no collection.tsv (or .gz); expected MS MARCO's file names")
            return uri
        if self.cfg.beir:
            uri = _find(self.cfg.beir, ["corpus.jsonl"])
            if uri is None:
                raise FileNotFoundError(f"{self.cfg.beir}: no corpus.jsonl (or .gz); expected a BEIR folder")
            return uri
        return None

    def _triples_input(self) -> str | None:
        if self.cfg.triples:
            if not storage.exists(self.cfg.triples):
                raise FileNotFoundError(f"{self.cfg.triples}: triples file does not exist")
            return self.cfg.triples
        if self.cfg.msmarco:
            return _find(self.cfg.msmarco, raw.MSMARCO_FILES["id_triples"]) or _find(
                self.cfg.msmarco, raw.MSMARCO_FILES["text_triples"]
            )
        return None

    # ------------------------------------------------------------------------------------------- corpus
    def _corpus(self, uri: str) -> None:
        t0 = time.time()
        self.inputs["corpus"] = uri
        writer = _PartWriter(storage.join(self.cfg.out, "corpus"), CORPUS_SCHEMA, self.cfg.part_rows)
        progress = Progress(log, f"corpus {uri}")
        chunk: list[tuple[int, int, str, str, str]] = []  # (line, pid, doc_id, title, text)

        def flush_chunk() -> None:
            if not chunk:
                return
            if not self.beir:
                ids = np.fromiter((c[1] for c in chunk), dtype=np.int64, count=len(chunk))
                dup = self.pids.add_chunk(ids)
            else:
                dup = np.zeros(len(chunk), dtype=bool)
            for (ln, pid, doc_id, title, text), d in zip(chunk, dup):
                if d:
                    self.q.report(FormatError(uri, ln, f"duplicate passage id {doc_id} (already defined earlier)"), text)
                    continue
                writer.add((pid, doc_id, title, text))
                if self.text_pid is not None:
                    self.text_pid[hash(text)] = pid
            chunk.clear()

        for ln, line in open_text_lines(uri, self.q.report):
            progress.update()
            try:
                if self.beir:
                    doc_id, title, text = raw.parse_beir_doc(uri, ln, line)
                    if doc_id in self.doc_pid:
                        raise FormatError(uri, ln, f"duplicate document id {doc_id!r} (already defined earlier)")
                    pid = len(self.doc_pid)
                    self.doc_pid[doc_id] = pid
                else:
                    pid, text = raw.parse_collection(uri, ln, line)
                    doc_id, title = str(pid), ""
            except FormatError as e:
                self.q.report(e, line)
                continue
            chunk.append((ln, pid, doc_id, title, text))
            if len(chunk) >= min(self.cfg.part_rows, 200_000):
                flush_chunk()
        flush_chunk()
        writer.flush()
        if self.beir:
            self.pids.add_chunk(np.arange(len(self.doc_pid), dtype=np.int64))
        if writer.count == 0:
            raise FormatError(uri, None, "no valid passages in the corpus")
        self.counts["corpus"] = writer.count
        self.counts["corpus_parts_resumed"] = writer.skipped
        self._add_parts("corpus", writer.parts)
        self.timings["corpus_s"] = round(progress.close(), 3)
        log.info("corpus: %s passages in %d part(s) (%.1f s)", f"{writer.count:,}", len(writer.parts), time.time() - t0)

    # ------------------------------------------------------------------------------------------- queries
    def _all_queries(self) -> None:
        sources: list[tuple[str, str]] = []
        if self.cfg.msmarco:
            for split, key in (("train", "queries.train"), ("dev", "queries.dev")):
                uri = _find(self.cfg.msmarco, raw.MSMARCO_FILES[key])
                if uri:
                    sources.append((split, uri))
        if self.cfg.beir:
            uri = _find(self.cfg.beir, ["queries.jsonl"])
            if uri is None:
                raise FileNotFoundError(f"{self.cfg.beir}: no queries.jsonl; expected a BEIR folder")
            sources.append(("all", uri))
        sources += [_split_spec(s, "--queries") for s in self.cfg.extra_queries]
        for split, uri in sources:
            self._queries(split, uri)

    def _queries(self, split: str, uri: str) -> None:
        self.inputs[f"queries.{split}"] = uri
        rows: list[tuple[int, str, str]] = []
        seen: set[int] = set()
        jsonl = uri.endswith(".jsonl") or uri.endswith(".jsonl.gz")
        for ln, line in open_text_lines(uri, self.q.report):
            try:
                if jsonl:
                    query_id, text = raw.parse_beir_query(uri, ln, line)
                    qid = self.query_qid.setdefault(query_id, len(self.query_qid)) if self.beir else int(query_id)
                else:
                    qid, text = raw.parse_query(uri, ln, line)
                    query_id = str(qid)
                    if self.beir:  # an extra topics file beside a BEIR folder: ids share the BEIR mapping
                        qid = self.query_qid.setdefault(query_id, len(self.query_qid))
                if qid in seen:
                    raise FormatError(uri, ln, f"duplicate query id {query_id}")
                if not text.strip():
                    raise FormatError(uri, ln, f"query {query_id} has empty text")
            except (FormatError, ValueError) as e:
                err = e if isinstance(e, FormatError) else FormatError(uri, ln, f"query id must be an integer: {e}")
                self.q.report(err, line)
                continue
            seen.add(qid)
            rows.append((qid, query_id, text))
        self.queries[split] = rows
        self._write_split("queries", split, rows, QUERIES_SCHEMA)

    def _write_split(self, table: str, split: str, rows: list[tuple], schema: pa.Schema) -> None:
        cols = list(zip(*rows)) if rows else [[] for _ in schema]
        t = pa.table({f.name: pa.array(c, type=f.type) for f, c in zip(schema, cols)}, schema=schema)
        storage.write_parquet_atomic(t, storage.join(self.cfg.out, table, f"{split}.parquet"))
        self.counts[table][split] = len(rows)
        self._add_parts(table, [f"{split}.parquet"])

    # ------------------------------------------------------------------------------------------- qrels
    def _all_qrels(self) -> None:
        sources: list[tuple[str, str]] = []
        if self.cfg.msmarco:
            for split, key in (("train", "qrels.train"), ("dev", "qrels.dev")):
                uri = _find(self.cfg.msmarco, raw.MSMARCO_FILES[key])
                if uri:
                    sources.append((split, uri))
        if self.cfg.beir:
            folder = storage.join(self.cfg.beir, "qrels")
            for name in storage.listdir(folder):
                if name.endswith(".tsv") or name.endswith(".tsv.gz"):
                    sources.append((name.split(".tsv")[0], storage.join(folder, name)))
        sources += [_split_spec(s, "--qrels") for s in self.cfg.extra_qrels]
        for split, uri in sources:
            self._qrels(split, uri)

    def _qrels(self, split: str, uri: str) -> None:
        self.inputs[f"qrels.{split}"] = uri
        rows: list[tuple] = []
        seen: set[tuple[str, str]] = set()
        missing_docs = 0
        has_corpus = "corpus" in self.counts
        for ln, line in open_text_lines(uri, self.q.report):
            try:
                parsed = raw.parse_qrels(uri, ln, line)
                if parsed is None:
                    continue
                query_id, doc_id, rel = parsed
                if (query_id, doc_id) in seen:
                    raise FormatError(uri, ln, f"duplicate judgement for query {query_id}, document {doc_id}")
                if self.beir:
                    if query_id not in self.query_qid:
                        raise FormatError(uri, ln, f"query id {query_id!r} is not in the queries")
                    qid = self.query_qid[query_id]
                    pid = self.doc_pid.get(doc_id)
                else:
                    qid = raw._int(uri, ln, query_id, "qid")
                    pid = raw._int(uri, ln, doc_id, "pid")
                    if has_corpus and not self.pids.contains(np.array([pid]))[0]:
                        pid = None
            except FormatError as e:
                self.q.report(e, line)
                continue
            seen.add((query_id, doc_id))
            if pid is None and (has_corpus or self.beir):
                missing_docs += 1
            rows.append((qid, query_id, pid, doc_id, rel))
        if not rows:
            raise FormatError(uri, None, "no judgements found")
        # qrels define a BEIR split's queries: write the split's queries from the full query list
        if self.beir and split not in self.queries:
            qids = {r[0] for r in rows}
            pool = {q[0]: q for rs in self.queries.values() for q in rs}
            self.queries[split] = [pool[q] for q in sorted(qids) if q in pool]
            self._write_split("queries", split, self.queries[split], QUERIES_SCHEMA)
        known = {q[0] for q in self.queries.get(split, [])}
        self.counts["qrels_queries_without_text"][split] = len({r[0] for r in rows} - known)
        self.counts["qrels_docs_not_in_corpus"][split] = missing_docs
        self._write_split("qrels", split, rows, QRELS_SCHEMA)

    # ------------------------------------------------------------------------------------------- triples
    def _triples(self, uri: str) -> None:
        t0 = time.time()
        self.inputs["triples"] = uri
        writer = _PartWriter(storage.join(self.cfg.out, "triples"), TRIPLES_SCHEMA, self.cfg.part_rows)
        train = self.queries.get("train", [])
        train_qids = np.array(sorted(q[0] for q in train), dtype=np.int64)
        query_by_text = {q[2]: q[0] for q in train} if self.text_triples else {}
        has_corpus = "corpus" in self.counts
        if not has_corpus:
            raise UserError(f"{uri}: triples need a corpus to check their passage ids against")
        progress = Progress(log, f"triples {uri}")
        chunk: list[tuple[int, str, int, int, int]] = []

        def flush_chunk() -> None:
            if not chunk:
                return
            arr = np.array([c[2:] for c in chunk], dtype=np.int64)
            ok_pos, ok_neg = self.pids.contains(arr[:, 1]), self.pids.contains(arr[:, 2])
            pos = np.minimum(np.searchsorted(train_qids, arr[:, 0]), max(len(train_qids) - 1, 0))
            ok_q = (train_qids[pos] == arr[:, 0]) if len(train_qids) else np.ones(len(arr), dtype=bool)
            for (ln, line, q, p, n), a, b, c in zip(chunk, ok_q, ok_pos, ok_neg):
                if not (a and b and c):
                    what = f"qid {q} is not a training query" if not a else f"passage {p if not b else n} does not exist in the corpus"
                    self.q.report(FormatError(uri, ln, what), line)
                    continue
                writer.add((q, p, n))
            chunk.clear()

        for ln, line in open_text_lines(uri, self.q.report):
            progress.update()
            try:
                if self.text_triples:
                    qt, pt, nt = raw.parse_text_triple(uri, ln, line)
                    q = query_by_text.get(qt)
                    p, n = self.text_pid.get(hash(pt)), self.text_pid.get(hash(nt))
                    if q is None or p is None or n is None:
                        what = "query text" if q is None else ("positive passage text" if p is None else "negative passage text")
                        raise FormatError(uri, ln, f"unmatched text triple: its {what} is not in the collection/queries")
                else:
                    q, p, n = raw.parse_id_triple(uri, ln, line)
            except FormatError as e:
                self.q.report(e, line)
                continue
            chunk.append((ln, line, q, p, n))
            if len(chunk) >= 100_000:
                flush_chunk()
        flush_chunk()
        writer.flush()
        self.counts["triples"] = writer.count
        self.counts["triples_parts_resumed"] = writer.skipped
        self.counts["triples_format"] = "text" if self.text_triples else "ids"
        self._add_parts("triples", writer.parts)
        self.timings["triples_s"] = round(progress.close(), 3)
        log.info("triples: %s in %d part(s) (%.1f s)", f"{writer.count:,}", len(writer.parts), time.time() - t0)

