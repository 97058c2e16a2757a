"""TCT-ColBERT: the loss against hand-computed values, its options, the frozen teacher, the student's released
input format, cross-device in-batch negatives, and the ablation modes end to end on Ray Train.

Every training-step test calls the step ``raykd train --loss tct`` runs: ``train_step(get_loss("tct"))``
(:class:`raykd.stages.train_steps.InBatchStep`), with its ``setup``, ``features`` and ``loss``."""

from __future__ import annotations

import math
import os

import pytest
import torch

from raykd.errors import UserError
from raykd.losses import get_loss
from raykd.losses.tct import in_batch_ce, kl_distillation, tct_loss
from raykd.models.tct import TctBiEncoder
from raykd.stages.train_steps import BatchContext, FrozenColbertTeacher, parameter_checksum, train_step

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- the loss
def test_kl_and_ce_match_hand_computed_values():
    tau = 0.25
    # query 0 against its triple: teacher/tau = [ln 3, 0] -> P_hat = [3/4, 1/4]; student [0, 0] -> P = [1/2, 1/2]
    teacher = torch.tensor([[math.log(3) * tau, 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    expected_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert float(kl_distillation(student, teacher, tau)[0]) == pytest.approx(expected_kl, abs=1e-6)
    assert expected_kl == pytest.approx(0.130812, abs=1e-6)
    # CE: uniform student over 4 in-batch passages -> -log(1/4)
    assert float(in_batch_ce(torch.zeros(1, 4), torch.tensor([2]))[0]) == pytest.approx(math.log(4), abs=1e-6)
    # CE: scores [2, 0, 1, 0], positive 0 -> -log(e^2 / (e^2 + 1 + e + 1))
    ce = -math.log(math.exp(2) / (math.exp(2) + 2 + math.exp(1)))
    assert float(in_batch_ce(torch.tensor([[2.0, 0.0, 1.0, 0.0]]), torch.tensor([0]))[0]) == pytest.approx(ce, abs=1e-6)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_tct_loss_modes_on_a_small_batch():
    # B = 2 queries x 2B = 4 passages laid out [pos_0, pos_1, neg_0, neg_1]
    s = [[2.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.5, 1.0]]
    t = [[3.0, 0.5, 2.0, 0.0], [0.0, 3.0, 1.0, 2.5]]
    tau, gamma = 0.25, 0.1
    pos, neg = [0, 1], [2, 3]

    def kl(p_hat, p):
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_hat, p))

    ce = [-math.log(_softmax(s[i])[pos[i]]) for i in range(2)]
    kl_inbatch = [kl(_softmax([x / tau for x in t[i]]), _softmax(s[i])) for i in range(2)]
    kl_triplet = [
        kl(_softmax([t[i][pos[i]] / tau, t[i][neg[i]] / tau]), _softmax([s[i][pos[i]], s[i][neg[i]]])) for i in range(2)
    ]
    S, T = torch.tensor(s), torch.tensor(t)
    expect = {
        "none": sum(ce) / 2,
        "triplet": sum(gamma * c + (1 - gamma) * k for c, k in zip(ce, kl_triplet)) / 2,
        "inbatch": sum(gamma * c + (1 - gamma) * k for c, k in zip(ce, kl_inbatch)) / 2,
    }
    for mode, value in expect.items():
        assert float(tct_loss(S, T, mode=mode, tau=tau, gamma=gamma)) == pytest.approx(value, abs=1e-5), mode
    # the original code's combined mode: 0.5 * CE + 0.5 * KL
    half = sum(0.5 * c + 0.5 * k for c, k in zip(ce, kl_inbatch)) / 2
    assert float(tct_loss(S, T, mode="inbatch", tau=tau, gamma=0.5)) == pytest.approx(half, abs=1e-5)
    # labels only needs no teacher
    assert float(tct_loss(S, None, mode="none")) == pytest.approx(expect["none"], abs=1e-5)


def test_triplet_mode_ignores_other_queries_passages_and_inbatch_does_not():
    S = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    T = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    T2 = T.clone()
    T2[0, 1] += 5.0  # query 0 against query 1's positive: not in query 0's triple
    assert torch.allclose(tct_loss(S, T, mode="triplet"), tct_loss(S, T2, mode="triplet"))
    assert not torch.allclose(tct_loss(S, T, mode="inbatch"), tct_loss(S, T2, mode="inbatch"))


def test_gradient_reaches_the_student_scores_only():
    S = torch.randn(2, 4, requires_grad=True)
    T = torch.randn(2, 4, requires_grad=True)
    tct_loss(S, T, mode="inbatch").backward()
    assert S.grad is not None and S.grad.abs().sum() > 0
    assert T.grad is None


def test_tct_loss_rejects_bad_input():
    S = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="unknown TCT mode"):
        tct_loss(S, S, mode="pairwise")
    with pytest.raises(ValueError, match="teacher_scores is required"):
        tct_loss(S, None, mode="inbatch")
    with pytest.raises(ValueError, match="same queries against the same passages"):
        tct_loss(S, torch.zeros(2, 3), mode="inbatch")
    with pytest.raises(ValueError, match="not the \\(B, 2B\\) batch layout"):
        tct_loss(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="gamma must be in"):
        tct_loss(S, S, gamma=1.5)
    with pytest.raises(ValueError, match="tau must be > 0"):
        tct_loss(S, S, tau=0.0)


