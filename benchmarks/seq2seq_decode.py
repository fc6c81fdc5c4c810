"""Decoding a trained seq2seq model on its test pairs: greedy with and without the KV cache
(same outputs, different time), and beam search with GNMT's length and coverage penalties,
each scored by sacreBLEU against the references.

    python benchmarks/seq2seq_decode.py [--root PROJECT] [--name RUN] [--pairs N] [--split S]
                                        [--grid ALPHAS:BETAS]

PROJECT is a folder where `pretrain@RUN` and `tokenize@RUN` have run (default: this repo).
Prints one markdown table: seconds, pairs per second, BLEU and chrF per decoding. `--grid
0.6,1.0:0,0.2` adds beam search at every (length penalty α, coverage penalty β) pair: choose
them on `--split val`, not on the test split that reports them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import commit, cpu_model  # noqa: E402

from bigmodel import config  # noqa: E402
from bigmodel.tasks import seq2seq as task  # noqa: E402
from bigmodel.text import shards  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO)
    ap.add_argument("--name", default="seq2seq")
    ap.add_argument("--pairs", type=int, default=0, help="first N pairs (0: all)")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--grid", default="", help="ALPHAS:BETAS, comma-separated")
    args = ap.parse_args()
    params = config.load(args.root / "params.yaml")
    spec = params.pretrain[args.name]
    translator = task.Translator(params.path("pretrain", args.name))
    model, tok = translator.model, translator.tok
    test = shards.load_pairs(params.path("tokens", args.name), args.split)
    n = args.pairs or len(test)
    sources, references = task.decode_split(tok, test)
    sources, references = sources[:n], references[:n]
    rows = np.arange(n)
    cfg = model.cfg
    batch = params.evaluate.batch_size

    def run(decode) -> tuple[float, list[str]]:  # noqa: ANN001
        out: list[list[int]] = []
        start = time.perf_counter()
        for i in range(0, n, batch):
            src, lengths = task.pad_rows([test.source(j)[:cfg.block_size] for j in rows[i:i + batch]],
                                         cfg.pad_id)
            limit = task.max_lengths(lengths, spec.max_len_a, spec.max_len_b, cfg.block_size)
            out += decode(src, lengths, limit)
        return time.perf_counter() - start, tok.decode_batch(out, skip_special_tokens=True)

    torch.set_num_threads(os.cpu_count() or 1)
    greedy = ("greedy, KV cache", run(lambda s, l, m: task.greedy(model, s, l, m, cache=True)))
    if args.grid:  # greedy against beam search at every (α, β) of the grid
        alphas, betas = ([float(v) for v in part.split(",")] for part in args.grid.split(":"))
        results = [greedy] + [
            (f"beam {spec.beam_size}, α {alpha}, β {beta}", run(
                lambda s, l, m, a=alpha, b=beta: task.beam_search(model, s, l, spec.beam_size,
                                                                  a, m, b)))
            for alpha in alphas for beta in betas]
        same = "not run"
    else:
        results = [
            greedy,
            ("greedy, no cache", run(lambda s, l, m: task.greedy(model, s, l, m, cache=False))),
            (f"beam {spec.beam_size}, α {spec.length_penalty}, no coverage penalty",
             run(lambda s, l, m: task.beam_search(model, s, l, spec.beam_size,
                                                  spec.length_penalty, m))),
            (f"beam {spec.beam_size}, α {spec.length_penalty}, β {spec.coverage_penalty}",
             run(lambda s, l, m: task.beam_search(model, s, l, spec.beam_size,
                                                  spec.length_penalty, m,
                                                  spec.coverage_penalty))),
        ]
        same = results[0][1][1] == results[1][1][1]
    print(f"### seq2seq decoding on {n} {args.split} pairs ({time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}; commit {commit()}; run `{args.name}`; "
          f"greedy outputs identical with and without the cache: {same}\n")
    print("| decoding | seconds | pairs/s | BLEU | chrF |")
    print("|---|---:|---:|---:|---:|")
    for label, (seconds, outputs) in results:
        s = task.scores(outputs, references)
        print(f"| {label} | {seconds:.1f} | {n / seconds:.1f} | {s['bleu']:.2f} | {s['chrf']:.2f} |")
    print(f"\nsacreBLEU: `{task.scores(results[0][1][1], references)['bleu_signature']}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
