"""The sequence-to-sequence objective: teacher-forced cross-entropy on (source, target) pairs,
with label smoothing (0.1 in Vaswani et al., 2017) and padding ignored.

A batch is a dict: `src` (B, S) right-padded source ids, `src_lengths` (B,), `tgt_in` (B, T)
the target shifted right (BOS first) and `tgt_out` (B, T) the target (EOS last), -100 at
padding. `PairSampler` draws them length-bucketed; the trainer reports target tokens a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.errors import BigModelError
from bigmodel.text.shards import Pairs
from bigmodel.text.tokenizers import Specials
from bigmodel.train.distributed import World

LAYOUT = "pairs"  # trains on (source, target) pairs: the tokenize stage writes both sides
IGNORE = -100
BUCKET_BATCHES = 4  # a length bucket holds this many batches' worth of pairs


class PairSampler:
    """Batches of pairs of about one length, drawn with replacement.

    The pairs are sorted by source length + 2 × target length (a decoder token costs about
    twice an encoder token: self-attention, cross-attention and the vocabulary) and cut into
    buckets of
    `BUCKET_BATCHES × batch_size`; each call picks a bucket (in proportion to its size) and
    `batch_size` pairs in it, all from `gen`. A batch then pads little, and the generator state
    is the whole data position, so a resumed run draws the batches it would have drawn. As
    WindowSampler: each rank draws the whole global batch and keeps its slice."""

    def __init__(self, pairs: Pairs, block_size: int, batch_size: int, seed: int,
                 device: torch.device, specials: Specials, world: World | None = None,
                 key: str = "batch_size"):
        if specials.bos is None or specials.eot is None:
            raise BigModelError("a seq2seq model needs a tokenizer with <|bos|> and "
                                "<|endoftext|> (a tokenizer run with text: pairs)")
        if len(pairs) == 0:
            raise BigModelError("no (source, target) pairs in the training split")
        world = world or World()
        self.pairs, self.T, self.B, self.device = pairs, block_size, batch_size, device
        self.bos, self.pad = specials.bos, specials.pad
        share = world.share(batch_size, key)
        self.rows = slice(world.rank * share, (world.rank + 1) * share)
        self.gen = torch.Generator().manual_seed(seed)
        cost = np.minimum(pairs.src_lengths, block_size) + 2 * np.minimum(pairs.tgt_lengths, block_size)
        order = np.lexsort((pairs.tgt_lengths, cost))
        size = BUCKET_BATCHES * batch_size
        self.buckets = [order[i:i + size] for i in range(0, len(order), size)]
        self.cum = np.cumsum([len(b) for b in self.buckets])
        self.target_tokens = 0  # target tokens drawn so far, all ranks (the throughput unit)

    def __call__(self) -> dict[str, torch.Tensor]:
        u = torch.randint(int(self.cum[-1]), (1,), generator=self.gen).item()
        bucket = self.buckets[int(np.searchsorted(self.cum, u, "right"))]
        pick = bucket[torch.randint(len(bucket), (self.B,), generator=self.gen).numpy()]
        batch = make_batch(self.pairs, pick, self.T, self.bos, self.pad)
        self.target_tokens += int((batch["tgt_out"] != IGNORE).sum())
        return {k: to_device(v[self.rows], self.device) for k, v in batch.items()}


def make_batch(pairs: Pairs, rows: np.ndarray, block_size: int, bos: int, pad: int
               ) -> dict[str, torch.Tensor]:
    """Padded tensors of pairs `rows`; sources cut to block_size tokens, targets to
    block_size - 1 tokens + EOS (a cut target keeps its EOS: the model learns to stop)."""
    srcs = [pairs.source(i)[:block_size] for i in rows]
    tgts = [pairs.target(i) for i in rows]
    tgts = [t if len(t) < block_size else np.append(t[:block_size - 1], t[-1]) for t in tgts]
    S, T = max(map(len, srcs)), max(map(len, tgts))
    src = np.full((len(rows), S), pad, dtype=np.int64)
    tgt_in = np.full((len(rows), T), pad, dtype=np.int64)
    tgt_out = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for r, (s, t) in enumerate(zip(srcs, tgts)):
        src[r, :len(s)] = s
        tgt_in[r, 0], tgt_in[r, 1:len(t)] = bos, t[:-1]
        tgt_out[r, :len(t)] = t
    return {"src": torch.from_numpy(src), "src_lengths": torch.tensor([len(s) for s in srcs]),
            "tgt_in": torch.from_numpy(tgt_in), "tgt_out": torch.from_numpy(tgt_out)}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float = 0.0
                 ) -> torch.Tensor:
    """Mean cross-entropy per real target token, against (1 - ε) on the target and ε spread
    over the vocabulary (Szegedy et al.'s label smoothing; ε = `smoothing`)."""
    real = batch["tgt_out"] != IGNORE  # (B, T)
    logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"], real)  # (N, vocab)
    return F.cross_entropy(logits.float(), batch["tgt_out"][real], label_smoothing=smoothing)


@torch.no_grad()
def seq2seq_metrics(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Over fixed batches, in eval mode: the plain (unsmoothed) cross-entropy per target token
    and the teacher-forced next-token accuracy."""
    was_training = model.training
    model.eval()
    loss = correct = n = 0.0
    for batch in batches:
        real = batch["tgt_out"] != IGNORE
        logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"], real).float()
        loss += F.cross_entropy(logits, batch["tgt_out"][real], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["tgt_out"][real]).sum().item()
        n += real.sum().item()
    model.train(was_training)
    return {"loss": loss / n, "token_accuracy": correct / n}


def fixed_batches(pairs: Pairs, block_size: int, batch_size: int, n_batches: int, bos: int,
                  pad: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first `n_batches × batch_size` pairs (all when fewer), sorted by length, batched."""
    rows = np.arange(min(len(pairs), n_batches * batch_size))
    rows = rows[np.argsort(pairs.src_lengths[rows], kind="stable")]
    return [{k: to_device(v, device) for k, v in
             make_batch(pairs, rows[i:i + batch_size], block_size, bos, pad).items()}
            for i in range(0, len(rows), batch_size)]


# --- what the pretrain stage asks of an objective ----------------------------------------------

@dataclass
class Seq2SeqObjective:
    sampler: PairSampler
    val_batches: list[dict[str, torch.Tensor]]
    smoothing: float
    unit: str = "target_tokens"

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.sampler()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return seq2seq_loss(model, batch, self.smoothing)

    def units_per_step(self) -> int:
        """Target tokens drawn so far (a counter: a batch's target length varies)."""
        return self.sampler.target_tokens

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {f"val_{k}": v for k, v in seq2seq_metrics(model, self.val_batches).items()}

    def flops_per_unit(self, model: nn.Module) -> float:
        return model.flops_per_token()


def make(spec: Any, train: Pairs, val: Pairs, tok: Specials, key: str, seed: int,
         device: torch.device, world: World) -> Seq2SeqObjective:
    """`spec` is the pretrain run (block_size, batch_size, eval_batches, label_smoothing)."""
    sampler = PairSampler(train, spec.block_size, spec.batch_size, seed, device, tok, world,
                          key=f"{key}.batch_size")
    val_batches = fixed_batches(val, spec.block_size, spec.batch_size, spec.eval_batches,
                                tok.bos, tok.pad, device)  # type: ignore[arg-type]
    if not val_batches:
        raise BigModelError(f"{key}: the val split has no (source, target) pairs")
    return Seq2SeqObjective(sampler, val_batches, spec.label_smoothing)
