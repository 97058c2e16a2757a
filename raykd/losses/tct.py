"""TCT-ColBERT: tightly-coupled in-batch distillation (Lin, Yang and Lin 2020, "Distilling Dense
Representations for Ranking using Tightly-Coupled Teachers", arXiv:2010.11386, Eq. 5-6 and Table 3).

A batch holds B triples ``(q_i, d_i+, d_i-)``. Its 2B passages are laid out as **all positives, then all
negatives**: column ``j < B`` is ``d_j+``, column ``B + j`` is ``d_j-``. Score matrices are ``(B, 2B)``:
``S[i, j] = phi(q_i, d_j)`` for every query against every passage of the batch (its own positive and negative
and everyone else's). With ``k`` queries scored against more passages (cross-device gathering) the matrix is
``(k, N)`` and ``positive_index`` says where each query's positive sits.

    P(d | q_i)      = softmax_j( S_student[i, j] )                 (student: dot product, no temperature)
    P_hat(d | q_i)  = softmax_j( S_teacher[i, j] / tau )           (teacher: ColBERT MaxSim)

    L = mean_i [ gamma * CE_i + (1 - gamma) * KL_i ]
    CE_i = -log P(d_i+ | q_i)                                      (labels, in-batch negatives)
    KL_i = sum_j P_hat(d_j | q_i) * (log P_hat(d_j | q_i) - log P(d_j | q_i))

The paper sums over queries (Eq. 6); raykd takes the mean over queries so the loss does not scale with the
batch size (the learning rate absorbs the constant). Paper defaults: ``tau = 0.25``, ``gamma = 0.1``; the
original code's combined mode, 0.5 * CE + 0.5 * KL, is ``gamma = 0.5``.

Table 3 ablation modes (``mode``):

- ``none``    (condition 1, bi-encoder PoolAvg): labels only, ``L = mean_i CE_i``; no teacher needed.
- ``triplet`` (condition 2): the KL term only over the query's own triple ``{d_i+, d_i-}`` (both softmaxes
  restricted to those two columns); the CE term stays in-batch.
- ``inbatch`` (condition 3, TCT-ColBERT): the KL term over every passage of the batch.

Example::

    >>> import torch
    >>> s = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0]])    # B=2 queries x 2B=4 passages
    >>> t = torch.tensor([[3.0, 0.5, 2.0, 0.0], [0.0, 3.0, 0.0, 2.5]])
    >>> round(float(tct_loss(s, t, mode="inbatch", tau=0.25, gamma=0.1)), 4)
    0.3503
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "triplet", "inbatch")


def batch_positive_index(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Columns of the positives in the (B, 2B) layout: query ``i``'s positive is column ``i``."""
    return torch.arange(batch_size, device=device)


def _check(student_scores: torch.Tensor, teacher_scores: torch.Tensor | None, positive_index: torch.Tensor) -> None:
    if student_scores.dim() != 2:
        raise ValueError(
            f"student_scores must be a (queries, passages) matrix, got shape {tuple(student_scores.shape)}; "
            "score every query against every passage of the batch (positives first, then negatives)"
        )
    k, n = student_scores.shape
    if teacher_scores is not None and teacher_scores.shape != student_scores.shape:
        raise ValueError(
            f"teacher_scores has shape {tuple(teacher_scores.shape)} but student_scores has {(k, n)}; "
            "both must score the same queries against the same passages in the same order"
        )
    if positive_index.shape != (k,):
        raise ValueError(f"positive_index must have one column per query, shape ({k},), got {tuple(positive_index.shape)}")
    if n < 2:
        raise ValueError(f"need at least 2 passages per query (a positive and a negative), got {n}")


