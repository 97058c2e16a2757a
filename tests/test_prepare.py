"""prepare: raw inputs -> text store. Round trips, real data counts, bad input, S3, resume after a kill."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raykd import storage
from raykd.errors import FormatError, UserError
from raykd.formats.store import TextStore
from raykd.sample import SampleSpec, generate, write_sample
from raykd.stages.prepare import PrepareConfig, prepare

SMALL = SampleSpec(train_queries=12, dev_queries=6, passages=120, negatives=8, text_triples=True)


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    out = tmp_path / "raw"
    write_sample(str(out), SMALL)
    return out


def _store(raw, tmp_path, name="store", **kw) -> TextStore:
    prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / name), **kw))
    return TextStore(str(tmp_path / name))


def test_msmarco_round_trip_equals_the_sample(raw_dir, tmp_path):
    rows = generate(SMALL)
    store = _store(raw_dir, tmp_path, part_rows=50)
    corpus = store.corpus()
    assert sorted(zip(corpus["pid"].to_pylist(), corpus["text"].to_pylist())) == rows["collection"]
    assert len(store.corpus_parts()) == 3  # 120 passages in parts of 50
    assert [(r["qid"], r["text"]) for r in store.queries("train").to_pylist()] == rows["queries.train"]
    assert [(r["qid"], r["pid"]) for r in store.qrels("dev").to_pylist()] == rows["qrels.dev.small"]
    t = store.triples()
    assert list(zip(t["qid"].to_pylist(), t["pos_pid"].to_pylist(), t["neg_pid"].to_pylist())) == rows["triples"]
    assert store.passages([rows["collection"][5][0]]) == [rows["collection"][5][1]]


def test_text_triples_map_to_the_same_ids(raw_dir, tmp_path):
    ids = _store(raw_dir, tmp_path, "ids").triples()
    os.remove(raw_dir / "qidpidtriples.train.small.tsv")  # the folder now only has text triples
    text = _store(raw_dir, tmp_path, "text")
    assert text.manifest["counts"]["triples_format"] == "text"
    assert text.triples().equals(ids)


def test_gzip_inputs_read_transparently(raw_dir, tmp_path):
    plain = _store(raw_dir, tmp_path, "plain")
    for f in raw_dir.iterdir():
        with open(f, "rb") as src, gzip.open(str(f) + ".gz", "wb") as dst:
            dst.write(src.read())
        f.unlink()
    gz = _store(raw_dir, tmp_path, "gz")
    assert gz.corpus().equals(plain.corpus()) and gz.triples().equals(plain.triples())


def test_beir_round_trip_keeps_string_ids(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [{"_id": "MED-10", "title": "Statins", "text": "â€œmojibakeâ€ kept"}, {"_id": "MED-2", "title": "", "text": "b"}]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "PLAIN-1", "text": "do statins work"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nPLAIN-1\tMED-10\t2\nPLAIN-1\tMED-99\t1\n")
    prepare(PrepareConfig(beir=str(beir), out=str(tmp_path / "s")))
    s = TextStore(str(tmp_path / "s"))
    assert s.corpus()["doc_id"].to_pylist() == ["MED-10", "MED-2"]
    assert s.passages([0, 1]) == ["Statins â€œmojibakeâ€ kept", "b"]
    qrels = s.qrels("test").to_pylist()
    assert [(r["query_id"], r["doc_id"], r["pid"], r["relevance"]) for r in qrels] == [
        ("PLAIN-1", "MED-10", 0, 2),
        ("PLAIN-1", "MED-99", None, 1),  # judged but not in the corpus: kept, counted
    ]
    assert s.manifest["counts"]["qrels_docs_not_in_corpus"] == {"test": 1}
    assert s.queries("test")["query_id"].to_pylist() == ["PLAIN-1"]


@pytest.mark.parametrize(
    "name, queries, qrels_rows, corpus",
    [
        ("scifact", {"train": 809, "test": 300, "all": 1109}, {"train": 919, "test": 339}, 5183),
        ("scifact-mini", {"train": 200, "test": 100, "all": 300}, None, 1000),
        ("msmarco-dl19-subset", {"all": 50}, None, 5000),
    ],
)
def test_prepare_real_beir_data_gives_documented_counts(shared, tmp_path, name, queries, qrels_rows, corpus):
    folder = shared(name)
    m = prepare(PrepareConfig(beir=str(folder), out=str(tmp_path / name)))
    assert m.counts["corpus"] == corpus
    for split, n in queries.items():
        assert m.counts["queries"][split] == n
    if qrels_rows:
        assert m.counts["qrels"] == qrels_rows
    assert m.counts["qrels_docs_not_in_corpus"] == dict.fromkeys(m.counts["qrels"], 0)
    if name == "msmarco-dl19-subset":  # all 4,102 judged-relevant DL19 passages are in the subset
        assert m.counts["qrels"]["test"] == 4102 and m.counts["queries"]["test"] == 43


def test_prepare_real_msmarco_eval_topics_and_qrels(shared, tmp_path):
    d = shared("msmarco-eval")
    m = prepare(
        PrepareConfig(
            out=str(tmp_path / "ev"),
            extra_queries=[f"dev={d}/topics.msmarco-passage.dev-subset.txt", f"dl19={d}/topics.dl19-passage.txt"],
            extra_qrels=[f"dev={d}/qrels.msmarco-passage.dev-subset.txt", f"dl19={d}/qrels.dl19-passage.txt"],
        )
    )
    assert m.counts["queries"] == {"dev": 6980, "dl19": 43}
    assert m.counts["qrels"] == {"dev": 7437, "dl19": 9260}
    s = TextStore(str(tmp_path / "ev"))
    first = s.queries("dev").slice(0, 1).to_pylist()[0]
    assert (first["qid"], first["text"]) == (1048585, "what is paula deen's brother")


# ------------------------------------------------------------------------------------------------ bad input


def _write(path: Path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


BAD_CASES = [
    ("collection.tsv", "1\tok\n2\tone\ttoo many\n", "collection.tsv, line 2: expected pid<TAB>passage text"),
    ("collection.tsv", "1\tok\nx7\tbad id\n", "collection.tsv, line 2: pid must be an integer, got 'x7'"),
    ("collection.tsv", "1\tok\n2\tfine\n1\tagain\n", "collection.tsv, line 3: duplicate passage id 1"),
    ("collection.tsv", b"1\tok\n2\tbad \xff\xfe bytes\n", "collection.tsv, line 2: undecodable bytes"),
    ("collection.tsv", "", "collection.tsv: file is empty"),
    ("queries.train.tsv", "5\tq five\n5\tq again\n", "queries.train.tsv, line 2: duplicate query id 5"),
    ("qidpidtriples.train.small.tsv", "5\t1\t2\n5\t1\t999\n", "qidpidtriples.train.small.tsv, line 2: passage 999 does not exist"),
    ("qidpidtriples.train.small.tsv", "5\t1\n", "qidpidtriples.train.small.tsv, line 1: expected qid<TAB>pos_pid<TAB>neg_pid"),
]


def _tiny_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    _write(raw / "collection.tsv", "1\tone passage\n2\ttwo passage\n")
    _write(raw / "queries.train.tsv", "5\tq five\n")
    _write(raw / "qrels.train.tsv", "5 0 1 1\n")
    _write(raw / "qidpidtriples.train.small.tsv", "5\t1\t2\n")
    return raw


@pytest.mark.parametrize("file, content, message", BAD_CASES)
def test_bad_input_names_file_and_line(tmp_path, file, content, message):
    raw = _tiny_raw(tmp_path)
    _write(raw / file, content)
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "out")))
    assert not storage.has_manifest(str(tmp_path / "out"))


def test_missing_file_is_named(tmp_path):
    raw = _tiny_raw(tmp_path)
    os.remove(raw / "collection.tsv")
    with pytest.raises(FileNotFoundError, match="no collection.tsv"):
        prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="nope.tsv: file does not exist"):
        prepare(PrepareConfig(out=str(tmp_path / "o2"), extra_queries=[f"dev={tmp_path}/nope.tsv"]))


def test_truncated_gzip_is_reported(tmp_path):
    raw = _tiny_raw(tmp_path)
    data = gzip.compress(("".join(f"{i}\tpassage number {i} " + "x" * 50 + "\n" for i in range(1, 2000))).encode())
    (raw / "collection.tsv").unlink()
    _write(raw / "collection.tsv.gz", data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"collection.tsv.gz, line \d+: truncated gzip stream"):
        prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "out")))


def test_lenient_mode_quarantines_and_counts(tmp_path):
    raw = _tiny_raw(tmp_path)
    _write(raw / "collection.tsv", b"1\tone\n2\ttwo\nx\tbad id\n2\tdup\n3\tbad \xff\n4\tfour\n")
    _write(raw / "qidpidtriples.train.small.tsv", "5\t1\t2\n5\t1\t77\n5\t4\t1\n")
    m = prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "out"), lenient=True))
    assert m.counts["corpus"] == 3 and m.counts["triples"] == 2
    assert m.counts["quarantined"] == {"collection.tsv": 3, "qidpidtriples.train.small.tsv": 1}
    q = (tmp_path / "out" / "quarantine" / "collection.tsv.tsv").read_text().splitlines()
    assert q[0] == "line\treason\traw" and len(q) == 4
    assert q[1].startswith("3\tpid must be an integer") and q[2].startswith("4\tduplicate passage id 2")
    assert "undecodable" in q[3]


# ------------------------------------------------------------------------------------------------ S3, resume


def test_local_and_s3_give_identical_data(raw_dir, tmp_path, s3_uri):
    local = _store(raw_dir, tmp_path, part_rows=40)
    raw_s3 = storage.join(s3_uri, "raw")
    for f in raw_dir.iterdir():
        storage.write_bytes_atomic(storage.join(raw_s3, f.name), f.read_bytes())
    prepare(PrepareConfig(msmarco=raw_s3, out=storage.join(s3_uri, "store"), part_rows=40))
    remote = TextStore(storage.join(s3_uri, "store"))
    assert remote.corpus().equals(local.corpus())
    assert remote.triples().equals(local.triples())
    for split in ("train", "dev"):
        assert remote.queries(split).equals(local.queries(split)) and remote.qrels(split).equals(local.qrels(split))
    assert remote.manifest["counts"] == local.manifest["counts"]


def test_killed_prepare_resumes_without_duplicates(tmp_path):
    raw = tmp_path / "raw"
    write_sample(str(raw), SampleSpec(train_queries=600, dev_queries=10, passages=20000, negatives=100))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "raykd.cli", "prepare", "--msmarco", str(raw), "--out", str(out), "--part-rows", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "triples" / "part-00003.parquet").exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done_before = len(list((out / "triples").glob("part-*.parquet")))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = TextStore(str(out))
    assert resumed.manifest["counts"]["triples_parts_resumed"] >= min(done_before, 4) - 1
    clean = tmp_path / "clean"
    prepare(PrepareConfig(msmarco=str(raw), out=str(clean), part_rows=1000))
    fresh = TextStore(str(clean))
    assert resumed.triples().equals(fresh.triples()) and resumed.corpus().equals(fresh.corpus())
    assert resumed.triples().num_rows == 60000
    shutil.rmtree(raw)


# ------------------------------------------------------------------------------------------------ reading at scale


def test_uncompressed_s3_input_is_read_in_blocks_not_lines(s3_uri, monkeypatch):
    """An uncompressed s3:// file is read in a bounded number of large reads and GET requests, not one per line
    (an unbuffered readline loop fetched a read-ahead block per line: hours for collection.tsv)."""
    import s3fs

    from raykd.formats import lines

    text = "".join(f"{i}\tpassage number {i} with some words\n" for i in range(20_000))
    uri = storage.join(s3_uri, "collection.tsv")
    storage.write_bytes_atomic(uri, text.encode())
    calls = {"read": 0, "fetch": 0}
    real_open, real_fetch = storage.open_read, s3fs.core.S3File._fetch_range

    class Counted:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            attr = getattr(self.f, name)
            if name.startswith("read"):
                def counted(*a, **kw):
                    calls["read"] += 1
                    return attr(*a, **kw)
                return counted
            return attr

    def fetch(self, start, end):
        calls["fetch"] += 1
        return real_fetch(self, start, end)

    monkeypatch.setattr(storage, "open_read", lambda u, mode="rb": Counted(real_open(u, mode)))
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch)
    monkeypatch.setattr(lines, "BLOCK_BYTES", 1 << 16)
    got = list(lines.open_text_lines(uri))
    assert [ln for ln, _ in got] == list(range(1, 20_001))
    assert "".join(line + "\n" for _, line in got) == text
    blocks = len(text) // (1 << 16) + 1  # 12 blocks of 64 KiB for 20,000 lines
    assert calls["read"] <= blocks + 2 and calls["fetch"] <= blocks + 2, calls


@pytest.mark.parametrize("gz", [False, True])
def test_utf8_byte_order_mark_is_skipped(tmp_path, gz):
    raw = _tiny_raw(tmp_path)
    for name in ("collection.tsv", "queries.train.tsv"):
        data = b"\xef\xbb\xbf" + (raw / name).read_bytes()
        (raw / name).unlink()
        _write(raw / (name + ".gz" if gz else name), gzip.compress(data) if gz else data)
    s = _store(raw, tmp_path)
    assert s.corpus()["pid"].to_pylist() == [1, 2]
    assert s.queries("train")["qid"].to_pylist() == [5]


def test_errors_deep_in_many_blocks_name_their_line(tmp_path, monkeypatch):
    """Blocks parse at once; the block holding a bad line is re-read line by line, so the error names the
    line, in strict and lenient mode, whatever block it falls in."""
    from raykd.formats import lines

    monkeypatch.setattr(lines, "BLOCK_BYTES", 300)
    raw = _tiny_raw(tmp_path)
    coll = [f"{i}\tpassage {i}" for i in range(1, 3001)]
    _write(raw / "collection.tsv", "\n".join(coll) + "\n")
    triples = [f"5\t{1 + i % 3000}\t{1 + (i * 7) % 3000}" for i in range(10_000)]
    triples[7776] = "5\t1\t999999"  # line 7777: a passage that does not exist
    _write(raw / "qidpidtriples.train.small.tsv", "\n".join(triples) + "\n")
    with pytest.raises(FormatError, match=r"qidpidtriples.train.small.tsv, line 7777: passage 999999 does not exist"):
        prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "strict")))
    coll[2499] = "x2500\tbad id"
    _write(raw / "collection.tsv", "\n".join(coll))  # and no newline at the end
    with pytest.raises(FormatError, match=r"collection.tsv, line 2500: pid must be an integer, got 'x2500'"):
        prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "strict2")))
    m = prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "lenient"), lenient=True, part_rows=1000))
    bad = {ln: t for ln, t in enumerate(triples, 1) if {"2500", "999999"} & set(t.split("\t")[1:])}
    assert m.counts["corpus"] == 2999 and m.counts["triples"] == 10_000 - len(bad) and 7777 in bad
    q = (tmp_path / "lenient" / "quarantine" / "qidpidtriples.train.small.tsv.tsv").read_text().splitlines()
    assert [(int(r.split("\t")[0]), r.split("\t", 2)[2]) for r in q[1:]] == [(ln, t.replace("\t", " ")) for ln, t in sorted(bad.items())]
    assert "7777\tpassage 999999 does not exist in the corpus\t5 1 999999" in q
    s = TextStore(str(tmp_path / "lenient"))
    assert s.corpus()["pid"].to_pylist() == [i for i in range(1, 3001) if i != 2500]
    assert s.triples().num_rows == m.counts["triples"] and len(s.corpus_parts()) == 3


def test_a_failed_run_commits_only_whole_parts_and_resumes_after_the_fix(tmp_path, monkeypatch):
    from raykd.formats import lines

    monkeypatch.setattr(lines, "BLOCK_BYTES", 300)
    raw = _tiny_raw(tmp_path)
    coll = [f"{i}\tpassage {i}" for i in range(1, 3001)]
    coll[2499] = "x2500\tbad id"
    _write(raw / "collection.tsv", "\n".join(coll) + "\n")
    cfg = PrepareConfig(msmarco=str(raw), out=str(tmp_path / "out"), part_rows=1000)
    with pytest.raises(FormatError, match="line 2500"):
        prepare(cfg)
    assert sorted(p.name for p in (tmp_path / "out" / "corpus").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    coll[2499] = "2500\tpassage 2500"
    _write(raw / "collection.tsv", "\n".join(coll) + "\n")
    m = prepare(cfg)
    assert m.counts["corpus_parts_resumed"] == 2 and m.counts["corpus"] == 3000
    assert TextStore(str(tmp_path / "out")).corpus()["pid"].to_pylist() == list(range(1, 3001))


def test_full_id_triples_only_when_named(tmp_path):
    raw = _tiny_raw(tmp_path)
    full = raw / "qidpidtriples.train.full.2.tsv"
    _write(full, "5\t1\t2\n5\t2\t1\n")
    m = prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "both")))
    assert m.inputs["triples"].endswith("qidpidtriples.train.small.tsv") and m.counts["triples"] == 1
    (raw / "qidpidtriples.train.small.tsv").unlink()
    with pytest.raises(UserError, match=r"397.8M rows.*--triples .*qidpidtriples.train.full.2.tsv"):
        prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "full-only")))
    m = prepare(PrepareConfig(msmarco=str(raw), out=str(tmp_path / "named"), triples=str(full)))
    assert m.counts["triples"] == 2