def test_options_are_checked_in_one_place_and_command_line_strings_are_converted():
    spec = get_loss("tct")
    assert spec.resolve_options({}) == {"mode": "inbatch", "tau": 0.25, "gamma": 0.1, "cross_device": False,
                                        "teacher_bf16": True, "check_teacher_every": 0}
    # --loss-option KEY=VALUE arrives as strings
    got = spec.resolve_options({"mode": "triplet", "tau": "0.5", "gamma": "0.5", "cross_device": "true"})
    assert (got["mode"], got["tau"], got["gamma"], got["cross_device"]) == ("triplet", 0.5, 0.5, True)
    with pytest.raises(UserError, match="loss tct has no option temperature; its options: mode, tau, gamma"):
        spec.resolve_options({"temperature": 1})
    with pytest.raises(UserError, match="loss tct: option gamma=3.0 must be in \\[0, 1\\]"):
        spec.resolve_options({"gamma": 3})
    with pytest.raises(UserError, match="option mode='pairs' is not one of none, triplet, inbatch"):
        spec.resolve_options({"mode": "pairs"})
    with pytest.raises(UserError, match="option cross_device='maybe' is not a bool"):
        spec.resolve_options({"cross_device": "maybe"})
    with pytest.raises(UserError, match="loss margin_mse has no option tau; its options: none"):
        get_loss("margin_mse").resolve_options({"tau": 0.3})
    # a distilling mode needs a teacher: refused before any worker starts
    with pytest.raises(UserError, match="runs a ColBERT teacher in the loop: give --teacher"):
        train_step(spec).check({"loss_options": {}})
    assert train_step(spec).check({"loss_options": {"mode": "none"}})["mode"] == "none"


# ---------------------------------------------------------------------------------------------- models
QUERIES = ["what is ray", "how do kernels pool", "who trains the teacher"]
POSITIVES = ["ray is a framework for distributed python", "kernel pooling counts soft matches", "a colbert teacher"]
NEGATIVES = ["the weather is nice today", "passages about cooking pasta", "a quiet afternoon by the river"]


@pytest.fixture(scope="module")
def colbert_teacher_dir(tiny_models, tmp_path_factory):
    """A tiny real ColBERT (raykd's model class) saved as a train-stage checkpoint would be."""
    from raykd.models.colbert import ColBERT

    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("colbert-teacher"))
    ColBERT.from_pretrained(tiny_models("bert", "encoder", seed=3)).save_pretrained(out)
    return out


