"""bigmodel's pretraining against nanoGPT, both run here, alternating, on the same text.

    python benchmarks/pretrain_vs_nanogpt.py [--data FILE] [--rounds N] [--peer DIR]
        [--set KEY=VALUE ...] [--time-set KEY=VALUE ...]

Each round runs three processes, one after another, on this machine:

1. nanoGPT's CPU "baby GPT" through PEER/run_nanogpt.sh (character level, n_layer 4, n_head 4,
   n_embd 128, block 64, batch 12, dropout 0, AdamW lr 1e-3 cosine to 1e-4 over 2000 iters,
   warmup 100, betas 0.9/0.99, weight decay 0.1, clip 1.0, 20 eval batches every 250 iters);
2. bigmodel's Trainer and GPT at that config (`same config`, `--set` changes one setting of
   it, e.g. `--set precision=fp32`);
3. bigmodel with its own settings (SAME_TIME, `--time-set` changes them) for the wall time
   nanoGPT took in this round (`same time`).

Data as nanoGPT's shakespeare_char prepares it: the first 90% of characters train, the last
10% are val; bigmodel's `char` tokenizer is trained on the train part (an unseen character is
<|unk|>) and the token ids are written once, before the rounds, as nanoGPT's prepare step does.

Figures, per process: tokens/s (the median over log intervals of 10 iterations; bigmodel's
leave evaluation out, nanoGPT's median skips the intervals that hold one), wall time from the
process's start to the end of its last evaluation, val loss by nanoGPT's estimator (20 random
val batches; bigmodel's also over the whole val split, after the clock stops), val bits per
byte, peak RSS of the training process (nanoGPT's from GNU time, bigmodel's from wait4). The
ratio is given round by round: the machine's speed drifts between runs, so no figure is ever
divided by one from another run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import ROOT, commit, cpu_model

NANOGPT = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
               lr=1e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1,
               grad_clip=1.0, max_steps=2000, eval_interval=250, eval_batches=20,
               log_interval=10, device="cpu", precision="bf16")
# bigmodel's settings for the same wall time: nanoGPT's shape, a higher learning rate; the
# step count follows the measured speed (re-planned at every log interval)
SAME_TIME = dict(NANOGPT, lr=3e-3, min_lr=3e-4, eval_interval=10**9)
RESULT = "RESULT "


# --- the driver ---------------------------------------------------------------------------

def prepare(text_file: Path, into: Path) -> dict[str, float]:
    """Write train.npy / val.npy (uint16 token ids) and return the split's facts."""
    from bigmodel.text.tokenizers import train_char

    text = text_file.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    tok = train_char(iter([train_text]))
    for name, part in (("train", train_text), ("val", val_text)):
        chunks = [part[i:i + (1 << 16)] for i in range(0, len(part), 1 << 16)]
        ids = [np.asarray(e.ids, dtype=np.uint16)  # a few chunks at a time: an Encoding is heavy
               for j in range(0, len(chunks), 8)
               for e in tok.encode_batch(chunks[j:j + 8], add_special_tokens=False)]
        np.save(into / f"{name}.npy", np.concatenate(ids))
    return {"vocab": tok.get_vocab_size(), "train_chars": len(train_text),
            "val_chars": len(val_text), "val_bytes_per_char": len(val_text.encode()) / len(val_text)}


