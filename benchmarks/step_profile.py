"""Where one training step of the baby GPT goes on the CPU, and how close its matrix products
run to the machine's peak.

    python benchmarks/step_profile.py [--steps N]

Prints markdown: (1) the median time of each phase of a step (batch, forward, backward, clip,
AdamW) at 1 and 2 torch threads, timed with perf_counter around each phase (no profiler, whose
overhead distorts ops this small); (2) GFLOP/s of the step's matrix-product shapes in fp32 and
bf16 on one thread; (3) fp32 against bf16 autocast, whole steps, alternating in one process so
that both see the same host load.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from bigmodel.models.gpt import GPT, GPTConfig
from machine import commit, cpu_model

BABY = GPTConfig(vocab_size=106, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH = 12


def model_and_optimizer() -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(BABY)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)


def batch(data: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = rng.integers(0, len(data) - BABY.block_size - 1, BATCH)
    window = torch.from_numpy(data[starts[:, None] + np.arange(BABY.block_size + 1)].astype(np.int64))
    return window[:, :-1], window[:, 1:]


def step(model: GPT, opt: torch.optim.Optimizer, data: np.ndarray, rng: np.random.Generator,
         autocast: object = None) -> list[float]:
    """One training step; the perf_counter stamps between its phases."""
    stamps = [time.perf_counter()]
    x, y = batch(data, rng)
    stamps.append(time.perf_counter())
    with autocast or nullcontext():  # type: ignore[attr-defined]
        loss = model(x, y)[1]
    stamps.append(time.perf_counter())
    loss.backward()
    stamps.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    stamps.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
    return stamps


def phases(threads: int, steps: int, data: np.ndarray) -> dict[str, float]:
    torch.set_num_threads(threads)
    model, opt = model_and_optimizer()
    rng = np.random.default_rng(0)
    names = ["batch", "forward", "backward", "clip", "AdamW"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps + 20):
        stamps = step(model, opt, data, rng)
        if i >= 20:
            for name, a, b in zip(names, stamps, stamps[1:], strict=False):
                times[name].append((b - a) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 300) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(20):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def autocast_ab(steps: int, data: np.ndarray, rounds: int = 10) -> dict[str, float]:
    torch.set_num_threads(2)
    runs = {"fp32": (*model_and_optimizer(), None),
            "bf16 autocast": (*model_and_optimizer(), torch.autocast("cpu", dtype=torch.bfloat16))}
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):
        for name, (model, opt, autocast) in runs.items():
            start = time.perf_counter()
            for _ in range(steps // rounds):
                step(model, opt, data, rng, autocast)
            if r:  # the first round warms up
                times[name].append((time.perf_counter() - start) / (steps // rounds) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per setting")
    args = ap.parse_args()
    data = np.random.default_rng(1).integers(0, BABY.vocab_size, 1_000_000).astype(np.uint16)
    print(f"### One training step of the baby GPT on the CPU ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/step_profile.py {' '.join(sys.argv[1:])}` "
          f"(commit {commit()})  ")
    print(f"Machine: {cpu_model()}, torch {torch.__version__}, Python "
          f"{platform.python_version()}; batch {BATCH} x {BABY.block_size} tokens\n")
    print("| threads | batch | forward | backward | clip | AdamW | step, ms | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in (1, 2):
        p = phases(threads, args.steps, data)
        total = sum(p.values())
        print(f"| {threads} | " + " | ".join(f"{v:.2f}" for v in p.values())
              + f" | {total:.2f} | {BATCH * BABY.block_size / total * 1e3:,.0f} |")
    torch.set_num_threads(1)
    print("\n| matrix product (one thread) | fp32 GFLOP/s | bf16 GFLOP/s |")
    print("|---|---:|---:|")
    c, t = BABY.n_embd, BATCH * BABY.block_size
    for m, k, n in ((t, c, 4 * c), (t, 4 * c, c), (4 * c, t, c), (t, c, 3 * c)):
        print(f"| ({m} x {k}) @ ({k} x {n}) | {gemm_rate(m, k, n, torch.float32):.0f} | "
              f"{gemm_rate(m, k, n, torch.bfloat16):.0f} |")
    ab = autocast_ab(args.steps, data)
    print("\n| whole step, 2 threads, alternating | ms (median of rounds) |")
    print("|---|---:|")
    for name, ms in ab.items():
        print(f"| {name} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
