"""Pipeline: one streaming Ray Dataset over the unique (qid, pid) pairs of every pending part, scored by one
long-lived pool of ensemble actors (the steps after the read are :mod:`raykd.stages.scoring`'s, shared with
``search --rerank``).

    _work/pairs/part-*.parquet (part, qid, pid)      chunks of ``bucket_pairs`` pairs of one part, in part order
      -> read_chunks         CPU tasks: a chunk's row groups of its part's pairs file
      -> attach_texts        CPU tasks: query and passage text from the shared lookups (:mod:`raykd.texts`,
                             :mod:`raykd.stages.shared_texts`: the corpus and the split's queries, pid/qid-sorted
                             blocks in the object store)
      -> tokenize_scorers    CPU tasks: every teacher's own tokenizer, no padding -> ids__<t>, types__<t>
                             (a bm25 teacher's features are the texts)
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

import pyarrow as pa

from raykd.formats.store import TextStore
from raykd.stages import shared_texts as sharing
from raykd.stages.scoring import scored


def shared_texts(store: TextStore, split: str) -> tuple[sharing.SharedTexts, sharing.SharedTexts]:
    """The corpus (read and sorted by one Ray task per part) and the split's queries in the object store."""
    return (sharing.share_passages(store.corpus_parts(), where=f"the corpus of {store.uri}"),
            sharing.share(store.query_lookup(split)))


def read_chunks(items: pa.Table, out: str) -> pa.Table:
    """Task body: the pairs of each (part, start, stop) chunk in ``items``."""
    from raykd.stages.score.plan import read_pair_chunk

    return pa.concat_tables([read_pair_chunk(out, p, a, b) for p, a, b in
                             zip(*(items[c].to_pylist() for c in ("part", "start", "stop")))])


def pair_scores(out: str, part_pairs: dict[int, int], teachers: list[tuple[str, str]],
                passages: sharing.SharedTexts, queries: sharing.SharedTexts, loads_uri: str, *,
                query_max_length: int | None, passage_max_length: int | None,
                batch_size: int, bucket_pairs: int, min_actors: int, max_actors: int, gpus_per_actor: float,
                cpus_per_actor: float, actor_resources: dict, cpus_per_task: float, torch_threads: int,
                load_options: dict[str, dict] | None = None):
    """The streaming Dataset of every teacher's score for the pairs of the parts in ``part_pairs`` (part ->
    its number of pairs), in part order (module docstring): rows of part, qid, pid, and score__<t>, len__<t>,
    padlen__<t> per teacher. One block is one chunk of ``bucket_pairs`` pairs of one part, from the read to
    the driver, so the pool's actors share the work and parts complete one after another. ``load_options``:
    teacher name -> its load options (a bm25 teacher's store, an LLM's prompt)."""
    import ray.data

    chunks = [{"part": p, "start": a, "stop": min(n, a + bucket_pairs)}
              for p, n in part_pairs.items() for a in range(0, n, bucket_pairs)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(read_chunks, batch_format="pyarrow", batch_size=None, fn_kwargs={"out": out},
                        num_cpus=cpus_per_task)
    ds = scored(ds, teachers, passages, queries, query_max_length=query_max_length,
                passage_max_length=passage_max_length, batch_size=batch_size, block_pairs=bucket_pairs,
                min_actors=min_actors, max_actors=max_actors, gpus_per_actor=gpus_per_actor,
                cpus_per_actor=cpus_per_actor, actor_resources=actor_resources, cpus_per_task=cpus_per_task,
                torch_threads=torch_threads, loads_uri=loads_uri, load_options=load_options)
    names = [n for n, _ in teachers]
    return ds.select_columns(["part", "qid", "pid"] + [f"{k}__{n}" for n in names for k in ("score", "len", "padlen")])
