"""What the tightly-coupled teacher costs per training step: the TCT student trained alone (labels only, the
paper's condition 1) vs the same student with the frozen ColBERT teacher scoring the B x 2B batch inside the
loop (condition 3), measured side by side in one run, alternating step by step.

Both sides run the step ``raykd train --loss tct`` runs (:class:`raykd.stages.train_steps.InBatchStep`, mode
``none`` vs ``inbatch``) and then backward and the optimizer step. The student's inputs are tokenised beforehand
(the train stage tokenises them in its collate thread); the teacher tokenises inside the step, as in training. Models are randomly initialised transformers of the shape given
(default: a small BERT; ``--hidden 768 --layers 12 --heads 12 --intermediate 3072`` is BERT-base), built
offline with raykd's tiny-model builder, so the figures need no download.

    python bench/tct_throughput.py                      # CPU, small model
    python bench/tct_throughput.py --device cuda --hidden 768 --layers 12 --heads 12 --intermediate 3072 \\
        --batch 96 --bf16-teacher                       # the paper's batch size on a GPU

Last line: ``tct_step/student_step=X``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch


def texts(rng: random.Random, words: list[str], n: int, length: int) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="triples per step (B); 2B passages")
    ap.add_argument("--query-words", type=int, default=8)
    ap.add_argument("--passage-words", type=int, default=40)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16-teacher", action="store_true", help="teacher weights in bf16 (GPU only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from raykd.losses import get_loss
    from raykd.models.colbert import ColBERT
    from raykd.models.tct import TctBiEncoder
    from raykd.sample import lexicon
    from raykd.stages.train_steps import BatchContext, train_step
    from raykd.tiny import build_tiny_model

    device = torch.device(args.device)
    step_fn = train_step(get_loss("tct"))  # the step `raykd train --loss tct` runs
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(f"{tmp}/enc", hidden=args.hidden, layers=args.layers, heads=args.heads,
                                intermediate=args.intermediate)
        ColBERT.from_pretrained(path).save_pretrained(f"{tmp}/colbert")
        contexts = {}
        for mode in ("none", "inbatch"):
            contexts[mode] = BatchContext(device=device, config={"teacher": f"{tmp}/colbert"},
                                          options={"mode": mode, "teacher_bf16": args.bf16_teacher})
            step_fn.setup(contexts[mode])
    teacher = contexts["inbatch"].state["teacher"]
    student = TctBiEncoder.from_teacher(teacher).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    rng = random.Random(0)
    words = lexicon()
    n = args.warmup + args.steps
    batches = []
    for _ in range(n):
        q = texts(rng, words, args.batch, args.query_words)
        pos = texts(rng, words, args.batch, args.passage_words)
        neg = texts(rng, words, args.batch, args.passage_words)
        features = {k: v.to(device) for k, v in step_fn.features(student, q, pos, neg).items()}
        batches.append({"features": features, "queries": q, "positives": pos, "negatives": neg, "size": len(q)})

    def step(ctx: BatchContext, batch: dict) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = step_fn.loss(student, batch, ctx)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t_alone, t_coupled = [], []
    for i, batch in enumerate(batches):
        a, c = step(contexts["none"], batch), step(contexts["inbatch"], batch)  # alternate: same conditions for both sides
        if i >= args.warmup:
            t_alone.append(a)
            t_coupled.append(c)
    teacher.assert_unchanged()

    ms_alone, ms_coupled = 1000 * statistics.median(t_alone), 1000 * statistics.median(t_coupled)
    print(f"device={device} model=h{args.hidden}xL{args.layers} B={args.batch} (2B={2 * args.batch} passages, "
          f"~{args.passage_words} words) teacher_bf16={teacher.bf16} steps={args.steps}")
    print(f"student alone (labels only)      : {ms_alone:9.1f} ms/step  {args.batch / (ms_alone / 1000):8.1f} triples/s")
    print(f"student + in-loop teacher (TCT)  : {ms_coupled:9.1f} ms/step  {args.batch / (ms_coupled / 1000):8.1f} triples/s")
    print(f"tct_step/student_step={ms_coupled / ms_alone:.2f}")


if __name__ == "__main__":
    main()
