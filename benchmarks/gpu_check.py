"""The GPU path, measured: bigmodel's Trainer (bf16 autocast, fused AdamW, torch.compile, MFU)
on paper-sized shapes, with synthetic batches (the speed of the step, not of the data).

    python benchmarks/gpu_check.py [--steps 300] [--only gpt,bert,resnet] [--no-compile]
    python benchmarks/gpu_check.py --smoke     # tiny shapes on the CPU: the script itself works

- GPT-2 124M shape: 12 layers x 12 heads x 768, block 1024, vocabulary 50,304; tokens/s, MFU;
- BERT-base shape: 12 x 12 x 768, sequences of 128, vocabulary 30,522, 15% of positions
  (19 a row) predicted (the MLM objective's loss); steps/s, tokens/s, MFU;
- ResNet-50 at 224 x 224, channels-last, 1,000 classes; images/s, MFU.

Figures are medians over the log intervals after the first fifth of the steps (compilation
and warm-up left out). MFU is the Trainer's: achieved model FLOP/s over the device's dense
bf16 peak (bigmodel/train/trainer.py PEAK_FLOPS), from 6N + attention per token (PaLM
appendix B) for the transformers and 3 x the forward's FLOPs for the ResNet.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bigmodel.config import Optim
from bigmodel.models import bert as bert_lib
from bigmodel.models import gpt as gpt_lib
from bigmodel.models import resnet as resnet_lib
from bigmodel.objectives.clm import lm_loss
from bigmodel.objectives.mlm import IGNORE, mlm_loss
from bigmodel.train.trainer import Trainer, peak_flops
from machine import commit, cpu_model

FULL = {
    "gpt": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, batch=16),
    "bert": dict(vocab_size=30522, block_size=128, n_layer=12, n_head=12, n_embd=768, batch=128),
    "resnet": dict(preset="resnet50", image_size=224, batch=128),
}
SMOKE = {
    "gpt": dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, batch=2),
    "bert": dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, batch=2),
    "resnet": dict(preset="", image_size=16, batch=2),
}


def measure(name: str, model: torch.nn.Module, batch, loss_fn, units_per_step: int, unit: str,
            flops: float, args: argparse.Namespace) -> dict[str, float]:
    cfg = Optim(lr=3e-4, min_lr=3e-5, warmup_steps=max(1, args.steps // 10), device=args.device,
                precision="fp32" if args.smoke else "bf16", compile=args.compile)
    trainer = Trainer(model, cfg, args.steps, label=name)
    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    trainer.fit(lambda: batch(trainer.device), loss_fn, evaluate=dict, eval_interval=10**9,
                log=lambda row, step: rows.append({**row, "step": step}),
                log_interval=max(1, args.steps // 20), tokens_per_step=units_per_step,
                unit=unit, flops_per_token=flops, progress=False)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    kept = [r for r in rows if r["step"] > args.steps // 5] or rows
    rate = statistics.median(r[f"{unit}_per_s"] for r in kept)
    out = {"rate": rate, "steps_per_s": rate / units_per_step, "seconds": seconds,
           "loss": kept[-1]["train_loss"], "precision": trainer.precision}
    if "mfu" in kept[-1]:
        out["mfu"] = statistics.median(r["mfu"] for r in kept)
    if trainer.device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def gpt(shape: dict, args: argparse.Namespace) -> dict[str, float]:
    b, t, v = shape["batch"], shape["block_size"], shape["vocab_size"]
    model = gpt_lib.GPT(gpt_lib.GPTConfig(**{k: shape[k] for k in
                                             ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}))

    def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.randint(0, v, (b, t + 1), device=device)
        return window[:, :-1], window[:, 1:]

    return measure("gpt", model, batch, lm_loss, b * t, "tokens", model.flops_per_token(), args)


def bert(shape: dict, args: argparse.Namespace) -> dict[str, float]:
    b, t, v = shape["batch"], shape["block_size"], shape["vocab_size"]
    model = bert_lib.BERT(bert_lib.BERTConfig(dropout=0.1, **{k: shape[k] for k in
                                                           ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}))

    def batch(device: torch.device) -> dict[str, torch.Tensor]:
        idx = torch.randint(5, v, (b, t), device=device)
        # exactly round(15% of t) positions a row, as the MLM collator chooses them: a row (or a
        # tiny batch) drawn with none would make the mean loss over no positions NaN
        chosen = torch.rand(b, t, device=device).argsort(dim=1)[:, :max(1, round(0.15 * t))]
        labels = torch.full_like(idx, IGNORE).scatter(1, chosen, idx.gather(1, chosen))
        return {"idx": idx, "labels": labels, "lengths": torch.full((b,), t, device=device),
                "segments": torch.zeros_like(idx)}

    return measure("bert", model, batch, mlm_loss, b * t, "tokens", model.flops_per_token(), args)


def resnet(shape: dict, args: argparse.Namespace) -> dict[str, float]:
    b, side = shape["batch"], shape["image_size"]
    cfg = (resnet_lib.preset(shape["preset"], n_classes=1000, image_size=side) if shape["preset"]
           else resnet_lib.ResNetConfig(n_classes=10, layers=[1], width=4, stem="small",
                                        image_size=side))
    model = resnet_lib.ResNet(cfg)

    def batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(b, 3, side, side, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, cfg.n_classes, (b,), device=device)

    def loss(net: torch.nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(net(xy[0]).float(), xy[1])

    return measure("resnet", model, batch, loss, b, "images", model.flops_per_image(), args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", default="gpt,bert,resnet")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, no compile")
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    unknown = sorted(set(wanted) - set(FULL))
    if unknown or args.steps < 5:
        print(f"error: {'unknown --only ' + ', '.join(unknown) if unknown else '--steps must be at least 5'}"
              f" (have: {', '.join(FULL)})", file=sys.stderr)
        return 2
    if args.smoke:
        args.device, args.compile, shapes = "cpu", False, SMOKE
    elif not torch.cuda.is_available():
        print("error: no CUDA device (this check is for a GPU; --smoke runs it on the CPU)",
              file=sys.stderr)
        return 2
    else:
        args.device, shapes = "cuda", FULL
    device = (torch.cuda.get_device_name() if args.device == "cuda" else cpu_model())
    peak = peak_flops(torch.device(args.device))
    print(f"### GPU check ({time.strftime('%Y-%m-%d')})\n")
    print(f"Command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` (commit {commit()})  ")
    print(f"Device: {device} x {torch.cuda.device_count() if args.device == 'cuda' else 1}, peak "
          f"{f'{peak / 1e12:.0f} TFLOP/s bf16' if peak else 'unknown'}; torch {torch.__version__}, "
          f"Python {platform.python_version()}; compile {args.compile}, {args.steps} steps\n")
    print("| model | shape | batch | precision | rate | steps/s | MFU | peak memory GB | last loss |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for name in wanted:
        shape = shapes[name]
        r = {"gpt": gpt, "bert": bert, "resnet": resnet}[name](shape, args)
        unit = "images/s" if name == "resnet" else "tokens/s"
        desc = (shape["preset"] or "tiny") if name == "resnet" else (
            f"{shape['n_layer']}x{shape['n_head']}x{shape['n_embd']}, T={shape['block_size']}")
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–"
        mem = f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "–"
        print(f"| {name} | {desc} | {shape['batch']} | {r['precision']} | {r['rate']:,.0f} {unit} | "
              f"{r['steps_per_s']:.2f} | {mfu} | {mem} | {r['loss']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
