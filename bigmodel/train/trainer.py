"""The one training loop: device and precision, AdamW, warmup + cosine LR, gradient accumulation,
clipping, interval logging without per-step host syncs, DDP, and checkpoint / resume.

A stage hands `fit` a batch source, a loss function and an evaluation callback; everything about
*how* to optimise lives here, so every objective (causal LM, classification, ...) shares it.

A checkpoint is everything a resumed run needs to take exactly the steps the uninterrupted run
would have: weights, optimizer moments, the step (which fixes the LR schedule, a pure function
of it), the partly summed train loss of the current log window, every rank's torch / CUDA /
numpy / python RNG states, and what the stage adds (its data sampler's position). It is never
written after a non-finite loss or with non-finite weights, so the last good one survives a
divergence.
"""

from __future__ import annotations

import copy
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
from safetensors.torch import load_file, save_file

from bigmodel.config import Optim
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path
from bigmodel.train.distributed import World
from bigmodel.train.optim import EagerAdamW

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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without those units
    oneDNN emulates bf16, and bf16 training would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(choice: str, device: torch.device, distributed: bool) -> str:
    """What a run computes in: 'fp32', 'bf16-autocast' (CUDA: bf16 products over fp32
    weights) or 'bf16-master' (CPU: bf16 weights and activations, fp32 master weights)."""
    if device.type == "cuda":
        return "fp32" if choice == "fp32" else "bf16-autocast"
    if choice != "bf16":
        return "fp32"
    why = ("this CPU has no native bf16 units (AVX512-BF16 or AMX)" if not cpu_has_bf16()
           else "bf16 master weights run in one process only" if distributed else "")
    if why:
        print(f"precision: bf16 asked for, running fp32: {why}", flush=True)
        return "fp32"
    return "bf16-master"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types `torch.load(weights_only=True)` reads back."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    random.setstate(state["python"])


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


NO_STEP = 1 << 62  # "no step yet" for the first-non-finite-step marker