def test_student_uses_the_released_tct_input_format(tiny_models):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_models("bert", "encoder", seed=3)
    student = TctBiEncoder.from_pretrained(path).eval()  # a plain HF folder: the released convention
    tok = student.tokenizer
    assert student.tct_format and student.pool_skip == 4
    q = student.tokenize_queries(["what is ray", "a much longer query " * 20])
    assert q["input_ids"].shape == (2, 36) and bool(q["attention_mask"].all())
    first = tok.convert_ids_to_tokens(q["input_ids"][0].tolist())
    assert first[:4] == ["[CLS]", "[", "q", "]"]
    assert first[-1] == "[MASK]" and "[SEP]" not in first and "[PAD]" not in first
    assert tok.convert_ids_to_tokens(q["input_ids"][1].tolist())[-1] != "[MASK]"  # long query: cut at 36
    p = student.tokenize_passages(["ray is a framework", "short"])
    toks = tok.convert_ids_to_tokens(p["input_ids"][0].tolist())
    assert toks[:4] == ["[CLS]", "[", "d", "]"] and "[SEP]" not in toks

    # pyserini's TctColBertQueryEncoder / DocumentEncoder, written out independently
    bert = AutoModel.from_pretrained(path).eval()
    ref_tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        enc = ref_tok("[CLS] [Q] what is ray" + "[MASK]" * 36, max_length=36, truncation=True,
                      add_special_tokens=False, return_tensors="pt")
        ref_q = bert(**enc).last_hidden_state[:, 4:, :].mean(dim=1)
        enc = ref_tok(["[CLS] [D] ray is a framework", "[CLS] [D] short"], max_length=512, padding="longest",
                      truncation=True, add_special_tokens=False, return_tensors="pt")
        h, m = bert(**enc).last_hidden_state[:, 4:], enc["attention_mask"][:, 4:].unsqueeze(-1).float()
        ref_p = (h * m).sum(1) / m.sum(1)
    assert torch.allclose(student.encode_query(["what is ray"]), ref_q, atol=1e-5)
    assert torch.allclose(student.encode_passage(["ray is a framework", "short"]), ref_p, atol=1e-5)

    plain = TctBiEncoder.from_pretrained(path, tct_format=False)
    toks = tok.convert_ids_to_tokens(plain.tokenize_queries(["what is ray"])["input_ids"][0].tolist())
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and plain.pool_skip == 0
    with pytest.raises(UserError, match="pooling='cls' is not an option"):
        TctBiEncoder.from_pretrained(path, pooling="cls")