def in_batch_ce(student_scores: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """Per-query softmax cross entropy on the labels, ``-log softmax(S[i])[positive_index[i]]``; shape (k,)."""
    return F.cross_entropy(student_scores.float(), positive_index, reduction="none")


def kl_distillation(student_scores: torch.Tensor, teacher_scores: torch.Tensor, tau: float = 0.25) -> torch.Tensor:
    """Per-query ``KL(softmax(teacher / tau) || softmax(student))`` over the columns given; shape (k,).

    The teacher side carries no gradient."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_p_student = F.log_softmax(student_scores.float(), dim=-1)
    log_p_teacher = F.log_softmax(teacher_scores.detach().float() / tau, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)


def triplet_columns(scores: torch.Tensor, positive_index: torch.Tensor, negative_index: torch.Tensor) -> torch.Tensor:
    """The (k, 2) sub-matrix ``[S[i, pos_i], S[i, neg_i]]``: each query against its own triple only."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return torch.stack([scores[rows, positive_index], scores[rows, negative_index]], dim=1)


def tct_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor | None = None,
    positive_index: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
    *,
    mode: str = "inbatch",
    tau: float = 0.25,
    gamma: float = 0.1,
) -> torch.Tensor:
    """The TCT-ColBERT loss (see the module docstring), a scalar averaged over queries.

    ``student_scores``, ``teacher_scores``: (k, N) scores of k queries against N passages (N = 2B for one
    worker's batch). ``positive_index`` / ``negative_index``: (k,) column of each query's own positive /
    negative; by default the (B, 2B) layout, ``i`` and ``B + i`` (requires N == 2k). ``teacher_scores`` may be
    None only for ``mode="none"``."""
    if mode not in MODES:
        raise ValueError(f"unknown TCT mode {mode!r}; expected one of {', '.join(MODES)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    k, n = student_scores.shape if student_scores.dim() == 2 else (0, 0)
    if positive_index is None or negative_index is None:
        if n != 2 * k:
            raise ValueError(
                f"scores of shape {(k, n)} are not the (B, 2B) batch layout; pass positive_index and negative_index"
            )
        positive_index = batch_positive_index(k, student_scores.device) if positive_index is None else positive_index
        negative_index = positive_index + k if negative_index is None else negative_index
    if mode == "none":
        _check(student_scores, None, positive_index)
        return in_batch_ce(student_scores, positive_index).mean()
    if teacher_scores is None:
        raise ValueError(f"mode {mode!r} distils from the teacher: teacher_scores is required")
    _check(student_scores, teacher_scores, positive_index)
    ce = in_batch_ce(student_scores, positive_index)
    if mode == "triplet":
        kl = kl_distillation(
            triplet_columns(student_scores, positive_index, negative_index),
            triplet_columns(teacher_scores, positive_index, negative_index),
            tau,
        )
    else:
        kl = kl_distillation(student_scores, teacher_scores, tau)
    return (gamma * ce + (1.0 - gamma) * kl).mean()


# ---------------------------------------------------------------------------------------------- the train seam
# ``raykd train --loss tct`` reaches TCT through raykd.losses.registry: LOSS_SPEC below is found when
# raykd.losses is imported. Options (``TrainConfig.loss_options``, CLI --tct-mode/--tau/--gamma/--cross-device):
OPTIONS = {
    "mode": "inbatch",  # none | triplet | inbatch (Table 3)
    "tau": 0.25,
    "gamma": 0.1,
    "cross_device": False,  # in-batch negatives gathered from every DDP worker
    "teacher_bf16": True,  # teacher weights in bf16 when training on GPU (ignored on CPU)
    "check_teacher_every": None,  # verify the teacher's checksum every N steps (default: checkpoint_every)
}


def tct_options(options: dict) -> dict:
    """``OPTIONS`` updated with the user's; unknown names and bad values fail with what is allowed."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown tct loss option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    out = {**OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    if out["mode"] not in MODES:
        raise ValueError(f"unknown TCT mode {out['mode']!r}; expected one of {', '.join(MODES)}")
    if not 0.0 <= float(out["gamma"]) <= 1.0 or float(out["tau"]) <= 0:
        raise ValueError(f"tct needs 0 <= gamma <= 1 and tau > 0, got gamma={out['gamma']}, tau={out['tau']}")
    return out


def tct_setup(ctx) -> None:
    """Once per worker: check the options and the student, load and freeze the ColBERT teacher."""
    from raykd.errors import UserError

    opts = tct_options(ctx.options)
    ctx.state["tct_options"] = opts
    ctx.state["tct_teacher_checks"] = 0
    teacher_uri = ctx.config.get("teacher")
    if opts["mode"] == "none":
        ctx.state["tct_teacher"] = None
        return
    if not teacher_uri:
        raise UserError(
            f"--loss tct (mode {opts['mode']}) runs a ColBERT teacher in the loop: give --teacher, a checkpoint of "
            "`raykd train --student colbert` (its model/ folder); or --tct-mode none for labels only"
        )
    from raykd import storage
    from raykd.models.tct import FrozenColbertTeacher

    ctx.state["tct_teacher"] = FrozenColbertTeacher.from_pretrained(
        storage.local_dir(teacher_uri), device=ctx.device, bf16=bool(opts["teacher_bf16"])
    )


def tct_features(model, queries: list[str], positives: list[str], negatives: list[str]) -> dict:
    """The student's inputs for one batch: B queries, then 2B passages (the positives, then the negatives)."""
    return model.tokenize(list(queries), list(positives) + list(negatives))


def tct_batch_loss(model, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
    """One step of TCT on the DDP-wrapped bi-encoder student (see :class:`raykd.models.tct.TctDistiller`)."""
    from raykd.errors import UserError
    from raykd.models.tct import TctDistiller

    if "tct_options" not in ctx.state:
        tct_setup(ctx)
    opts, teacher = ctx.state["tct_options"], ctx.state["tct_teacher"]
    bare = getattr(model, "module", model)
    if not hasattr(bare, "embed") or getattr(bare, "kind", None) == "colbert":
        raise UserError("the tct loss trains a single-vector bi-encoder: use --student tct (or bert_dot)")
    distiller = TctDistiller(model, teacher, mode=opts["mode"], tau=opts["tau"], gamma=opts["gamma"],
                             cross_device=opts["cross_device"])
    inputs = dict(batch["features"])
    if teacher is not None:
        t = teacher.tokenize(batch["queries"], list(batch["positives"]) + list(batch["negatives"]))
        inputs.update({f"teacher_{k}": v for k, v in t.items()})
    student, teacher_scores, pos_idx, neg_idx = distiller.scores(inputs)
    loss = distiller.loss_from_scores(student, teacher_scores, pos_idx, neg_idx)
    every = opts["check_teacher_every"] or ctx.config.get("checkpoint_every") or 500
    if teacher is not None and ctx.step % every == 0 and ctx.state.get("tct_checked_step") != ctx.step:
        teacher.assert_unchanged()
        ctx.state["tct_checked_step"] = ctx.step
        ctx.state["tct_teacher_checks"] += 1
    with torch.no_grad():
        stats = {
            "inbatch_accuracy": float((student.argmax(dim=1) == pos_idx).float().mean()),
            "teacher_checks": float(ctx.state["tct_teacher_checks"]),
        }
        if teacher_scores is not None:
            stats["teacher_agreement"] = float((student.argmax(dim=1) == teacher_scores.argmax(dim=1)).float().mean())
    return loss, stats


def _register_student() -> None:
    # `--student tct` (the TCT bi-encoder) for training, next to the registry's built-in students
    from raykd.models import registry

    if "tct" not in registry.STUDENTS:

        def _tct(path: str, **kw):
            from raykd.models.tct import TctBiEncoder

            return TctBiEncoder.from_pretrained(path, **kw)

        registry.register_student("tct", _tct)


def _loss_spec():
    from raykd.losses.registry import LossSpec

    return LossSpec(
        "tct",
        tct_loss,
        needs_scores=False,
        description="TCT-ColBERT: in-batch KL from a frozen ColBERT teacher run in the loop + CE on labels",
        batch_loss=tct_batch_loss,
        setup=tct_setup,
        make_features=tct_features,
    )


_register_student()
LOSS_SPEC = _loss_spec()


def cli_loss_options(loss: str, loss_options: dict, **flags) -> dict:
    """``loss_options`` with the command line's TCT flags (``tct_mode``, ``tau``, ``gamma``, ``cross_device``)
    merged in; flags not given (None) change nothing; TCT flags with another loss are an error."""
    from raykd.errors import UserError

    names = {"tct_mode": "mode", "tau": "tau", "gamma": "gamma", "cross_device": "cross_device"}
    given = {names[k]: v for k, v in flags.items() if v is not None}
    if given and loss != "tct":
        flag_names = ", ".join("--" + k.replace("_", "-") for k, v in flags.items() if v is not None)
        raise UserError(f"TCT option(s) {flag_names}: only for --loss tct (the loss is {loss})")
    merged = {**loss_options, **given}
    if loss == "tct":
        tct_options(merged)  # fail here, not on the workers after Ray has started
    return merged