class Trainer:
    def __init__(self, model: nn.Module, cfg: Optim, max_steps: int, world: World | None = None,
                 parallel: str = "ddp", label: str = "train",
                 lr_scale: Callable[[str], float] | None = None):
        """`lr_scale(parameter name)` multiplies the scheduled LR of that parameter (a finetune's
        lower backbone LR); frozen parameters (requires_grad False) are left out."""
        self.cfg, self.max_steps, self.label = cfg, max_steps, label
        self.lr_scale = lr_scale or (lambda name: 1.0)
        self.world = world or World()
        self.device = self.world.device(pick_device(cfg.device))
        self.sharded = parallel == "fsdp" and self.world.distributed
        self.tied = tied_names(model)  # read before sharding replaces the parameters
        # What is saved, loaded and evaluated. FSDP moves each unit to the device as it shards
        # it, so the whole model never has to fit one device.
        self.model = model if self.sharded else model.to(self.device)
        if self.device.type == "cuda" and getattr(model, "channels_last", False):
            self.model = self.model.to(memory_format=torch.channels_last)  # conv nets: NHWC kernels
        self.precision = resolve_precision(cfg.precision, self.device, self.world.distributed)
        # What forward and backward run on. Under bf16-master: a bf16 copy of the model, whose
        # gradients are moved into the fp32 model (the master, which the optimizer updates and
        # which is saved and evaluated) and which takes the updated weights back after each step.
        # Measured on the baby GPT: bf16 products at twice fp32's rate, and none of autocast's
        # per-op casts (benchmarks/RESULTS.md).
        self.compute = self.model
        if self.precision == "bf16-master":
            self.compute = copy.deepcopy(self.model).to(torch.bfloat16)
            # float inputs (images) meet bf16 weights as bf16; token ids pass unchanged
            self.compute.register_forward_pre_hook(_bf16_inputs, with_kwargs=True)
        self.pairs = ([] if self.compute is self.model else  # (master, bf16) parameter pairs
                      list(zip(self.model.parameters(), self.compute.parameters(), strict=True)))
        # The trained pairs' fp32 gradients, in one flat buffer: a step's bf16 gradients arrive
        # there in one foreach copy, and the clipping norm is one dot product over it
        # (measured on the baby GPT: 0.77 against 1.21 ms a step for the cast and the clip).
        self.trained_pairs = [(m, c) for m, c in self.pairs if m.requires_grad]
        self.master_grads = torch.zeros(sum(m.numel() for m, _ in self.trained_pairs),
                                        device=self.device)
        sizes = [m.numel() for m, _ in self.trained_pairs]
        self.master_grad_views = [v.view_as(m) for v, (m, _) in
                                  zip(self.master_grads.split(sizes), self.trained_pairs, strict=True)]
        # DDP around it under torchrun, itself sharded in place under FSDP, else itself
        self.wrapped = self.world.wrap(self.compute, parallel, self.device)
        self.step_fn_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.optimizer = self._optimizer()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.precision == "bf16-autocast"
            else nullcontext()
        )
        self.step = 0
        # The train loss summed on the device since step `window_start` (the log window), and
        # the first step whose loss was not finite: kept on the device, read at intervals only.
        self.window_sum = torch.zeros((), device=self.device)
        self.window_start = 0
        self.bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=self.device)
        self.last_good: tuple[int, Path] | None = None  # (step, folder) of the last checkpoint
        # what the last log interval and evaluation reported: what a run resumed at its last
        # step (killed after its final checkpoint) reports without taking a step
        self.last_loss, self.last_eval = float("nan"), {}  # type: ignore[var-annotated]

    def _optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on matrices only; norms, biases (and nothing else 1-D) are not decayed.
        by_group: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                by_group.setdefault((p.dim() >= 2, self.lr_scale(name)), []).append(p)
        groups = [{"params": ps, "weight_decay": self.cfg.weight_decay if decay else 0.0,
                   "lr_scale": scale}
                  for (decay, scale), ps in sorted(by_group.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]
        if not groups:
            raise BigModelError(f"{self.label}: no parameter to train (all are frozen)")
        # Fused: one kernel for all parameters, on the CPU too (measured: 0.35 against 1.35 ms
        # a step for the baby GPT on 2 cores; benchmarks/RESULTS.md).
        # An eager single-process run steps it without importing torch's compiler (70 MB).
        adamw = (torch.optim.AdamW if self.cfg.compile or self.world.distributed
                 else EagerAdamW)
        return adamw(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), fused=True)

    def fit(
        self,
        next_batch: Callable[[], Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        *,
        evaluate: Callable[[], dict[str, float]],
        eval_interval: int,
        log: Callable[[dict[str, float], int], None],
        log_interval: int,
        tokens_per_step: int | Callable[[], int],
        unit: str = "tokens",
        flops_per_token: float | None = None,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_interval: int = 0,
        progress: bool = True,
    ) -> FitResult:
        """Train from self.step to max_steps. `next_batch` gives one micro-batch on the device
        (this rank's share of the global one under DDP). Every rank calls `log` and `checkpoint`;
        the stage decides what rank > 0 does with them. `tokens_per_step` counts all ranks, in
        `unit`s (tokens, examples), or is a counter of the units drawn so far when a step's
        varies (target tokens of seq2seq batches); rank 0 prints a progress line at every log
        interval."""
        cfg = self.cfg
        fixed = tokens_per_step
        count = fixed if callable(fixed) else (lambda: self.step * fixed)  # type: ignore[operator]
        peak = peak_flops(self.device)
        start = time.perf_counter()
        t_last, first_step = start, self.step
        units_last = units_first = count()
        train_loss = self.last_loss
        metrics: dict[str, float] = dict(self.last_eval)
        self.model.train()
        while self.step < self.max_steps:
            lr = lr_at(self.step, cfg, self.max_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            self._train_step(next_batch, loss_fn)

            last = self.step == self.max_steps
            due_log = self.step % log_interval == 0 or last
            due_checkpoint = bool(checkpoint and checkpoint_interval) and (
                self.step % checkpoint_interval == 0 or last)
            if due_log or due_checkpoint:
                # The one host sync, at intervals only; raises on a non-finite loss, and before
                # a checkpoint also on non-finite weights, so no bad checkpoint is ever written.
                window = self._check_finite(weights=due_checkpoint)
            if due_log:
                train_loss = self.last_loss = window / (self.step - self.window_start)
                now = time.perf_counter()
                units = count()
                tok_s = (units - units_last) / (now - t_last)
                row = {"train_loss": train_loss, "lr": lr, f"{unit}_per_s": tok_s}
                if peak and flops_per_token:
                    row["mfu"] = tok_s * flops_per_token / (peak * self.world.size)
                log(row, self.step)
                if progress and self.world.is_main:
                    self._progress(train_loss, tok_s, unit, now - start, self.step - first_step)
                self.window_sum.zero_()
                self.window_start = self.step
                t_last, units_last = now, units
            paused = time.perf_counter()
            if self.step % eval_interval == 0 or last:
                metrics = self.run_eval(evaluate)
                if metrics:
                    self.last_eval = dict(metrics)
                    log(metrics, self.step)
            if due_checkpoint:
                checkpoint()  # type: ignore[misc]
            t_last += time.perf_counter() - paused  # a log interval's tokens/s counts training only
        seconds = time.perf_counter() - start
        return FitResult(self.step, train_loss, metrics,
                         (count() - units_first) / max(seconds, 1e-9), seconds)

    def _progress(self, loss: float, rate: float, unit: str, elapsed: float, done: int) -> None:
        """One line a person watching the stage reads: step of total, loss, throughput, ETA."""
        left = elapsed / max(done, 1) * (self.max_steps - self.step)
        print(f"{self.label}: step {self.step}/{self.max_steps} "
              f"({100 * self.step / self.max_steps:.0f}%)  loss {loss:.4f}  "
              f"{rate:,.0f} {unit}/s  elapsed {_clock(elapsed)}  ETA {_clock(left)}", flush=True)

    def _train_step(self, next_batch: Callable[[], Any],
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        cfg = self.cfg
        for micro in range(cfg.grad_accum):
            # DDP / FSDP reduce gradients over the ranks on the last micro-step only
            with self.world.grad_sync(self.wrapped, sync=micro == cfg.grad_accum - 1):
                batch = next_batch()
                with self.autocast:
                    loss = loss_fn(self.step_fn_model, batch) / cfg.grad_accum
                loss.backward()
            self.window_sum += loss.detach()
        clipped = self._grads_to_master() if self.pairs else False
        if cfg.grad_clip > 0 and not clipped:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.pairs:
            self._sync_compute(buffers_back=True)
        self.step += 1
        # A non-finite sum stays non-finite until the window is read, so the smallest step at
        # which it was not finite is the first bad step (device-side: no sync).
        bad_now = torch.where(torch.isfinite(self.window_sum), NO_STEP, self.step)
        torch.minimum(self.bad_step, bad_now, out=self.bad_step)

    @torch.no_grad()
    def _grads_to_master(self) -> bool:
        """bf16-master: the step's gradients into the fp32 master's. True when they were also
        clipped: every trained parameter had a gradient, so the flat buffer holds them all."""
        lows = [c.grad for _, c in self.trained_pairs]
        if any(g is None for g in lows):  # one took no part: it gets none (AdamW skips it)
            for master, low in self.trained_pairs:
                master.grad = None if low.grad is None else low.grad.float()
                low.grad = None
            return False
        for (master, low), view in zip(self.trained_pairs, self.master_grad_views):
            master.grad, low.grad = view, None
        torch._foreach_copy_(self.master_grad_views, lows)
        if self.cfg.grad_clip > 0:  # clip_grad_norm_'s coefficient, over the one buffer
            flat = self.master_grads
            norm = torch.dot(flat, flat).sqrt()
            flat.mul_((self.cfg.grad_clip / (norm + 1e-6)).clamp_(max=1.0))
        return True

    @torch.no_grad()
    def _sync_compute(self, buffers_back: bool = False) -> None:
        """bf16-master: the master's weights into the bf16 copy. `buffers_back`: after a step,
        the buffers the copy updated while training (batch-norm statistics) into the master;
        otherwise (after a load) the master's buffers into the copy."""
        torch._foreach_copy_([c for _, c in self.pairs], [m for m, _ in self.pairs])
        for master, low in zip(self.model.buffers(), self.compute.buffers(), strict=True):
            if buffers_back:
                master.copy_(low)
            else:
                low.copy_(master)

    def _check_finite(self, weights: bool) -> float:
        """The train loss summed over this log window (mean over ranks), read with one host
        sync; a BigModelError naming the step if any rank saw a non-finite loss, or (`weights`)
        if a weight is not finite."""
        bad_weights = torch.zeros((), dtype=torch.bool, device=self.device)
        if weights:
            bad_weights = torch.stack(
                [~torch.isfinite(local(p)).all() for p in self.model.parameters()]).any()
        stats = torch.stack([self.window_sum.double(), self.bad_step.double(), bad_weights.double()])
        rows = self.world.gather(stats).tolist()  # (world, 3): one all-gather under DDP
        window = sum(r[0] for r in rows) / len(rows)
        bad_step = int(min(r[1] for r in rows))
        if bad_step != NO_STEP:
            loss = window / (self.step - self.window_start)
            raise BigModelError(f"training diverged: loss is {loss} at step {bad_step} "
                                f"(lower the learning rate); {self._kept()}")
        if any(r[2] for r in rows):
            raise BigModelError(f"training diverged: weights are not finite at step {self.step} "
                                f"(lower the learning rate); {self._kept()}")
        return window

    def _kept(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written before it"
        step, directory = self.last_good
        return f"the last good checkpoint (step {step}) is kept in {directory}"

    def run_eval(self, evaluate: Callable[[], dict[str, float]]) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = evaluate()
        self.model.train()
        return metrics

    # --- checkpoints: safetensors weights, torch-saved optimizer/RNG (loaded weights_only) ---
    # Both are full state dicts keyed by parameter name, whatever the process layout: a
    # checkpoint written by one process, by DDP or by FSDP resumes under any of them.

    def full_state(self, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, optimizer state) as full tensors on the CPU, in rank 0 (under FSDP the
        other ranks get empty dicts). Call it on every rank: under FSDP it gathers the shards.
        An unsharded model's are read directly, in the layout torch.distributed.checkpoint
        gives them (which imports torch's compiler; tests/unit/test_optim.py)."""
        if not self.sharded:
            return named_state(self.model, self.optimizer if optimizer else None)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=options)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options) if optimizer else {}
        return weights, optim

    def full_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained model as one ordinary module: the model itself, or under FSDP a new one
        from `build()` holding the gathered weights (rank 0; None on the other ranks). Call it
        on every rank."""
        if not self.sharded:
            return self.model
        weights, _ = self.full_state(optimizer=False)
        if not self.world.is_main:
            return None
        model = build()
        model.load_state_dict(weights)
        return model

    def save_checkpoint(self, directory: Path, extra_state: dict[str, Any]) -> None:
        """Write the checkpoint atomically. Call it on every rank: it gathers each rank's RNG
        states (and log window, and under FSDP the weights and optimizer shards); rank 0 alone
        writes. Tensors in `extra_state` go to trainer.pt, everything else to state.json."""
        weights, optim = self.full_state()
        rngs = self.world.gather_objects(rng_state())
        window = self.world.gather(self.window_sum).mean(0)
        self.last_good = (self.step, directory)
        if not self.world.is_main:
            return
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            # a tied matrix is stored once (loading puts it back under each of its names)
            save_file({k: v.contiguous() for k, v in weights.items() if k not in self.tied},
                      str(tmp / "model.safetensors"))
            # through a Python file, so a refused write surfaces as its OSError (io.refused_write)
            with open(tmp / "trainer.pt", "wb") as f:
                torch.save(
                    {
                        "optimizer": optim,
                        "rng": rngs,  # one entry per rank
                        "loss_window": {"sum": window.cpu(), "start": self.window_start},
                        "extra_tensors": {k: v for k, v in extra_state.items()
                                          if torch.is_tensor(v)},
                    },
                    f,
                )
            plain = {k: v for k, v in extra_state.items() if not torch.is_tensor(v)}
            meta = {"step": self.step, "world_size": self.world.size,
                    "parallel": "fsdp" if self.sharded else "ddp" if self.world.distributed else "none",
                    "next_lr": lr_at(self.step, self.cfg, self.max_steps),
                    "last_loss": self.last_loss, "last_eval": self.last_eval}
            (tmp / "state.json").write_text(json.dumps({**meta, **plain}, indent=2))

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Restore what save_checkpoint wrote (on every rank); return the stage's extra state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (directory / "state.json").is_file():
            raise BigModelError(f"{directory}: no checkpoint to resume from")
        try:
            blob = torch.load(directory / "trainer.pt", weights_only=True, map_location="cpu")
            weights = load_file(str(directory / "model.safetensors"))
            state = json.loads((directory / "state.json").read_text())
        except Exception as e:  # truncated, corrupt, or not ours: torch, safetensors, json
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
            raise BigModelError(f"{directory}: not a readable checkpoint ({first}); delete it "
                                f"to start again") from None
        if "rng" not in blob or any(isinstance(k, int) for k in blob["optimizer"].get("state", {})):
            raise BigModelError(f"{directory}: written by an older bigmodel (optimizer state "
                                f"without parameter names); start again without --resume")
        for alias, name in self.tied.items():  # the tied matrix under each of its names
            if name in weights:
                weights[alias] = weights[name]
        # (under FSDP a shard's shape is the whole parameter's)
        check_shapes(weights, self.model.state_dict(), f"{directory / 'model.safetensors'}")
        if self.sharded:
            options = StateDictOptions(full_state_dict=True)  # every rank reads the whole file
            set_model_state_dict(self.model, weights, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, blob["optimizer"], options=options)
        else:
            load_named_state(self.model, self.optimizer, weights, blob["optimizer"])
        if self.pairs:
            self._sync_compute()
        rngs = blob["rng"]
        set_rng_state(rngs[self.world.rank % len(rngs)])  # another world size: rank mod old size
        self.window_sum.copy_(blob["loss_window"]["sum"])
        self.window_start = int(blob["loss_window"]["start"])
        self.step = int(state.pop("step"))
        self.last_loss = float(state.pop("last_loss", float("nan")))
        self.last_eval = dict(state.pop("last_eval", {}))
        for key in ("world_size", "parallel", "next_lr"):
            state.pop(key, None)
        self.last_good = (self.step, directory)
        return {**state, **blob["extra_tensors"]}


def _bf16_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(x: Any) -> Any:
        return x.to(torch.bfloat16) if torch.is_tensor(x) and x.is_floating_point() else x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def check_shapes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    """A BigModelError naming the first difference when saved weights do not fit the model."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise BigModelError(f"{where}: holds the weights of another architecture (missing "
                            f"{missing[:3]}, unexpected {extra[:3]}); delete it to start again")
    for name, tensor in want.items():
        if tuple(got[name].shape) != tuple(tensor.shape):
            raise BigModelError(f"{where}: {name} is {list(got[name].shape)} but the model "
                                f"needs {list(tensor.shape)} (another architecture or "
                                f"vocabulary); delete it to start again")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def named_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """An unsharded model's full state on the CPU: its state dict, and the optimizer's state
    keyed by parameter name (a tied parameter by its first), as get_model_state_dict and
    get_optimizer_state_dict(full_state_dict=True, cpu_offload=True) give them."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if optimizer is None:
        return weights, {}
    name = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    order = [name[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def load_named_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                     weights: dict[str, torch.Tensor], optim: dict) -> None:
    """Load what named_state gave into an unsharded model and its optimizer."""
    model.load_state_dict(weights)
    name = {id(p): n for n, p in model.named_parameters()}
    index = {name[id(p)]: i for i, p in
             enumerate(p for g in optimizer.param_groups for p in g["params"])}
    saved_groups = optim["param_groups"]
    if sorted(n for g in saved_groups for n in g["params"]) != sorted(index):
        raise BigModelError("the checkpoint's optimizer holds other parameters than the model's")
    optimizer.load_state_dict({
        "state": {index[n]: s for n, s in optim["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in saved_groups],
    })


def tied_names(model: nn.Module) -> dict[str, str]:
    """{later name: first name} for every parameter the model holds under more than one name
    (a GPT's output head is its token embedding)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP parameter, any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


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