def test_student_is_an_ordinary_registered_student(colbert_teacher_dir, tmp_path):
    from raykd.models.base import read_raykd_config
    from raykd.models.registry import STUDENTS, load_scorer, load_student

    assert STUDENTS["tct"] is TctBiEncoder
    # stage 2 starts from the ColBERT teacher's folder: its weights, not its lengths (32 / 180)
    student = load_student("tct", colbert_teacher_dir, passage_max_length=64)
    assert (student.query_max_length, student.passage_max_length) == (36, 64)
    teacher = FrozenColbertTeacher.from_pretrained(colbert_teacher_dir)
    for (name, a), b in zip(student.encoder.state_dict().items(), teacher.colbert.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    copy = TctBiEncoder.from_teacher(teacher)
    assert all(p.requires_grad for p in copy.parameters())
    with torch.no_grad():
        next(copy.encoder.parameters()).add_(1.0)  # a copy, not shared
    teacher.assert_unchanged()

    student.save_pretrained(str(tmp_path / "s"))
    saved = read_raykd_config(str(tmp_path / "s"))
    assert saved["kind"] == "tct" and saved["tct_format"] is True and saved["passage_max_length"] == 64
    assert [f for f in os.listdir(tmp_path / "s") if f.startswith("raykd_")] == ["raykd_model.json"]
    again = load_scorer(str(tmp_path / "s")).eval()
    assert type(again) is TctBiEncoder and again.passage_max_length == 64 and again.pool_skip == 4
    student.eval()
    assert torch.allclose(again.encode_passage(POSITIVES), student.encode_passage(POSITIVES), atol=1e-5)


def test_teacher_is_frozen_and_scores_every_pair(colbert_teacher_dir, tiny_models, tmp_path):
    from raykd.models.colbert import ColBERT

    teacher = FrozenColbertTeacher.from_pretrained(colbert_teacher_dir)
    assert not teacher.colbert.training
    assert not any(p.requires_grad for p in teacher.colbert.parameters())
    passages = POSITIVES + NEGATIVES
    matrix = teacher.scores(QUERIES, passages)
    assert matrix.shape == (3, 6) and not matrix.requires_grad
    reference = ColBERT.from_pretrained(colbert_teacher_dir).eval()
    for i, q in enumerate(QUERIES):
        for j, p in enumerate(passages):
            assert float(matrix[i, j]) == pytest.approx(float(reference.score([q], [p])[0]), abs=1e-4)

    with torch.no_grad():
        next(teacher.colbert.parameters()).mul_(1.0001)
    with pytest.raises(RuntimeError, match="weights changed"):
        teacher.assert_unchanged()
    with pytest.raises(UserError, match="not a raykd ColBERT checkpoint"):
        FrozenColbertTeacher.from_pretrained(tiny_models("bert", "encoder", seed=3))


def _tct_step(teacher_dir: str, **options):
    """The TCT training step as a Ray Train worker sets it up: the loss's step, its setup (options resolved,
    teacher loaded from ``--teacher``), and a student initialised from the teacher's folder."""
    from raykd.models.registry import load_student

    step = train_step(get_loss("tct"))
    ctx = BatchContext(device=torch.device("cpu"), options=options,
                       config={"teacher": teacher_dir, "checkpoint_every": 1})
    step.setup(ctx)
    torch.manual_seed(0)
    return step, ctx, load_student("tct", teacher_dir)


def _batch(step, student, queries, positives, negatives) -> dict:
    """What the train stage's collate step builds (TripleCollate)."""
    return {"features": step.features(student, queries, positives, negatives), "queries": list(queries),
            "positives": list(positives), "negatives": list(negatives), "size": len(queries)}


@pytest.mark.parametrize("mode", ["none", "triplet", "inbatch"])
def test_training_steps_move_the_student_and_never_the_teacher(colbert_teacher_dir, mode):
    step, ctx, student = _tct_step(colbert_teacher_dir, mode=mode)
    teacher = ctx.state["teacher"]
    assert (teacher is None) == (mode == "none")
    before = parameter_checksum(FrozenColbertTeacher.from_pretrained(colbert_teacher_dir).colbert)
    student.train()
    start = parameter_checksum(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    batch = _batch(step, student, QUERIES, POSITIVES, NEGATIVES)
    assert batch["features"]["passage_input_ids"].shape[0] == 6  # 2B passages: positives, then negatives
    for i in range(3):
        ctx.step = i
        opt.zero_grad()
        loss, stats = step.loss(student, batch, ctx)
        assert torch.isfinite(loss) and 0.0 <= stats["inbatch_accuracy"] <= 1.0
        loss.backward()
        opt.step()
    assert stats["teacher_checks"] == (3 if mode != "none" else 0)  # checked at every step (checkpoint_every 1)
    if teacher is not None:
        teacher.assert_unchanged()
        assert parameter_checksum(teacher.colbert) == before and "teacher_agreement" in stats
    assert parameter_checksum(student) != start


def test_the_step_refuses_a_multi_vector_student(colbert_teacher_dir):
    from raykd.models.colbert import ColBERT

    step, ctx, _ = _tct_step(colbert_teacher_dir, mode="none")
    colbert = ColBERT.from_pretrained(colbert_teacher_dir)
    with pytest.raises(UserError, match="single-vector bi-encoder"):
        step.loss(colbert, _batch(step, colbert, QUERIES, POSITIVES, NEGATIVES), ctx)


# ---------------------------------------------------------------------------------------------- cross-device
def _cross_device_worker(rank: int, world: int, port: int, teacher_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from raykd.losses.gather import gather_rows

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # unequal row counts: rank 0 has 3 rows, rank 1 has 1. Both workers' losses are the same weighted sum of
        # all rows, so each row's owner receives the gradient of both: 2 * weight
        x = torch.arange(3 - 2 * rank, dtype=torch.float32).unsqueeze(1) + 10 * rank
        x.requires_grad_(True)
        all_rows, offset = gather_rows(x)
        (all_rows.squeeze(1) * torch.arange(1.0, 5.0)).sum().backward()
        torch.save({"rows": all_rows.detach(), "offset": offset, "grad": x.grad}, f"{out_dir}/gather{rank}.pt")

        for mode in ("triplet", "inbatch"):
            step, ctx, student = _tct_step(teacher_dir, mode=mode, cross_device=True)
            student.eval()  # no dropout, so runs are comparable
            half = slice(2 * rank, 2 * rank + 2)  # 4 triples, 2 per worker
            loss, _ = step.loss(student, _batch(step, student, QUERIES_4[half], POSITIVES_4[half], NEGATIVES_4[half]),
                                ctx)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
            dist.all_reduce(grads)  # what DDP does: average the gradients over workers
            losses = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(losses, loss.detach().reshape(1))
            if rank == 0:
                torch.save({"loss": torch.cat(losses).mean(), "grad": grads / world}, f"{out_dir}/{mode}.pt")
    finally:
        dist.destroy_process_group()


QUERIES_4 = QUERIES + ["where do rivers end"]
POSITIVES_4 = POSITIVES + ["rivers end in the sea"]
NEGATIVES_4 = NEGATIVES + ["ray tracing renders light"]


def test_cross_device_loss_equals_one_worker_with_the_whole_batch(colbert_teacher_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cross_device_worker, args=(2, port, colbert_teacher_dir, str(tmp_path)), nprocs=2, join=True)

    g0, g1 = torch.load(tmp_path / "gather0.pt"), torch.load(tmp_path / "gather1.pt")
    assert g0["rows"].squeeze(1).tolist() == [0.0, 1.0, 2.0, 10.0] and g1["rows"].equal(g0["rows"])
    assert (g0["offset"], g1["offset"]) == (0, 3)
    assert g0["grad"].squeeze(1).tolist() == [2.0, 4.0, 6.0] and g1["grad"].squeeze(1).tolist() == [8.0]

    for mode in ("triplet", "inbatch"):
        step, ctx, student = _tct_step(colbert_teacher_dir, mode=mode, cross_device=False)
        student.eval()
        loss, _ = step.loss(student, _batch(step, student, QUERIES_4, POSITIVES_4, NEGATIVES_4), ctx)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        got = torch.load(tmp_path / f"{mode}.pt")
        assert float(got["loss"]) == pytest.approx(loss.item(), abs=1e-5), mode
        assert torch.allclose(got["grad"], grads, atol=1e-5, rtol=1e-4), mode
    assert os.path.exists(tmp_path / "inbatch.pt")


# ---------------------------------------------------------------------------------------------- Ray Train
def _stage_cfg(sample_store, **kw):
    from raykd.stages.train import TrainConfig

    base = dict(data=sample_store, scores=None, workers=2, batch_size=8, lr=3e-4, checkpoint_every=6,
                keep_checkpoints=1, log_every=3, val_queries=10, val_negatives=9, max_failures=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained_colbert_teacher(ray_cluster, sample_store, tiny_models, tmp_path_factory) -> str:
    """Stage 1 of the paper: a ColBERT teacher fine-tuned on the sample's triples with raykd's train stage."""
    from raykd.stages.train import train

    out = str(tmp_path_factory.mktemp("tct-stage1"))
    train(_stage_cfg(sample_store, student="colbert", init=tiny_models("bert", "encoder", seed=3), loss="labels",
                     out=out, steps=12, student_options={"dim": 32}))
    return os.path.join(out, "model")


@pytest.mark.slow
def test_three_ablation_modes_train_end_to_end_on_two_ray_workers(trained_colbert_teacher, sample_store, tmp_path):
    import json

    from raykd import storage
    from raykd.models.registry import load_scorer
    from raykd.stages.train import train

    teacher_before = parameter_checksum(FrozenColbertTeacher.from_pretrained(trained_colbert_teacher).colbert)
    results = {}
    for mode, cross_device in (("none", False), ("triplet", False), ("inbatch", True)):
        out = str(tmp_path / mode)
        manifest = train(_stage_cfg(
            sample_store, student="tct", init=trained_colbert_teacher, teacher=trained_colbert_teacher, loss="tct",
            out=out, steps=6, loss_options={"mode": mode, "cross_device": str(cross_device).lower()},
        ))
        assert manifest.stats["loss_name"] == "tct" and manifest.counts["steps"] == 6
        history = [json.loads(x) for x in storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()]
        logged = [h for h in history if "loss" in h]
        assert logged and all(math.isfinite(h["loss"]) for h in logged)
        # the in-worker checksum of the teacher was verified (it raises on any change), except without a teacher
        assert logged[-1]["teacher_checks"] >= (1 if mode != "none" else 0)
        student = load_scorer(os.path.join(out, "model"))
        assert isinstance(student, TctBiEncoder) and student.tct_format and student.pool_skip == 4
        results[mode] = manifest.stats["val_mrr@10_final"]
        assert 0.0 <= results[mode] <= 1.0
    # the teacher on disk is bit-identical after three training runs that used it
    assert parameter_checksum(FrozenColbertTeacher.from_pretrained(trained_colbert_teacher).colbert) == teacher_before


def test_bad_loss_options_fail_before_ray_starts(sample_store, tiny_models, tmp_path):
    from raykd.stages.train import train

    with pytest.raises(UserError, match="loss tct has no option tct_mode"):
        train(_stage_cfg(sample_store, student="tct", init=tiny_models("bert", "encoder", seed=3), loss="tct",
                         out=str(tmp_path / "o"), loss_options={"tct_mode": "none"}))
