"""`raykd score` with teachers of every kind in one ensemble (issue 13), on a real local Ray cluster: a
cross-encoder, a raykd BERT_DOT, BM25, a tiny causal LM, a released ColBERT checkpoint and cross-encoders of
five more families (DistilBERT, ELECTRA, RoBERTa, XLM-R, DeBERTa-v2; each equal to a plain transformers
forward in test_teachers.py) in one run, z-scored.
Each teacher's scores equal its own ``load_teacher(spec).score_pairs`` in-process on the same pairs; the
ensemble is the documented weighted mean of z-scores with the statistics the manifest records; a re-run after
a crash in the finishing pass rescores nothing it had and gives the same result."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_teachers import _cross_encoder, _released, distilbert_base, tiny_llm  # noqa: F401 (fixtures)

from raykd import storage
from raykd.errors import UserError
from raykd.formats.scores import TripleScores
from raykd.formats.store import TextStore
from raykd.models.teachers import load_teacher
from raykd.stages.score import ScoreConfig, score

KEYS = ["qid", "pos_pid", "neg_pid"]
SMALL = {"rows_per_part": 250, "bucket_pairs": 128, "batch_size": 32, "max_actors": 1}
TEMPLATE = "Query: {query}\nPassage: {passage}\nRelevant (yes or no):\n"
# cross-encoder families beside BERT (test_score.py scores BERT and ALBERT), each with its own tokenizer:
# WordPiece (DistilBERT, ELECTRA), byte-level BPE (RoBERTa), SentencePiece unigram (XLM-R, DeBERTa-v2)
FAMILIES = [("distilbert", 1), ("electra", 2), ("roberta", 1), ("xlm-roberta", 2), ("deberta-v2", 1)]
WEIGHTS = [1.0, 1.0, 2.0, 1.0, 1.0] + [1.0] * len(FAMILIES)


@pytest.fixture(scope="module")
def kinds(tiny_models, tmp_path_factory, tiny_llm, distilbert_base):  # noqa: F811
    """Five teachers, one per kind: spec, expected column name, in-process load options."""
    import torch

    from raykd.models.registry import load_student

    root = tmp_path_factory.mktemp("kinds")
    cat = tiny_models("bert", "cross_encoder", seed=11)
    torch.manual_seed(0)
    dot = str(root / "bi" / "model")
    load_student("bert_dot", tiny_models("bert", "encoder", seed=3)).save_pretrained(dot)
    base, enc, _ = distilbert_base
    comp = torch.nn.Linear(32, 16)
    state = {"bert_model." + k: v for k, v in enc.state_dict().items()}
    state.update({"compressor." + k: v for k, v in comp.state_dict().items()})
    colbert = _released(root, "released_colbert", {"model_type": "ColBERT", "bert_model": base,
                                                    "compression_dim": 16}, state)
    families = [(f"cat:{_cross_encoder(root, family, labels)}", family.replace("-", "_"), {})
                for family, labels in FAMILIES]
    return [(f"cat:{cat}", os.path.basename(cat).replace("-", "_"), {}),
            (f"dot:{dot}", "bi", {}),
            ("bm25", "bm25", {}),
            (f"llm:{tiny_llm[0]}", "qwen2", {"template": TEMPLATE}),
            (f"colbert:{colbert}", "released_colbert", {}), *families]


@pytest.fixture(scope="module")
def mixed(ray_cluster, sample_store, kinds, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("score-kinds") / "scores")
    cfg = ScoreConfig(data=sample_store, teachers=[k[0] for k in kinds], out=out, weights=WEIGHTS,
                      normalization="zscore", teacher_options={"template": TEMPLATE}, **SMALL)
    return cfg, score(cfg), TripleScores(out)


def _pair_texts(store: str, pairs) -> tuple[list[str], list[str]]:
    s = TextStore(store)
    qtext = dict(zip(s.queries("train")["qid"].to_pylist(), s.queries("train")["text"].to_pylist()))
    return [qtext[q] for q in pairs["qid"].to_pylist()], s.passages(pairs["pid"].to_numpy())


def test_each_kind_scores_as_its_own_teacher(mixed, kinds, sample_store):
    cfg, m, s = mixed
    assert s.teachers == [name for _, name, _ in kinds]
    pairs = storage.read_parquet(storage.join(cfg.out, "pair_scores"))
    assert pairs.num_rows == m.stats["unique_pairs"]
    qs, ps = _pair_texts(sample_store, pairs)
    for spec, name, opts in kinds:
        want = load_teacher(spec, store=sample_store, **opts).score_pairs(qs, ps)
        np.testing.assert_allclose(pairs[f"score__{name}"].to_numpy(), want, rtol=1e-4, atol=1e-4, err_msg=spec)


def test_zscore_ensemble_is_the_documented_weighted_mean(mixed):
    cfg, m, s = mixed
    norm = m.stats["normalization"]
    assert norm["method"] == "zscore" and list(norm["teachers"]) == s.teachers
    pairs = storage.read_parquet(storage.join(cfg.out, "pair_scores"))
    stats = {}
    for n in s.teachers:  # the statistics: each teacher over the run's unique pairs, each once
        raw = pairs[f"score__{n}"].to_numpy().astype(np.float64)
        got = norm["teachers"][n]
        assert got["count"] == len(raw)
        for key, value in (("mean", raw.mean()), ("std", raw.std()), ("min", raw.min()), ("max", raw.max())):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (n, key)
        stats[n] = got
    assert np.std([stats[n]["mean"] for n in s.teachers]) > 0.1  # the scales really differ

    def expected(cols: dict) -> np.ndarray:
        acc = sum(w * (cols[n].astype(np.float64) - stats[n]["mean"]) / stats[n]["std"]
                  for w, n in zip(WEIGHTS, s.teachers))
        return acc / sum(WEIGHTS)

    t = s.table()
    for side in ("pos", "neg"):
        want = expected({n: t[f"{side}_score__{n}"].to_numpy() for n in s.teachers})
        np.testing.assert_allclose(t[f"{side}_score"].to_numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["margin"].to_numpy(), t["pos_score"].to_numpy() - t["neg_score"].to_numpy())
    np.testing.assert_allclose(pairs["score"].to_numpy(), expected({n: pairs[f"score__{n}"].to_numpy()
                                                                    for n in s.teachers}), rtol=1e-5, atol=1e-5)
    summary = json.loads(storage.read_bytes(storage.join(cfg.out, "analysis", "teacher_scores.json")))
    for n in s.teachers:  # each teacher before and after normalisation
        assert summary[n]["pos"]["count"] == summary[n]["normalized"]["pos"]["count"] == len(s)
        assert summary[n]["normalized"]["all"]["mean"] == pytest.approx(
            (summary[n]["all"]["mean"] - stats[n]["mean"]) / stats[n]["std"], abs=1e-6)


def test_rerun_after_a_crash_in_the_finishing_pass_equals_the_run(mixed, tmp_path):
    """A crash after every pair was scored and some parts committed: the re-run scores only the part whose raw
    pair scores are gone, commits the others from the kept ones, and gives the same output."""
    cfg, m, s = mixed
    out = str(tmp_path / "scores")
    shutil.copytree(cfg.out, out)
    os.remove(os.path.join(out, "manifest.json"))
    parts = sorted(os.listdir(os.path.join(out, "parts")))
    assert len(parts) >= 3
    for name in parts[:2]:  # not committed yet; the second also not scored yet
        os.remove(os.path.join(out, "parts", name))
        os.remove(os.path.join(out, "pair_scores", name))
    os.remove(os.path.join(out, "_work", "raw_pairs", parts[1]))
    kept = {n: os.path.getmtime(os.path.join(out, "parts", n)) for n in parts[2:]}
    again = score(ScoreConfig(**{**cfg.__dict__, "out": out}))
    assert {n: os.path.getmtime(os.path.join(out, "parts", n)) for n in parts[2:]} == kept
    assert sum(again.stats["model_loads"].values()) == len(s.teachers)  # one actor, for the one part
    assert again.stats["forward_passes"] == m.stats["forward_passes"]
    for n in s.teachers:
        for key in ("count", "mean", "std", "min", "max"):
            assert again.stats["normalization"]["teachers"][n][key] == pytest.approx(
                m.stats["normalization"]["teachers"][n][key], rel=1e-6, abs=1e-6)
    got, want = TripleScores(out).table(), s.table()
    assert got.select(KEYS).equals(want.select(KEYS))
    # the rescored part ran in other batches (other padding), so a raw score may move by float noise (< 1e-4);
    # z-scoring divides it by each teacher's std (tiny random teachers: std ~0.01), so the ensemble's bound is
    # 1e-4 x sum_t (w_t / std_t) / sum_t w_t
    std = {n: m.stats["normalization"]["teachers"][n]["std"] for n in s.teachers}
    ensemble_tol = 1e-4 * sum(w / std[n] for w, n in zip(WEIGHTS, s.teachers)) / sum(WEIGHTS)
    for c in want.column_names[3:]:
        tol = 1e-4 if "__" in c else 2 * ensemble_tol  # margin: two ensemble scores
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-4, atol=tol, err_msg=c)


def test_a_headless_teacher_of_any_kind_is_refused_before_ray_work(sample_store, tiny_models, tmp_path):
    from raykd.models.colbert import LINEAR_FILE
    from raykd.models.registry import load_student

    cb = str(tmp_path / "cb")
    load_student("colbert", tiny_models("bert", "encoder", seed=3), dim=16).save_pretrained(cb)
    os.remove(os.path.join(cb, LINEAR_FILE))
    with pytest.raises(UserError, match=f"cb has no trained scoring head: its weights lack {LINEAR_FILE}"):
        score(ScoreConfig(data=sample_store, teachers=["bm25", f"colbert:{cb}"], out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="not a trained raykd prettr model"):
        score(ScoreConfig(data=sample_store, teachers=[f"prettr:{cb}"], out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="applies to llm teachers, and none is given"):
        score(ScoreConfig(data=sample_store, teachers=["bm25"], teacher_options={"template": "{query}{passage}"},
                          out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_cli_flags_of_kinds_and_normalization():
    from raykd.cli import main

    cmd = main.commands["score"]
    argv = ["--data", "d", "--out", "o", "--teacher", "cat:/m/x/model", "--teacher", "bm25", "--teacher", "llm:/m/q",
            "--normalization", "minmax", "--teacher-option", 'template="Q: {query}\\nP: {passage}\\nRelevant:"',
            "--teacher-option", "q.yes_token='Yes'"]
    cfg = cmd.build(None, cmd.make_context("score", list(argv)).params)  # click consumes its list
    assert cfg.normalization == "minmax" and cfg.teachers == ["cat:/m/x/model", "bm25", "llm:/m/q"]
    assert cfg.teacher_options == {"template": "Q: {query}\nP: {passage}\nRelevant:", "q.yes_token": "Yes"}
    assert cfg.query_max_length is None  # each teacher's own lengths
    from raykd.stages.score.stage import _teachers

    t = _teachers(cfg)
    assert t.names == ["x", "bm25", "q"]
    assert t.load_options == {"x": {}, "bm25": {"store": "d"},
                              "q": {"template": "Q: {query}\nP: {passage}\nRelevant:", "yes_token": "Yes"}}
    unquoted = cmd.build(None, cmd.make_context("score", argv[:-2] + ["--teacher-option", "q.yes_token=yes"]).params)
    assert unquoted.teacher_options["q.yes_token"] is True  # YAML's boolean
    with pytest.raises(UserError, match="must be a str, got True.*quote it"):
        _teachers(unquoted)
