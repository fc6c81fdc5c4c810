"""bigmodel's pretraining against nanoGPT's CPU "baby GPT" reference, on the same text.

    python benchmarks/pretrain_vs_nanogpt.py [--data FILE] [--mode config|time] [options]

--mode config  nanoGPT's config exactly (character level, n_layer 4, n_head 4, n_embd 128,
               block 64, batch 12, dropout 0, AdamW lr 1e-3 cosine to 1e-4 over 2000 iters,
               warmup 100, betas 0.9/0.99, weight decay 0.1, clip 1.0, eval every 250 iters on
               20 batches) trained by bigmodel's Trainer and GPT: compare tokens/s and val loss.
--mode time    bigmodel's chosen settings for the same wall time as the reference (--seconds):
               compare val bits per byte at equal time.

Data as nanoGPT's shakespeare_char prepares it: first 90% of characters train, last 10% val.
The character vocabulary comes from the train part (bigmodel's `char` tokenizer; unseen
characters map to <|unk|>). Prints a markdown block: tokens/s (median over log intervals, and
overall; a log interval's figure counts training time only), its 10th and 90th percentiles
over the log intervals (the host's load shows as a second, slower band), wall time including
evaluation, val loss (nats/char) as nanoGPT estimates it (20
random batches) and over the whole val split, val bits per byte, peak RSS.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bigmodel import config
from bigmodel.errors import BigModelError
from bigmodel.tasks.clm import window_loss
from bigmodel.models import gpt as gpt_lib
from bigmodel.text.tokenizers import train_char
from bigmodel.objectives.clm import WindowSampler, lm_loss
from bigmodel.train.trainer import Trainer, seed_everything
from machine import commit, cpu_model

REFERENCE = {  # ../shared/data/README.md: nanoGPT, 2 cores, torch 2.13.0 CPU, quiet machine, twice
    "wall_s": (93.9, 95.7), "tokens_per_s": 16_500, "val_loss": 1.7565, "val_bpb": 2.500,
}
BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, lr=1e-3,
            min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
            max_steps=2000, eval_interval=250, eval_batches=20, log_interval=10, device="cpu")


def load(path: Path) -> tuple[np.ndarray, np.ndarray, float, int]:
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    tok = train_char(iter([train_text]))

    def encode(s: str, chunk: int = 1 << 16) -> np.ndarray:  # in chunks: an Encoding is heavy
        return np.concatenate([
            np.asarray(e.ids, dtype=np.uint16)
            for e in tok.encode_batch([s[i:i + chunk] for i in range(0, len(s), chunk)],
                                      add_special_tokens=False)])

    val = encode(val_text)
    return encode(train_text), val, len(val_text.encode("utf-8")) / len(val), tok.get_vocab_size()


def train(cfg: config.GPTPretrain, train_ids: np.ndarray, val_ids: np.ndarray, vocab: int,
          seed: int, eval_every: int) -> dict[str, float]:
    seed_everything(seed)
    gcfg = gpt_lib.GPTConfig(vocab_size=vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    model = gpt_lib.GPT(gcfg)
    trainer = Trainer(model, cfg, cfg.max_steps)
    sampler = WindowSampler(train_ids, cfg.block_size, cfg.batch_size, seed, trainer.device)
    val_sampler = WindowSampler(val_ids, cfg.block_size, cfg.batch_size, seed + 1, trainer.device)
    train_est = WindowSampler(train_ids, cfg.block_size, cfg.batch_size, seed + 2, trainer.device)

    def evaluate() -> dict[str, float]:  # nanoGPT's estimate_loss: 20 random batches per split
        out = {}
        for name, s in (("train", train_est), ("val", val_sampler)):
            out[f"est_{name}_loss"] = torch.stack(
                [lm_loss(model, s()) for _ in range(cfg.eval_batches)]).mean().item()
        return out

    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    result = trainer.fit(sampler, lm_loss, evaluate=evaluate, eval_interval=eval_every,
                         log=lambda row, step: rows.append({**row, "step": step}),
                         log_interval=cfg.log_interval,
                         tokens_per_step=cfg.batch_size * cfg.block_size * cfg.grad_accum,
                         progress=False)
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        full_val = window_loss(model, val_ids, cfg.block_size, 64)
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    deciles = statistics.quantiles(rates, n=10)
    return {"steps": result.step, "wall_s": wall, "median_tokens_per_s": statistics.median(rates),
            "p10_tokens_per_s": deciles[0], "p90_tokens_per_s": deciles[-1],
            "overall_tokens_per_s": result.tokens_per_s, "est_val_loss": result.eval_metrics["est_val_loss"],
            "full_val_loss": full_val, "params": model.num_params()}


def main() -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=here.parents[1] / "shared/data/war_and_peace.txt")
    ap.add_argument("--mode", choices=["config", "time"], default="config")
    ap.add_argument("--seconds", type=float, default=sum(REFERENCE["wall_s"]) / 2,
                    help="time budget for --mode time (default: the reference's mean wall time)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change one training setting, e.g. --set lr=2e-3 (repeatable)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"error: {args.data}: not found (pass --data FILE)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = dict(BABY)
    for item in args.overrides:
        key, _, value = item.partition("=")
        raw[key] = yaml.safe_load(value)
    try:  # the same one-line errors as params.yaml gives
        config.validate({"pretrain": {"gpt": {"family": "gpt", **raw}}, "finetune": {}})
    except BigModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_ids, val_ids, bytes_per_char, vocab = load(args.data)
    if args.mode == "time":
        raw.update(max_steps=calibrate_steps(raw, args.seconds, args.seed, train_ids, vocab),
                   eval_interval=10**9)
    cfg = config.GPTPretrain(**raw)
    res = train(cfg, train_ids, val_ids, vocab, args.seed,
                cfg.eval_interval if args.mode == "config" else cfg.max_steps)
    bpb = lambda loss: loss / math.log(2) / bytes_per_char  # noqa: E731
    ref = REFERENCE
    print(f"### pretrain vs nanoGPT: --mode {args.mode} ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/pretrain_vs_nanogpt.py {' '.join(sys.argv[1:])}` "
          f"(commit {commit()})  ")
    print(f"Machine: {torch.get_num_threads()} torch threads, {cpu_model()}, torch "
          f"{torch.__version__}, Python {platform.python_version()}  ")
    print(f"Settings: {', '.join(f'{k}={v}' for k, v in raw.items())}  ")
    print(f"Data: {args.data.name}, {len(train_ids):,} train / {len(val_ids):,} val characters, "
          f"vocabulary {vocab}; {res['params']:,} parameters\n")
    print("| figure | bigmodel | nanoGPT reference | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| steps | {res['steps']} | 2000 | |")
    print(f"| tokens/s (median over log intervals) | {res['median_tokens_per_s']:,.0f} | "
          f"{ref['tokens_per_s']:,} | {res['median_tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
    print(f"| tokens/s, 10th / 90th percentile of log intervals | {res['p10_tokens_per_s']:,.0f} / "
          f"{res['p90_tokens_per_s']:,.0f} | | {res['p10_tokens_per_s'] / ref['tokens_per_s']:.2f}x / "
          f"{res['p90_tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
    print(f"| tokens/s (overall, incl. evaluation) | {res['overall_tokens_per_s']:,.0f} | | |")
    print(f"| wall time, s | {res['wall_s']:.1f} | {ref['wall_s'][0]}, {ref['wall_s'][1]} | "
          f"{res['wall_s'] / (sum(ref['wall_s']) / 2):.2f}x |")
    print(f"| val loss, 20 random batches (nats/char) | {res['est_val_loss']:.4f} | "
          f"{ref['val_loss']} | |")
    print(f"| val loss, whole val split (nats/char) | {res['full_val_loss']:.4f} | | |")
    print(f"| val bits per byte, 20 random batches (the reference's estimator) | "
          f"{bpb(res['est_val_loss']):.3f} | {ref['val_bpb']:.3f} | "
          f"{bpb(res['est_val_loss']) / ref['val_bpb']:.3f}x |")
    print(f"| val bits per byte, whole val split | {bpb(res['full_val_loss']):.3f} | | |")
    print(f"| peak RSS, MB | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} | "
          "≈ 370 | |")
    return 0


def calibrate_steps(raw: dict, seconds: float, seed: int, train_ids: np.ndarray, vocab: int) -> int:
    """Steps that fit the time budget: time 60 steps of this config (after 10 warm-up steps)."""
    probe = config.GPTPretrain(**{**raw, "max_steps": 70, "eval_interval": 10**9, "log_interval": 10})
    seed_everything(seed)
    model = gpt_lib.GPT(gpt_lib.GPTConfig(vocab_size=vocab, block_size=probe.block_size,
                                          n_layer=probe.n_layer, n_head=probe.n_head,
                                          n_embd=probe.n_embd, dropout=probe.dropout))
    trainer = Trainer(model, probe, probe.max_steps)
    sampler = WindowSampler(train_ids, probe.block_size, probe.batch_size, seed, trainer.device)
    stamps: list[float] = []
    trainer.fit(sampler, lm_loss, evaluate=dict, eval_interval=10**9,
                log=lambda row, step: stamps.append(time.perf_counter()), log_interval=10,
                tokens_per_step=1)
    per_step = (stamps[-1] - stamps[0]) / 60
    overhead = 8.0  # final evaluation over the whole val split and setup, measured: about 5-8 s
    return max(100, int((seconds - overhead) / per_step))


if __name__ == "__main__":
    sys.exit(main())
