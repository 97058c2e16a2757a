"""Pipeline: one streaming Ray Dataset over the unique (qid, pid) pairs of every pending part, scored by one
long-lived pool of ensemble actors.

    _work/pairs/part-*.parquet (part, qid, pid)      chunks of ``bucket_pairs`` pairs of one part, in part order
      -> read_chunks         CPU tasks: a chunk's row groups of its part's pairs file
      -> attach_texts        CPU tasks: query and passage text from the shared object store
      -> tokenize_teachers   CPU tasks: every teacher's own tokenizer, no padding -> ids__<t>, types__<t>
      -> EnsembleScorer      actor pool (min_actors..max_actors, gpus_per_actor each): every actor holds every
                             teacher, loaded once for the whole run, and runs each block through each teacher
                             with :func:`raykd.batching.score_block` -> score__<t>, len__<t>, padlen__<t>
      -> the driver, which hands each part's pair scores to a join task once the part is complete (join.py)

One pool of actors that each hold the whole ensemble shares the GPUs between teachers by their cost with no
tuning: an actor spends on each block the time its teachers need (BERT-Large ~3.5x BERT-Base), and the pool
grows or shrinks as a whole. The price is that every actor holds every teacher (the T2 ensemble is ~0.5 B
parameters, ~1 GB in bf16, far below one GPU's memory) and loads all of them when it starts.

Each actor records every model load as a marker file ``<loads_uri>/<teacher>--<actor>.json`` as soon as the
model is loaded (a restarted actor loads and records again), and the stage counts them into the manifest.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from raykd import storage
from raykd.formats.store import TextStore, passage_text


def attach_texts(batch: pa.Table, corpus_refs: list, queries_ref: Any) -> pa.Table:
    """Add ``query`` and ``passage`` texts to (qid, pid) rows from the shared, pid-sorted object-store blocks."""
    import ray

    pids = batch["pid"].to_numpy()
    passages = np.empty(len(pids), dtype=object)
    found = np.zeros(len(pids), dtype=bool)
    for block in ray.get(list(corpus_refs)):
        keys = block["pid"].to_numpy()
        if len(keys) == 0:
            continue
        pos = np.searchsorted(keys, pids)
        pos_c = np.minimum(pos, len(keys) - 1)
        hit = (keys[pos_c] == pids) & ~found
        if hit.any():
            passages[hit] = block["passage"].take(pa.array(pos_c[hit])).to_numpy(zero_copy_only=False)
            found |= hit
    if not found.all():
        raise KeyError(f"pid {int(pids[~found][0])} is not in the corpus")  # the plan checked: an internal bug
    queries = ray.get(queries_ref)
    qkeys = queries["qid"].to_numpy()
    qpos = np.searchsorted(qkeys, batch["qid"].to_numpy())
    qtext = queries["text"].take(pa.array(qpos))
    return batch.append_column("query", qtext).append_column("passage", pa.array(list(passages), pa.string()))


def sorted_corpus_block(batch: pa.Table) -> pa.Table:
    """One corpus block as (pid, passage) sorted by pid; passage = ``title + " " + text`` as in BEIR."""
    t = pa.table({"pid": batch["pid"], "passage": passage_text(batch["title"], batch["text"])})
    return t.sort_by("pid")


def shared_texts(store: TextStore, split: str) -> tuple[list, Any]:
    """Put the corpus (pid-sorted Arrow blocks, via Ray Data) and the split's queries in the object store."""
    import ray
    import ray.data

    pfs, _ = storage.arrow_filesystem(store.corpus_uri)
    paths = [storage.arrow_filesystem(u)[1] for u in store.corpus_parts()]
    corpus = ray.data.read_parquet(paths, filesystem=pfs, columns=["pid", "title", "text"])
    corpus_refs = corpus.map_batches(sorted_corpus_block, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    q = store.queries(split).select(["qid", "text"]).sort_by("qid")
    return corpus_refs, ray.put(q)


class TokenizePairs:
    """One teacher's tokenizer over (query, passage) -> ``ids__<t>`` and ``types__<t>``."""

    def __init__(self, teacher: str, path: str, query_max_length: int, passage_max_length: int):
        from raykd.models.cross_encoder import CrossEncoderTokenizer

        self.teacher = teacher
        self.tok = CrossEncoderTokenizer.from_pretrained(path, query_max_length, passage_max_length)

    def __call__(self, batch: pa.Table) -> pa.Table:
        enc = self.tok.tokenize_unpadded(
            batch["query"].to_pylist(), batch["passage"].to_pylist()
        )
        ids = pa.array(enc["input_ids"], pa.list_(pa.int32()))
        types = enc.get("token_type_ids") or [[] for _ in enc["input_ids"]]
        return batch.append_column(f"ids__{self.teacher}", ids).append_column(
            f"types__{self.teacher}", pa.array(types, pa.list_(pa.int8()))
        )


def tokenize_pairs(batch: pa.Table, teacher: str, path: str, query_max_length: int, passage_max_length: int) -> pa.Table:
    return _tokenizer(teacher, path, query_max_length, passage_max_length)(batch)


def tokenize_teachers(batch: pa.Table, teachers: list[tuple[str, str]], query_max_length: int,
                      passage_max_length: int) -> pa.Table:
    """CPU task body: every teacher's tokens for the block (each teacher keeps its own tokenizer); the texts
    are dropped, the actors need only the ids."""
    for name, path in teachers:
        batch = tokenize_pairs(batch, name, path, query_max_length, passage_max_length)
    return batch.drop_columns(["query", "passage"])


_TOKENIZERS: dict = {}


def _tokenizer(teacher: str, path: str, qlen: int, plen: int) -> TokenizePairs:
    key = (teacher, path, qlen, plen)
    if key not in _TOKENIZERS:  # a task worker process is reused: load each tokenizer once per process
        _TOKENIZERS[key] = TokenizePairs(teacher, path, qlen, plen)
    return _TOKENIZERS[key]


class TeacherScorer:
    """One teacher, loaded once, that only runs blocks through :func:`raykd.batching.score_block` (each block
    sorted by length and cut into forward passes of ``batch_size`` pairs); outputs ``score__<t>``,
    ``len__<t>`` (real tokens) and ``padlen__<t>`` (the padded length of the pair's forward pass)."""

    def __init__(self, teacher: str, path: str, query_max_length: int, passage_max_length: int,
                 batch_size: int, torch_threads: int = 1):
        import torch

        from raykd.models.cross_encoder import CrossEncoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.teacher, self.batch_size = teacher, batch_size
        self.model = CrossEncoder.from_pretrained(path, query_max_length, passage_max_length, require_head=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raykd.batching import score_block

        t = self.teacher
        out = score_block(self.model, batch[f"ids__{t}"], batch[f"types__{t}"], batch_size=self.batch_size,
                          pad_id=self.model.tokenizer.pad_token_id or 0, device=self.device)
        keep = [c for c in batch.column_names if c not in (f"ids__{t}", f"types__{t}")]
        return (batch.select(keep).append_column(f"score__{t}", pa.array(out.scores))
                .append_column(f"len__{t}", pa.array(out.lengths))
                .append_column(f"padlen__{t}", pa.array(out.padded_lengths)))


class EnsembleScorer:
    """Actor body: every teacher of the ensemble, each loaded once for the actor's life (a load is recorded
    under ``loads_uri``), and each block scored by all of them in turn."""

    def __init__(self, teachers: list[tuple[str, str]], query_max_length: int, passage_max_length: int,
                 batch_size: int, torch_threads: int = 1, loads_uri: str | None = None):
        self.actor = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.scorers = []
        for name, path in teachers:
            t0 = time.time()
            self.scorers.append(TeacherScorer(name, path, query_max_length, passage_max_length, batch_size,
                                              torch_threads))
            if loads_uri:
                record = {"teacher": name, "path": path, "actor": self.actor, "pid": os.getpid(),
                          "load_s": round(time.time() - t0, 3), "loaded_at": time.time()}
                storage.write_bytes_atomic(storage.join(loads_uri, f"{name}--{self.actor}.json"),
                                           json.dumps(record).encode())

    def __call__(self, batch: pa.Table) -> pa.Table:
        for scorer in self.scorers:
            batch = scorer(batch)
        return batch


def model_loads(loads_uri: str, names: list[str]) -> dict[str, int]:
    """Teacher loads recorded under ``loads_uri`` (see :class:`EnsembleScorer`), per teacher."""
    found = [n.split("--", 1)[0] for n in storage.listdir(loads_uri)
             if n.endswith(".json") and "--" in n and not n.startswith(".")]
    return {n: found.count(n) for n in names}


def read_chunks(items: pa.Table, out: str) -> pa.Table:
    """Task body: the pairs of each (part, start, stop) chunk in ``items``."""
    from raykd.stages.score.plan import read_pair_chunk

    return pa.concat_tables([read_pair_chunk(out, p, a, b) for p, a, b in
                             zip(*(items[c].to_pylist() for c in ("part", "start", "stop")))])


def pair_scores(out: str, part_pairs: dict[int, int], teachers: list[tuple[str, str]], corpus_refs: list,
                queries_ref: Any, loads_uri: str, *, query_max_length: int, passage_max_length: int,
                batch_size: int, bucket_pairs: int, min_actors: int, max_actors: int, gpus_per_actor: float,
                cpus_per_actor: float, actor_resources: dict, cpus_per_task: float, torch_threads: int):
    """The streaming Dataset of every teacher's score for the pairs of the parts in ``part_pairs`` (part ->
    its number of pairs), in part order (module docstring): rows of part, qid, pid, and score__<t>, len__<t>,
    padlen__<t> per teacher. One block is one chunk of ``bucket_pairs`` pairs of one part, from the read to
    the driver, so the pool's actors share the work and parts complete one after another."""
    import ray.data

    chunks = [{"part": p, "start": a, "stop": min(n, a + bucket_pairs)}
              for p, n in part_pairs.items() for a in range(0, n, bucket_pairs)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(read_chunks, batch_format="pyarrow", batch_size=None, fn_kwargs={"out": out},
                        num_cpus=cpus_per_task)
    ds = ds.map_batches(
        attach_texts,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"corpus_refs": corpus_refs, "queries_ref": queries_ref},
        num_cpus=cpus_per_task,
    )
    ds = ds.map_batches(
        tokenize_teachers,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"teachers": teachers, "query_max_length": query_max_length,
                   "passage_max_length": passage_max_length},
        num_cpus=cpus_per_task,
    )
    remote: dict[str, Any] = {"num_gpus": gpus_per_actor} if gpus_per_actor else {}
    if actor_resources:
        remote["resources"] = dict(actor_resources)
    ds = ds.map_batches(
        EnsembleScorer,
        batch_format="pyarrow",
        # a block is one chunk of at most bucket_pairs pairs; Ray Data needs an explicit batch size for GPU actors
        batch_size=bucket_pairs,
        fn_constructor_kwargs={
            "teachers": teachers, "query_max_length": query_max_length, "passage_max_length": passage_max_length,
            "batch_size": batch_size, "torch_threads": torch_threads, "loads_uri": loads_uri,
        },
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max(min_actors, max_actors)),
        num_cpus=cpus_per_actor,
        **remote,
    )
    names = [n for n, _ in teachers]
    return ds.select_columns(["part", "qid", "pid"] + [f"{k}__{n}" for n in names for k in ("score", "len", "padlen")])
