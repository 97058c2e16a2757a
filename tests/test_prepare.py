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
from raykd.errors import FormatError
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
