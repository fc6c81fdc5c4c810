"""The causal-LM objective GPT pre-trains on: predict every next token of random windows.

`make` gives the pretrain stage what the trainer needs: a sampler (its generator state is the
whole data position, saved in checkpoints), the loss, an evaluation on fixed val windows (loss
and bits per byte), and the tokens a step trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from bigmodel.errors import BigModelError
from bigmodel.train.distributed import World

if TYPE_CHECKING:  # types only: training needs neither the tokenizers library nor shards
    from bigmodel.text.shards import Split
    from bigmodel.text.tokenizers import Specials


class WindowSampler:
    """Random (x, y) windows from a memory-mapped token array; its generator state is the whole
    data position, so a resumed run draws exactly the batches it would have drawn.

    Each call draws the starts of a whole global batch of `batch_size` windows and reads this
    rank's slice of them, so the ranks see disjoint windows whose union is the batch one process
    would train on, and the position is the same on every rank (and for any world size)."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device, world: World | None = None, key: str = "batch_size"):
        if len(data) <= block_size + 1:
            raise BigModelError(f"only {len(data)} tokens: need more than block_size + 1 "
                                f"({block_size + 1}); add data or lower {key.rsplit('.', 1)[0]}"
                                f".block_size")
        world = world or World()
        self.data, self.T, self.B, self.device = data, block_size, batch_size, device
        share = world.share(batch_size, key)
        self.rows = slice(world.rank * share, (world.rank + 1) * share)
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = np.arange(block_size + 1)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.T - 1, (self.B,), generator=self.gen).numpy()
        starts = starts[self.rows]
        window = torch.from_numpy(self.data[starts[:, None] + self.offsets].astype(np.int64))
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]  # (B, T) inputs, (B, T) next-token targets


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


def window_loss(model: nn.Module, data: np.ndarray, block: int, batch_size: int) -> float:
    """Mean next-token loss over consecutive `block`-token windows of `data` (every token
    scored once, none seen twice)."""
    n = (len(data) - 1) // block
    if n == 0:
        raise BigModelError(f"only {len(data)} tokens to score, fewer than one block of {block}; "
                            f"add data or use a smaller block_size")
    x_all = torch.from_numpy(np.asarray(data[: n * block], dtype=np.int64)).view(n, block)
    y_all = torch.from_numpy(np.asarray(data[1 : n * block + 1], dtype=np.int64)).view(n, block)
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x_all[i : i + batch_size], y_all[i : i + batch_size])
        total += loss.item() * len(x_all[i : i + batch_size])
    return total / n


@dataclass
class CLM:
    sampler: WindowSampler
    val_batches: list[Any]
    val_bytes_per_token: float
    units_per_step: int
    unit: str = "tokens"

    def next_batch(self) -> Any:
        return self.sampler()

    @staticmethod
    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return lm_loss(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss = torch.stack([lm_loss(model, b) for b in self.val_batches]).mean().item()
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.val_bytes_per_token}

    def flops_per_unit(self, model: nn.Module) -> float:
        return model.flops_per_token()


def make(spec: Any, train: Split, val: Split, specials: Specials, key: str, seed: int,
         device: torch.device, world: World) -> CLM:
    """`spec` is the pretrain run (block_size, batch_size, grad_accum, eval_batches); `key` its
    params name, for error messages."""
    sampler = WindowSampler(train.tokens, spec.block_size, spec.batch_size, seed, device, world,
                            key=f"{key}.batch_size")
    # every rank scores the same whole batches, fixed so that evaluations compare over steps
    val_sampler = WindowSampler(val.tokens, spec.block_size, spec.batch_size, seed + 1, device,
                                key=f"{key}.batch_size")
    return CLM(sampler, [val_sampler() for _ in range(spec.eval_batches)],
               val.bytes_per_token, spec.batch_size * spec.block_size * spec.grad_accum)
