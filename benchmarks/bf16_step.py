"""Where the Trainer's bf16-master step of the baby GPT goes on the CPU, and the alternatives
measured against its pieces, each pair alternating in one process (the host's speed drifts).

    python benchmarks/bf16_step.py [--steps 300]

Prints markdown:
1. the median of each phase of `Trainer`'s step (batch, forward, backward, the gradients into
   the fp32 master with the clip, AdamW, the updated weights back into the bf16 copy);
2. the gradients' cast and clip: one flat fp32 buffer (the Trainer's) against a cast per
   gradient and `clip_grad_norm_`;
3. one attention layer forward and backward (bf16 queries, keys and values of the baby GPT's
   shape) through each kernel the CPU offers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel import config
from bigmodel.models import gpt as gpt_lib
from bigmodel.objectives.clm import WindowSampler, lm_loss
from bigmodel.train import trainer as trainer_lib
from bigmodel.train.trainer import Trainer, seed_everything
from machine import commit, cpu_model
from pretrain_vs_nanogpt import NANOGPT

VOCAB, BATCH, T, C, HEADS = 107, 12, 64, 128, 4


def trainer() -> tuple[Trainer, WindowSampler]:
    if not trainer_lib.cpu_has_bf16():
        raise SystemExit("error: this CPU has no bf16 units (AVX512-BF16 or AMX): the Trainer "
                         "would run fp32, which is not what this measures")
    cfg = config.GPTPretrain(family="gpt", **NANOGPT)
    seed_everything(0)
    model = gpt_lib.GPT(gpt_lib.GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=4,
                                          n_head=HEADS, n_embd=C))
    tr = Trainer(model, cfg, cfg.max_steps)
    ids = np.random.default_rng(0).integers(0, VOCAB, 1_000_000).astype(np.uint16)
    return tr, WindowSampler(ids, T, BATCH, 0, tr.device)


def phases(tr: Trainer, sampler: WindowSampler, steps: int) -> dict[str, float]:
    clock = time.perf_counter
    names = ["batch", "forward", "backward", "grads to master + clip", "AdamW", "weights to bf16"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps + 20):
        stamps = [clock()]
        batch = sampler()
        stamps.append(clock())
        loss = lm_loss(tr.step_fn_model, batch)
        stamps.append(clock())
        loss.backward()
        stamps.append(clock())
        if not tr._grads_to_master():
            raise SystemExit("error: a parameter had no gradient; the flat path was not taken")
        stamps.append(clock())
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        stamps.append(clock())
        tr._sync_compute(buffers_back=True)
        stamps.append(clock())
        if i >= 20:
            for name, a, b in zip(names, stamps, stamps[1:], strict=False):
                times[name].append((b - a) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def per_tensor(tr: Trainer) -> None:
    """The cast and clip before the flat buffer: one `.float()` per gradient, torch's clip."""
    for master, low in tr.pairs:
        master.grad, low.grad = low.grad.float(), None
    torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.cfg.grad_clip)


def cast_and_clip(tr: Trainer, sampler: WindowSampler, steps: int) -> dict[str, float]:
    ways: dict[str, Callable[[], object]] = {"flat buffer (Trainer)": tr._grads_to_master,
                                             "per tensor, clip_grad_norm_": lambda: per_tensor(tr)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(steps + 10):
        for name, way in ways.items():
            lm_loss(tr.step_fn_model, sampler()).backward()
            start = time.perf_counter()
            way()
            if i >= 10:
                times[name].append((time.perf_counter() - start) * 1e3)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            tr._sync_compute(buffers_back=True)
    return {k: statistics.median(v) for k, v in times.items()}


def attention(reps: int = 100, rounds: int = 5) -> dict[str, float]:
    hs = C // HEADS
    qkv = torch.randn(BATCH, T, 3 * C, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(BATCH, T, C, dtype=torch.bfloat16)
    mask = torch.ones(T, T, dtype=torch.bool).tril()

    def heads() -> list[torch.Tensor]:
        return [a.view(BATCH, T, HEADS, hs).transpose(1, 2) for a in qkv.split(C, dim=2)]

    def run(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        y = attend(*heads())
        y.transpose(1, 2).contiguous().view(BATCH, T, C).backward(grad)

    def products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = (q @ k.transpose(-2, -1)) * hs ** -0.5
        return att.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v

    kernels = {
        "fp32 flash, casts around it (the model's)": lambda q, k, v: F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True).to(q.dtype),
        "bf16 flash": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "bf16 math kernel": lambda q, k, v: torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, is_causal=True)[0],
        "bf16 products, fp32 softmax": products,
    }
    times: dict[str, list[float]] = {k: [] for k in kernels}
    for r in range(rounds + 1):
        for name, kernel in kernels.items():
            start = time.perf_counter()
            for _ in range(reps // 5 if r == 0 else reps):
                run(kernel)
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - start) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="timed steps per measurement")
    args = ap.parse_args()
    if args.steps < 10:
        print("error: --steps must be at least 10", file=sys.stderr)
        return 2
    tr, sampler = trainer()
    print(f"### The bf16-master step of the baby GPT ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/bf16_step.py {' '.join(sys.argv[1:])}` "
          f"(commit {commit()})  ")
    print(f"Machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}; batch {BATCH} x {T} tokens, 4 layers x {HEADS} "
          f"heads x {C}\n")
    p = phases(tr, sampler, args.steps)
    print("| " + " | ".join(p) + " | step, ms | tokens/s |")
    print("|" + "---:|" * (len(p) + 2))
    total = sum(p.values())
    print("| " + " | ".join(f"{v:.2f}" for v in p.values())
          + f" | {total:.2f} | {BATCH * T / total * 1e3:,.0f} |")
    print("\n| gradients into the master, with the clip | ms (median) |")
    print("|---|---:|")
    for name, ms in cast_and_clip(tr, sampler, args.steps).items():
        print(f"| {name} | {ms:.3f} |")
    print("\n| one attention layer, forward + backward | ms (median of 5 rounds) |")
    print("|---|---:|")
    for name, ms in attention(reps=max(10, args.steps // 3)).items():
        print(f"| {name} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
