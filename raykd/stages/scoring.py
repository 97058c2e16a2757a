"""The Ray Data scorer pipeline's steps, shared by ``score`` (teacher ensembles over training pairs) and
``search --rerank`` (one scorer over a run's candidates):

    rows with qid, pid (and whatever else the stage carries)
      -> attach_texts       CPU tasks: ``query`` and ``passage`` from the shared text lookups
                            (:mod:`raykd.stages.shared_texts`: pid-sorted blocks in the object store)
      -> tokenize_scorers   CPU tasks: every scorer's own tokenizer, no padding -> its feature columns
                            (``ids__<t>``, ``types__<t>``, ``query_ids__<t>``, ...); the texts are dropped
      -> EnsembleScorer     actor pool: every scorer loaded once per actor (:func:`raykd.models.teachers.load_teacher`,
                            GPU when the actor has one), each block sorted by length and cut into forward passes
                            (:func:`raykd.batching.score_block`) -> ``score__<t>``, ``len__<t>``, ``padlen__<t>``

A scorer is ``(name, spec)``: ``spec`` is a ``KIND:PATH`` teacher spec (:func:`raykd.models.teachers.parse_teacher`;
a bare path is a cross-encoder), so every kind raykd loads (cross-encoders, raykd students of every kind, released
checkpoints, BM25, LLMs) goes through the same steps. Tokenising loads no weights for cross-encoders and BM25
(:func:`raykd.models.teachers.load_pair_tokenizer`); the other kinds tokenise through their model, so a tokenising
worker process holds one CPU copy of it.

Each actor records every model load as a marker file ``<loads_uri>/<scorer>--<actor>.json`` as soon as the
model is loaded (a restarted actor loads and records again); :func:`model_loads` counts them.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import pyarrow as pa

from raykd import storage

OUTPUTS = ("score", "len", "padlen")


def attach_texts(batch: pa.Table, passages: Any, queries: Any) -> pa.Table:
    """Task body: add ``query`` and ``passage`` texts to rows with ``qid`` and ``pid``, from the shared lookups
    (:class:`raykd.stages.shared_texts.SharedTexts`, mapped zero-copy); an unknown id is a KeyError naming it."""
    qtext = queries.lookup().take(batch["qid"].to_numpy())
    ptext = passages.lookup().take(batch["pid"].to_numpy())
    return batch.append_column("query", qtext).append_column("passage", ptext)


def feature_column(key: str, scorer: str) -> str:
    """The column of one tokenised feature: ``<prefix>input_ids`` -> ``<prefix>ids__<t>``, ``<prefix>token_type_ids``
    -> ``<prefix>types__<t>``, any other feature (BM25's texts) ``<key>__<t>``."""
    for long, short in (("token_type_ids", "types"), ("input_ids", "ids")):
        if key.endswith(long):
            key = key[: -len(long)] + short
            break
    return f"{key}__{scorer}"


def feature_key(column: str, scorer: str) -> str | None:
    """The inverse of :func:`feature_column` (None: not a feature of ``scorer``)."""
    suffix = f"__{scorer}"
    if not column.endswith(suffix) or column[: -len(suffix)] in OUTPUTS:
        return None
    key = column[: -len(suffix)]
    for long, short in (("token_type_ids", "types"), ("input_ids", "ids")):
        if key.endswith(short):
            return key[: -len(short)] + long
    return key


def _feature_array(key: str, rows: list) -> pa.Array:
    if key.endswith("token_type_ids"):
        return pa.array(rows, pa.list_(pa.int8()))
    if key.endswith("input_ids"):
        return pa.array(rows, pa.list_(pa.int32()))
    return pa.array(rows)


class TokenizePairs:
    """One scorer's tokenizer over (query, passage) -> its feature columns (:func:`feature_column`)."""

    def __init__(self, scorer: str, spec: str, query_max_length: int | None, passage_max_length: int | None,
                 options: dict | None = None):
        from raykd.models.teachers import load_pair_tokenizer

        self.scorer = scorer
        self.tok = load_pair_tokenizer(spec, query_max_length, passage_max_length, **(options or {}))

    def __call__(self, batch: pa.Table) -> pa.Table:
        enc = self.tok.tokenize_unpadded(batch["query"].to_pylist(), batch["passage"].to_pylist())
        if "input_ids" in enc and not enc.get("token_type_ids"):
            enc = {**enc, "token_type_ids": [[] for _ in enc["input_ids"]]}  # a column in every block: one schema
        for key, rows in enc.items():
            batch = batch.append_column(feature_column(key, self.scorer), _feature_array(key, rows))
        return batch


_TOKENIZERS: dict = {}


def _tokenizer(scorer: str, spec: str, qlen: int | None, plen: int | None, options: dict | None) -> TokenizePairs:
    key = (scorer, spec, qlen, plen, json.dumps(options or {}, sort_keys=True, default=str))
    if key not in _TOKENIZERS:  # a task worker process is reused: load each tokenizer once per process
        _TOKENIZERS[key] = TokenizePairs(scorer, spec, qlen, plen, options)
    return _TOKENIZERS[key]


def tokenize_pairs(batch: pa.Table, teacher: str, path: str, query_max_length: int | None,
                   passage_max_length: int | None, options: dict | None = None) -> pa.Table:
    """One scorer's features for the block (``path``: its spec; ``options``: its load options)."""
    return _tokenizer(teacher, path, query_max_length, passage_max_length, options)(batch)


def tokenize_scorers(batch: pa.Table, teachers: list[tuple[str, str]], query_max_length: int | None,
                     passage_max_length: int | None, load_options: dict[str, dict] | None = None) -> pa.Table:
    """Task body: every scorer's features for the block (each keeps its own tokenizer); the texts are dropped,
    the actors need only the features."""
    for name, spec in teachers:
        batch = tokenize_pairs(batch, name, spec, query_max_length, passage_max_length,
                               (load_options or {}).get(name))
    return batch.drop_columns(["query", "passage"])


class TeacherScorer:
    """One scorer (``path``: a teacher spec, :func:`raykd.models.teachers.load_teacher`), loaded once, that only
    runs blocks through its ``score_features`` (:func:`raykd.batching.score_block`: each block sorted by length
    and cut into forward passes of ``batch_size`` pairs); outputs ``score__<t>``, ``len__<t>`` (real tokens) and
    ``padlen__<t>`` (the padded length of the pair's forward pass)."""

    def __init__(self, teacher: str, path: str, query_max_length: int | None, passage_max_length: int | None,
                 batch_size: int, torch_threads: int = 1, load_options: dict | None = None):
        import torch

        from raykd.models.teachers import load_teacher

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.teacher, self.batch_size = teacher, batch_size
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = load_teacher(path, query_max_length, passage_max_length, **(load_options or {}))
        self.scorer.to(self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t = self.teacher
        cols = {c: k for c in batch.column_names if (k := feature_key(c, t)) is not None}
        out = self.scorer.score_features({k: batch[c] for c, k in cols.items()}, batch_size=self.batch_size,
                                         device=self.device)
        keep = [c for c in batch.column_names if c not in cols]
        return (batch.select(keep).append_column(f"score__{t}", pa.array(out.scores))
                .append_column(f"len__{t}", pa.array(out.lengths))
                .append_column(f"padlen__{t}", pa.array(out.padded_lengths)))


class EnsembleScorer:
    """Actor body: every scorer, each loaded once for the actor's life (a load is recorded under ``loads_uri``),
    and each block scored by all of them in turn. ``load_options``: scorer name -> its :func:`load_teacher`
    options (a bm25 scorer's ``store``, an LLM's ``template``, ...)."""

    def __init__(self, teachers: list[tuple[str, str]], query_max_length: int | None, passage_max_length: int | None,
                 batch_size: int, torch_threads: int = 1, loads_uri: str | None = None,
                 load_options: dict[str, dict] | None = None):
        self.actor = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.scorers = []
        for name, path in teachers:
            t0 = time.time()
            self.scorers.append(TeacherScorer(name, path, query_max_length, passage_max_length, batch_size,
                                              torch_threads, (load_options or {}).get(name)))
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
    """Scorer loads recorded under ``loads_uri`` (see :class:`EnsembleScorer`), per scorer."""
    found = [n.split("--", 1)[0] for n in storage.listdir(loads_uri)
             if n.endswith(".json") and "--" in n and not n.startswith(".")]
    return {n: found.count(n) for n in names}


def scored(ds: Any, teachers: list[tuple[str, str]], passages: Any, queries: Any, *, query_max_length: int | None,
           passage_max_length: int | None, batch_size: int, block_pairs: int, min_actors: int, max_actors: int,
           gpus_per_actor: float, cpus_per_actor: float, actor_resources: dict | None, cpus_per_task: float,
           torch_threads: int, loads_uri: str | None = None, load_options: dict[str, dict] | None = None) -> Any:
    """``ds`` (rows with ``qid`` and ``pid``) with every scorer's ``score__<t>``, ``len__<t>`` and ``padlen__<t>``
    added (the module docstring's steps); the other columns pass through. ``block_pairs``: the most rows a block
    holds (the actors take batches of that size). ``load_options``: scorer name -> its load options, for
    tokenising and scoring alike."""
    import ray.data

    task = {"batch_format": "pyarrow", "batch_size": None, "num_cpus": cpus_per_task}
    ds = ds.map_batches(attach_texts, fn_kwargs={"passages": passages, "queries": queries}, **task)
    ds = ds.map_batches(tokenize_scorers, fn_kwargs={"teachers": teachers, "query_max_length": query_max_length,
                                                     "passage_max_length": passage_max_length,
                                                     "load_options": load_options}, **task)
    remote: dict[str, Any] = {"num_gpus": gpus_per_actor} if gpus_per_actor else {}
    if actor_resources:
        remote["resources"] = dict(actor_resources)
    return ds.map_batches(
        EnsembleScorer,
        batch_format="pyarrow",
        batch_size=block_pairs,  # Ray Data needs an explicit batch size for GPU actors
        fn_constructor_kwargs={
            "teachers": teachers, "query_max_length": query_max_length, "passage_max_length": passage_max_length,
            "batch_size": batch_size, "torch_threads": torch_threads, "loads_uri": loads_uri,
            "load_options": load_options,
        },
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max(min_actors, max_actors)),
        num_cpus=cpus_per_actor,
        **remote,
    )
