"""The group training step (listwise losses) on a tiny real student: triples as groups of 1+1, mined groups of
1+k, teacher score matrices, InfoNCE with in-batch negatives; the calls the training loop makes."""

from __future__ import annotations

import pytest
import torch

from raykd.errors import UserError
from raykd.losses import get_loss, infonce, listwise_kl
from raykd.models.registry import load_student
from raykd.stages.train_steps import BatchContext, GroupStep, train_step

QUERIES = ["what is a cell", "how do proteins fold"]
POSITIVES = ["a cell is the unit of life", "proteins fold into shapes"]
NEGATIVES = [["the sky is blue", "rivers flow"], ["cats sleep a lot", "a cell phone"]]


@pytest.fixture(scope="module")
def student(tiny_models):
    torch.manual_seed(0)
    return load_student("bert_dot", tiny_models("bert", "encoder"))


def _run(step, model, negatives, **batch):
    ctx = BatchContext(device=torch.device("cpu"), options=batch.pop("options", {}))
    step.setup(ctx)
    features = step.features(model, QUERIES, POSITIVES, negatives)
    return step.loss(model, {"features": features, "size": len(QUERIES), **batch}, ctx)


def test_group_step_scores_groups_in_one_pass_and_calls_the_loss(student):
    step = train_step(get_loss("listwise_kl"))
    assert isinstance(step, GroupStep)
    teacher = torch.tensor([[3.0, 0.0, 1.0], [2.0, 1.0, 0.5]])
    loss, stats = _run(step, student, NEGATIVES, teacher_scores=teacher, options={"temperature": 2.0})
    features = step.features(student, QUERIES, POSITIVES, NEGATIVES)
    with torch.no_grad():
        own = student(**features).view(2, 3)
    assert loss.item() == pytest.approx(listwise_kl(own, teacher, temperature=2.0).item(), rel=1e-5)
    assert 0.0 <= stats["pair_accuracy"] <= 1.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    student.zero_grad()


