"""One AdamW step on the CPU for the baby GPT's parameters: the per-parameter loop (torch's CPU
default), `foreach`, and `fused`, which the Trainer uses on every device.

    python benchmarks/optimizer_step.py [--threads N]

Prints a markdown table: the median over 7 rounds of 100 steps each, in ms per step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from bigmodel.models.gpt import GPT, GPTConfig
from machine import commit, cpu_model

BABY = GPTConfig(vocab_size=106, block_size=64, n_layer=4, n_head=4, n_embd=128)


def per_step_ms(kind: str, rounds: int = 7, steps: int = 100) -> float:
    torch.manual_seed(0)
    model = GPT(BABY)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), **flags[kind])
    for _ in range(20):
        opt.step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = GPT(BABY).num_params(non_embedding=False)
    print(f"### AdamW step on the CPU ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/optimizer_step.py {' '.join(sys.argv[1:])}` "
          f"(commit {commit()})  ")
    print(f"Machine: {torch.get_num_threads()} torch threads, {cpu_model()}, torch "
          f"{torch.__version__}, Python {platform.python_version()}; {n:,} parameters\n")
    print("| AdamW | ms per step |")
    print("|---|---:|")
    for kind in ("loop", "foreach", "fused"):
        print(f"| {kind} | {per_step_ms(kind):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
