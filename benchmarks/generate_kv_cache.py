"""Greedy generation speed with and without the KV cache (bigmodel/generate.py).

A GPT of the default CPU pretrain shape (4 layers, 4 heads, 128 wide, 4096 tokens) with random,
seeded weights and a block_size of 1024, so that 16 prompt + 512 new tokens stay inside one
block. For 1 torch thread and for torch's default count: a warm-up run each way, then RUNS timed
runs each way (alternating, so that a busy neighbour slows both alike); checks the two outputs
are identical and prints a markdown table. Single-token steps are tiny, so on a shared machine
a second intra-op thread that has to wait for a core can cost more than it gives.

    .venv/bin/python benchmarks/generate_kv_cache.py | tee benchmarks/generate_kv_cache.txt
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigmodel.tasks.clm import sample  # noqa: E402
from bigmodel.models.gpt import GPT, GPTConfig  # noqa: E402
from machine import commit, cpu_model  # noqa: E402

CFG = GPTConfig(vocab_size=4096, block_size=1024, n_layer=4, n_head=4, n_embd=128)
PROMPT_TOKENS, NEW_TOKENS, RUNS = 16, 512, 3


def main() -> None:
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, PROMPT_TOKENS))
    default_threads = torch.get_num_threads()
    print(f"## Greedy generation, KV cache vs none ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `.venv/bin/python benchmarks/generate_kv_cache.py` (on commit {commit()})\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, torch {torch.__version__}, "
          f"Python {platform.python_version()}; load average before the runs "
          f"{os.getloadavg()[0]:.1f}\n")
    print(f"Model: n_layer={CFG.n_layer}, n_head={CFG.n_head}, n_embd={CFG.n_embd}, "
          f"vocab={CFG.vocab_size}, block_size={CFG.block_size}, random weights (seed 0), "
          f"{model.num_params():,} parameters; {PROMPT_TOKENS}-token prompt, "
          f"{NEW_TOKENS} new tokens, greedy.\n")
    print("| torch threads | path | median s | tokens/s | min–max s | speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    same = True
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        outputs, seconds = time_both(model, prompt)
        same = same and torch.equal(outputs[True], outputs[False])
        median = {c: statistics.median(seconds[c]) for c in seconds}
        for use_cache, name in ((False, "no cache (rerun on the whole text)"),
                                (True, "KV cache (prefill, then 1 token/step)")):
            s = median[use_cache]
            print(f"| {threads} | {name} | {s:.3f} | {NEW_TOKENS / s:,.0f} | "
                  f"{min(seconds[use_cache]):.3f}–{max(seconds[use_cache]):.3f} | "
                  f"{median[False] / s:.1f}× |")
    print(f"\nOne warm-up, then {RUNS} timed runs each way, alternating. Outputs identical with "
          f"and without the cache: {'yes' if same else 'NO'}. Load average after the runs "
          f"{os.getloadavg()[0]:.1f}.")
    if not same:
        sys.exit(1)


def time_both(model: GPT, prompt: torch.Tensor
              ) -> tuple[dict[bool, torch.Tensor], dict[bool, list[float]]]:
    """Greedy outputs, and seconds per timed run, with (True) and without (False) the cache."""
    def generate(use_cache: bool) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = sample(model, prompt, NEW_TOKENS, temperature=0, use_cache=use_cache)
        return out, time.perf_counter() - start

    outputs = {c: generate(c)[0] for c in (True, False)}  # warm-up
    assert outputs[True].shape == (1, PROMPT_TOKENS + NEW_TOKENS)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(RUNS):
        for use_cache in (True, False):
            out, s = generate(use_cache)
            assert torch.equal(out, outputs[use_cache]), "generation is not deterministic"
            seconds[use_cache].append(s)
    return outputs, seconds


if __name__ == "__main__":
    main()