def test_triples_are_groups_of_one_plus_one(student):
    step = train_step(get_loss("nway_margin_mse"))
    loss, _ = _run(step, student, ["the sky is blue", "cats sleep a lot"],
                   teacher_pos=torch.tensor([2.0, 1.0]), teacher_neg=torch.tensor([0.0, 0.5]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="same number of negatives"):
        step.features(student, QUERIES, POSITIVES, [["a"], ["b", "c"]])


def test_infonce_in_batch_and_hard_negatives_only(student):
    step = train_step(get_loss("infonce"))
    with_batch, _ = _run(step, student, NEGATIVES)
    own_only, _ = _run(step, student, NEGATIVES, options={"in_batch": False})
    q, p = student(**step.features(student, QUERIES, POSITIVES, NEGATIVES), return_embeddings=True)
    scores = q @ p.T  # (2, 6): each query against all six passages, positives at columns 0 and 3
    assert with_batch.item() == pytest.approx(infonce(scores, torch.tensor([0, 3])).item(), rel=1e-5)
    assert with_batch.item() >= own_only.item() - 1e-6  # more negatives, never an easier task


def test_infonce_in_batch_needs_a_bi_encoder(tiny_models):
    colbert = load_student("colbert", tiny_models("bert", "encoder"))
    with pytest.raises(UserError, match="single-vector bi-encoder"):
        _run(train_step(get_loss("infonce")), colbert, NEGATIVES)


# ---------------------------------------------------------------------------------------------- cross-device
QUERIES_4 = QUERIES + ["where do rivers end", "why do cats purr"]
POSITIVES_4 = POSITIVES + ["rivers end in the sea", "cats purr when they are content"]
NEGATIVES_4 = NEGATIVES + [["the sea is salty", "mountains are tall"], ["dogs bark at night", "a purring engine"]]


def _infonce_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    """One DDP worker of two: InfoNCE on its 2 of the 4 groups, with and without ``cross_device``."""
    import torch.distributed as dist

    from raykd.stages.train_steps import parameter_checksum

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        half = slice(2 * rank, 2 * rank + 2)
        out = {}
        for name, cross_device in (("gathered", True), ("local", False)):
            torch.manual_seed(0)
            student = load_student("bert_dot", model_dir)
            student.eval()  # no dropout, so the runs are comparable
            step = train_step(get_loss("infonce"))
            ctx = BatchContext(device=torch.device("cpu"), rank=rank, world_size=world,
                               options={"in_batch": True, "cross_device": cross_device})
            step.setup(ctx)
            features = step.features(student, QUERIES_4[half], POSITIVES_4[half], NEGATIVES_4[half])
            loss, _ = step.loss(student, {"features": features, "size": 2}, ctx)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
            dist.all_reduce(grads)  # what DDP does: sum the gradients over workers, then divide by the world size
            losses = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(losses, loss.detach().reshape(1))
            out[name] = {"losses": torch.cat(losses), "grad": grads / world}
        out["checksum"] = parameter_checksum(student)
        torch.save(out, f"{out_dir}/infonce{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_infonce_cross_device_equals_one_worker_with_the_whole_batch(tiny_models, tmp_path):
    """gather.py's contract: with equal local batches, the mean over workers of each worker's loss (its queries
    against every worker's passages) is the one-worker loss on the whole batch, and the DDP-averaged gradients
    are that loss's gradients. Without ``cross_device`` each worker sees only its own passages: a different loss."""
    import socket

    import torch.multiprocessing as mp
    import torch.nn.functional as F

    from raykd.losses.infonce import in_batch_scores
    from raykd.stages.train_steps import parameter_checksum

    model_dir = tiny_models("bert", "encoder")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_infonce_worker, args=(2, port, model_dir, str(tmp_path)), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "infonce0.pt"), torch.load(tmp_path / "infonce1.pt")

    torch.manual_seed(0)
    student = load_student("bert_dot", model_dir)
    student.eval()
    assert w0["checksum"] == w1["checksum"] == parameter_checksum(student)  # the same weights everywhere
    step = train_step(get_loss("infonce"))
    ctx = BatchContext(device=torch.device("cpu"), options={"in_batch": True, "cross_device": False})
    step.setup(ctx)
    features = step.features(student, QUERIES_4, POSITIVES_4, NEGATIVES_4)
    loss, _ = step.loss(student, {"features": features, "size": 4}, ctx)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    with torch.no_grad():  # each query's loss against the 12 passages of the whole batch
        scores, positive_index = in_batch_scores(*student(**features, return_embeddings=True))
        per_query = F.cross_entropy(scores, positive_index, reduction="none")
    assert scores.shape == (4, 12) and positive_index.tolist() == [0, 3, 6, 9]

    for w in (w0, w1):  # both workers gathered the same per-worker losses and averaged the same gradients
        assert torch.equal(w["gathered"]["losses"], w0["gathered"]["losses"])
        assert torch.allclose(w["gathered"]["grad"], w0["gathered"]["grad"], atol=1e-7)
    gathered = w0["gathered"]
    # each worker's own loss: its 2 queries against all 12 passages, its positives at the global columns
    assert gathered["losses"].tolist() == pytest.approx([per_query[:2].mean().item(), per_query[2:].mean().item()],
                                                        abs=1e-5)
    assert float(gathered["losses"].mean()) == pytest.approx(loss.item(), abs=1e-5)
    assert gathered["grad"].shape == grads.shape and grads.abs().max() > 1e-3
    assert torch.allclose(gathered["grad"], grads, atol=1e-5, rtol=1e-4)

    # the control: in-batch negatives but no gathering, each worker scores only its own 6 passages
    local = w0["local"]
    assert float(local["losses"].mean()) < loss.item() - 1e-3  # half the negatives: an easier task
    assert not torch.allclose(local["grad"], grads, atol=1e-5, rtol=1e-4)
