"""The one training loop: device and precision, AdamW, warmup + cosine LR, gradient accumulation,
clipping, interval logging without per-step host syncs, and checkpoint / resume.

A stage hands `fit` a batch source, a loss function and an evaluation callback; everything about
*how* to optimise lives here, so every objective (causal LM, classification, ...) shares it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from bigmodel.config import Optim
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BigModelError("device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: Optim, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@dataclass
class FitResult:
    step: int
    train_loss: float
    eval_metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    seconds: float = 0.0


class Trainer:
    def __init__(self, model: nn.Module, cfg: Optim, max_steps: int):
        self.cfg, self.max_steps = cfg, max_steps
        self.device = pick_device(cfg.device)
        self.model = model.to(self.device)
        self.step_fn_model = torch.compile(model) if cfg.compile else model
        self.optimizer = self._optimizer()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        self.step = 0

    def _optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on matrices only; norms, biases (and nothing else 1-D) are not decayed.
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
            fused=self.device.type == "cuda",
        )

    def fit(
        self,
        next_batch: Callable[[], Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        *,
        evaluate: Callable[[], dict[str, float]],
        eval_interval: int,
        log: Callable[[dict[str, float], int], None],
        log_interval: int,
        tokens_per_step: int,
        flops_per_token: float | None = None,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_interval: int = 0,
    ) -> FitResult:
        """Train from self.step to max_steps. `next_batch` gives one micro-batch on the device."""
        model, cfg = self.step_fn_model, self.cfg
        peak = peak_flops(self.device)
        start = time.perf_counter()
        t_last, step_last = start, self.step
        running = torch.zeros((), device=self.device)  # summed on device: no sync per step
        train_loss = float("nan")
        metrics: dict[str, float] = {}
        self.model.train()
        while self.step < self.max_steps:
            lr = lr_at(self.step, cfg, self.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                batch = next_batch()
                with self.autocast:
                    loss = loss_fn(model, batch) / cfg.grad_accum
                loss.backward()
                running += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

            if self.step % log_interval == 0 or self.step == self.max_steps:
                n = self.step - step_last
                train_loss = running.item() / n  # the one host sync, at log intervals only
                if not math.isfinite(train_loss):
                    raise BigModelError(
                        f"training diverged: loss is {train_loss} at step {self.step} "
                        f"(lower the learning rate; the last good checkpoint is kept)"
                    )
                now = time.perf_counter()
                tok_s = n * tokens_per_step / (now - t_last)
                row = {"train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s}
                if peak and flops_per_token:
                    row["mfu"] = tok_s * flops_per_token / peak
                log(row, self.step)
                running.zero_()
                t_last, step_last = now, self.step
            if self.step % eval_interval == 0 or self.step == self.max_steps:
                metrics = self.run_eval(evaluate)
                if metrics:
                    log(metrics, self.step)
            if checkpoint and checkpoint_interval and (
                self.step % checkpoint_interval == 0 or self.step == self.max_steps
            ):
                checkpoint()
        seconds = time.perf_counter() - start
        return FitResult(self.step, train_loss, metrics, tokens_per_step * self.step / max(seconds, 1e-9),
                         seconds)

    def run_eval(self, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = evaluate()
        self.model.train()
        return metrics

    # --- checkpoints: safetensors weights, torch-saved optimizer/RNG (loaded weights_only) ---

    def save_checkpoint(self, directory: Path, extra_state: dict[str, Any]) -> None:
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_model(self.model, str(tmp / "model.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "extra_tensors": {k: v for k, v in extra_state.items() if torch.is_tensor(v)},
                },
                tmp / "trainer.pt",
            )
            plain = {k: v for k, v in extra_state.items() if not torch.is_tensor(v)}
            (tmp / "state.json").write_text(json.dumps({"step": self.step, **plain}, indent=2))

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        if not (directory / "state.json").is_file():
            raise BigModelError(f"{directory}: no checkpoint to resume from")
        load_model(self.model, str(directory / "model.safetensors"), device=str(self.device))
        blob = torch.load(directory / "trainer.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        state = json.loads((directory / "state.json").read_text())
        self.step = int(state.pop("step"))
        return {**state, **blob["extra_tensors"]}


class History:
    """Collects logged rows (for the DVC plot CSV) and forwards each to a sink (MLflow)."""

    def __init__(self, sink: Callable[[dict[str, float], int], None]):
        self.sink, self.rows = sink, []  # type: ignore[var-annotated]

    def __call__(self, values: dict[str, float], step: int) -> None:
        self.sink(values, step)
        self.rows.append({"step": step, **values})

    def write_csv(self, path: Path, columns: list[str]) -> None:
        import pandas as pd

        table = pd.DataFrame(self.rows)
        table = table.groupby("step", as_index=False).first()  # one row per step
        keep = ["step", *[c for c in columns if c in table]]
        with atomic_path(path) as tmp:
            table[keep].to_csv(tmp, index=False)