def child(cmd: list[str]) -> tuple[str, float, float]:
    """Run cmd; (its output, seconds from start to exit, its peak RSS in MB)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[:3])} ... exited {proc.returncode}:\n{out[-2000:]}")
    return out, time.time() - start, usage.ru_maxrss / 1024


def run_peer(script: Path, text_file: Path) -> dict[str, float]:
    out, _, _ = child(["bash", str(script), str(text_file), sys.executable])
    line = next((ln for ln in out.splitlines() if ln.startswith("nanogpt ")), None)
    if line is None:
        sys.exit(f"error: {script} printed no figures:\n{out[-2000:]}")
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}


def run_ours(mode: str, prepared: Path, overrides: list[str], seconds: float = 0.0
             ) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode,
           "--prepared", str(prepared), "--started", repr(time.time()), "--seconds", str(seconds)]
    for item in overrides:
        cmd += ["--set", item]
    out, _, rss = child(cmd)
    line = next(ln for ln in out.splitlines() if ln.startswith(RESULT))
    return {**json.loads(line[len(RESULT):]), "peak_rss_mb": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/war_and_peace.txt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer", type=Path, default=ROOT.parent / "shared/peers",
                    help="the folder holding run_nanogpt.sh and nanogpt/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change one setting of bigmodel's same-config run (repeatable)")
    ap.add_argument("--time-set", dest="time_overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="change one setting of the same-time run")
    ap.add_argument("--no-time", action="store_true", help="leave the same-time runs out")
    ap.add_argument("--worker", choices=["config", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--started", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    script = args.peer / "run_nanogpt.sh"
    if not script.is_file():
        print(f"error: the nanoGPT peer is not at {script}: this benchmark runs it beside "
              f"bigmodel (pass --peer DIR, the folder holding run_nanogpt.sh)", file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"error: {args.data}: not found (pass --data FILE)", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    bad = check_settings([NANOGPT, *args.overrides], [SAME_TIME, *args.time_overrides])
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bigmodel-vs-nanogpt-") as tmp:
        facts = prepare(args.data, Path(tmp))
        rounds = []
        for r in range(1, args.rounds + 1):
            peer = run_peer(script, args.data)
            print(f"round {r}: nanoGPT {peer}", file=sys.stderr, flush=True)
            same = run_ours("config", Path(tmp), args.overrides)
            print(f"round {r}: bigmodel same config {same}", file=sys.stderr, flush=True)
            timed = None
            if not args.no_time:
                timed = run_ours("time", Path(tmp), args.time_overrides, peer["wall_s"])
                print(f"round {r}: bigmodel same time {timed}", file=sys.stderr, flush=True)
            rounds.append((peer, same, timed))
    report(args, facts, rounds)
    return 0


def check_settings(*runs: list) -> str | None:
    from bigmodel import config
    from bigmodel.errors import BigModelError

    for base, *items in runs:
        try:
            config.validate({"pretrain": {"gpt": {"family": "gpt", **settings(base, items)}},
                             "finetune": {}})
        except BigModelError as e:
            return str(e)
    return None


def settings(base: dict, items: list[str]) -> dict:
    import yaml

    raw = dict(base)
    for item in items:
        key, _, value = item.partition("=")
        raw[key] = yaml.safe_load(value)
    return raw


def report(args: argparse.Namespace, facts: dict, rounds: list) -> None:
    import torch

    bpc = facts["val_bytes_per_char"]
    bpb = lambda nats: nats / math.log(2) / bpc  # noqa: E731
    print(f"### pretrain vs nanoGPT, alternating in one run ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/pretrain_vs_nanogpt.py {' '.join(sys.argv[1:])}` "
          f"(commit {commit()})  ")
    print(f"Machine: {os.cpu_count()} CPUs, {cpu_model()}, torch {torch.__version__}, "
          f"Python {platform.python_version()}; both run by the same Python  ")
    print(f"Data: {args.data.name}, {facts['train_chars']:,} train / {facts['val_chars']:,} "
          f"val characters, bigmodel's vocabulary {facts['vocab']}  ")
    print(f"bigmodel, same config: {', '.join(f'{k}={v}' for k, v in settings(NANOGPT, args.overrides).items())}  ")
    if not args.no_time:
        print(f"bigmodel, same time: {', '.join(f'{k}={v}' for k, v in settings(SAME_TIME, args.time_overrides).items() if k != 'max_steps')}")
    print("\nSame config, 2,000 iterations:\n")
    print("| round | tokens/s nanoGPT | tokens/s bigmodel | ratio | wall s nanoGPT | wall s "
          "bigmodel | ratio | val loss nanoGPT | val loss bigmodel | peak RSS MB nanoGPT | "
          "peak RSS MB bigmodel | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, (peer, same, _) in enumerate(rounds, 1):
        print(f"| {r} | {peer['tokens_per_s']:,.0f} | {same['tokens_per_s']:,.0f} | "
              f"**{same['tokens_per_s'] / peer['tokens_per_s']:.2f}x** | {peer['wall_s']:.1f} | "
              f"{same['wall_s']:.1f} | {same['wall_s'] / peer['wall_s']:.2f}x | "
              f"{peer['val_loss']:.4f} | {same['est_val_loss']:.4f} | {peer['peak_rss_mb']:.0f} | "
              f"{same['peak_rss_mb']:.0f} | {same['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x |")
    if args.no_time:
        return
    print("\nSame wall time (bigmodel's budget: nanoGPT's wall time in that round):\n")
    print("| round | wall s nanoGPT | wall s bigmodel | steps bigmodel | val bpb nanoGPT | "
          "val bpb bigmodel | ratio | bigmodel, whole val split |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, (peer, _, timed) in enumerate(rounds, 1):
        print(f"| {r} | {peer['wall_s']:.1f} | {timed['wall_s']:.1f} | {timed['steps']} | "
              f"{bpb(peer['val_loss']):.3f} | {bpb(timed['est_val_loss']):.3f} | "
              f"**{bpb(timed['est_val_loss']) / bpb(peer['val_loss']):.3f}x** | "
              f"{bpb(timed['full_val_loss']):.3f} |")
    print("\nval loss: nats per character, nanoGPT's estimator (20 random val batches) for both; "
          "bits per byte (bpb) divide it by ln 2 and by the val text's "
          f"{bpc:.4f} bytes per character.")


# --- one bigmodel run, in its own process -------------------------------------------------

def worker(args: argparse.Namespace) -> int:
    """Train on the prepared ids, print one RESULT line. Imports only what training needs."""
    import torch

    from bigmodel import config
    from bigmodel.models import gpt as gpt_lib
    from bigmodel.objectives.clm import WindowSampler, lm_loss, window_loss
    from bigmodel.train.trainer import Trainer, seed_everything

    seed = 1337
    train_ids = np.load(args.prepared / "train.npy", mmap_mode="r")
    val_ids = np.load(args.prepared / "val.npy", mmap_mode="r")
    vocab = int(max(train_ids.max(), val_ids.max())) + 1
    raw = settings(NANOGPT if args.worker == "config" else SAME_TIME, args.overrides)
    cfg = config.GPTPretrain(family="gpt", **raw)
    seed_everything(seed)
    model = gpt_lib.GPT(gpt_lib.GPTConfig(vocab_size=vocab, block_size=cfg.block_size,
                                          n_layer=cfg.n_layer, n_head=cfg.n_head,
                                          n_embd=cfg.n_embd, dropout=cfg.dropout))
    trainer = Trainer(model, cfg, cfg.max_steps)
    sampler = WindowSampler(train_ids, cfg.block_size, cfg.batch_size, seed, trainer.device)
    val_sampler = WindowSampler(val_ids, cfg.block_size, cfg.batch_size, seed + 1, trainer.device)

    def evaluate() -> dict[str, float]:  # nanoGPT's estimate_loss, on the val split
        return {"est_val_loss": torch.stack(
            [lm_loss(model, val_sampler()) for _ in range(cfg.eval_batches)]).mean().item()}

    rates: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.block_size

    def log(row: dict[str, float], step: int) -> None:
        if "tokens_per_s" not in row:
            return
        rates.append(row["tokens_per_s"])
        if args.worker == "time" and 30 <= step < trainer.max_steps:
            # The run's length, re-planned at every log interval from the speed of the last
            # ones: the host's speed drifts within a run. The cosine decay follows the new end
            # (during the warm-up the learning rate does not depend on it). A step planned
            # as the last stays the last.
            per_step = tokens_per_step / statistics.median(rates[-10:])
            left = args.seconds - (time.time() - args.started) - 1.5  # final estimate, exit
            trainer.max_steps = max(step + 1, step + int(left / per_step))

    result = trainer.fit(sampler, lm_loss, evaluate=evaluate, eval_interval=cfg.eval_interval,
                         log=log, log_interval=cfg.log_interval,
                         tokens_per_step=cfg.batch_size * cfg.block_size, progress=False)
    wall = time.time() - args.started
    model.eval()
    with torch.no_grad():
        full_val = window_loss(model, val_ids, cfg.block_size, cfg.batch_size)
    print(RESULT + json.dumps({
        "steps": result.step, "wall_s": wall, "tokens_per_s": statistics.median(rates),
        "est_val_loss": result.eval_metrics["est_val_loss"], "full_val_loss": full_val,
        "precision": trainer.precision}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
