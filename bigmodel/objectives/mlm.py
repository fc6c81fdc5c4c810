"""The masked-LM objective (with optional next-sentence prediction) that BERT pre-trains on.

A batch is a dict of tensors: `idx` (B, T) the masked inputs, `labels` (B, T) the original ids at
the positions chosen for prediction and -100 elsewhere, `lengths` (B,) real tokens per
right-padded row, `segments` (B, T) token types, and with NSP `nsp_labels` (B,): 0 when B is the
text that follows A, 1 when B comes from another document.

`MLMSampler` draws batches from a token shard, `mask_tokens` picks and corrupts the targets,
`mlm_loss` is what the trainer minimises, `mlm_metrics` what it reports, and `unigram_baseline`
the score of predicting the train split's token frequencies: the floor MLM has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.errors import BigModelError
from bigmodel.text.shards import Split
from bigmodel.text.tokenizers import Specials as TokenizerSpecials
from bigmodel.train.distributed import World

IGNORE = -100  # F.cross_entropy's ignore_index: positions not chosen for prediction


@dataclass(frozen=True)
class Specials:
    """Special token ids. Every id below `first_normal` is special (WordPiece puts [PAD] [UNK]
    [CLS] [SEP] [MASK] first): never a target, never a random replacement."""

    cls: int
    sep: int
    mask: int
    pad: int
    vocab_size: int
    first_normal: int

    def __post_init__(self) -> None:
        if not max(self.cls, self.sep, self.mask, self.pad) < self.first_normal < self.vocab_size:
            raise BigModelError(f"special ids {self} must all lie below first_normal, and "
                                f"first_normal below vocab_size")


def mask_tokens(idx: torch.Tensor, maskable: torch.Tensor, specials: Specials,
                gen: torch.Generator, rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for rows `idx` (B, T) whose `maskable` (B, T) positions may be targets.

    Each row gets exactly round(rate × n) of its n maskable positions (at least one when n > 0),
    as the original create_pretraining_data does, rather than each position with probability
    `rate`: every row then has a target and the number of targets does not vary by chance. Of
    the chosen, 80% become [MASK], 10% a random normal token and 10% stay as they are; labels
    hold the original ids there and -100 elsewhere. All draws come from the CPU generator `gen`
    and their sizes depend on the shape alone, so equal states give equal batches.
    """
    B, T = idx.shape
    tokens, maskable = idx.cpu(), maskable.cpu()
    n = maskable.sum(1)  # (B,)
    k = (n * rate).round().long().clamp(min=1).minimum(n)  # targets per row
    scores = torch.rand(B, T, generator=gen).masked_fill(~maskable, 2.0)  # unmaskable sort last
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, T) place of each position in a random order
    chosen = rank < k[:, None]
    u = torch.rand(B, T, generator=gen)
    random_ids = torch.randint(specials.first_normal, specials.vocab_size, (B, T), generator=gen)
    inputs = tokens.clone()
    inputs[chosen & (u < 0.8)] = specials.mask
    swap = chosen & (u >= 0.8) & (u < 0.9)
    inputs[swap] = random_ids[swap]
    labels = torch.where(chosen, tokens, IGNORE)
    return inputs.to(idx.device), labels.to(idx.device)


class MLMSampler:
    """Masked-LM batches from a token shard: `data` holds every document followed by its [SEP]
    (no [CLS]), `doc_starts` each document's first offset.

    Without NSP a row is [CLS] + a random window of block_size - 2 tokens + [SEP], all segment 0;
    windows cross document boundaries and keep the stream's own [SEP]s (RoBERTa's packing, which
    does as well as NSP without it). With NSP a row is [CLS] A [SEP] B [SEP], then padding:

    - A's document is drawn in proportion to its length (as if each document gave as many pairs
      as it has tokens, like Devlin et al.'s pass over every document), among documents of at
      least 2 tokens, the least that splits into A and a following B;
    - A and the text after it share min(document length, block_size - 3) tokens, half each (A
      gets the smaller half), at a random place in the document, so short documents give short,
      padded rows;
    - with probability 1/2 B is that following text (label 0), else a span of the same length
      at a random place in one of the other non-empty documents, drawn uniformly (label 1),
      cut to that document's length if it is shorter. The same length either way, so the amount
      of padding does not give the label away.

    As WindowSampler: each call draws the whole global batch from `gen`, whose state is the
    whole data position, and returns this rank's rows, so every world size sees the same batches.
    The global batch is built and masked whole (a few thousand tokens) so that a row's masking
    does not depend on which rank reads it.
    """

    def __init__(self, data: np.ndarray, doc_starts: np.ndarray, block_size: int,
                 batch_size: int, seed: int, device: torch.device, specials: Specials,
                 nsp: bool, world: World | None = None, key: str = "batch_size",
                 rate: float = 0.15):
        world = world or World()
        self.rate = rate
        self.data, self.T, self.B, self.device = data, block_size, batch_size, device
        self.specials, self.nsp = specials, nsp
        share = world.share(batch_size, key)
        self.rows = slice(world.rank * share, (world.rank + 1) * share)
        self.gen = torch.Generator().manual_seed(seed)
        if nsp:
            self._index_documents(np.asarray(doc_starts, dtype=np.int64))
        elif len(data) < block_size - 2 or block_size < 3:
            raise BigModelError(f"only {len(data)} tokens for windows of block_size - 2 = "
                                f"{block_size - 2}: need block_size >= 3 and at least that many "
                                f"tokens; add data or lower block_size")

    def _index_documents(self, doc_starts: np.ndarray) -> None:
        if self.T < 5:
            raise BigModelError(f"block_size {self.T} cannot hold [CLS] A [SEP] B [SEP]; "
                                f"use block_size >= 5")
        if not len(doc_starts) or doc_starts[0] != 0:
            raise BigModelError("doc_starts must list each document's offset, starting at 0")
        self.starts = doc_starts
        self.lens = np.diff(doc_starts, append=len(self.data)) - 1  # tokens before each [SEP]
        self.a_docs = np.flatnonzero(self.lens >= 2)
        self.b_docs = np.flatnonzero(self.lens >= 1)
        if not len(self.a_docs) or len(self.b_docs) < 2:
            raise BigModelError(f"{len(self.a_docs)} documents of >= 2 tokens and "
                                f"{len(self.b_docs)} non-empty: next-sentence pairs need at least "
                                f"1 and 2; add data or turn NSP off")
        self.a_cum = np.cumsum(self.lens[self.a_docs])
        self.b_place = np.full(len(doc_starts), -1)
        self.b_place[self.b_docs] = np.arange(len(self.b_docs))  # document → index in b_docs

    def __call__(self) -> dict[str, torch.Tensor]:
        if self.nsp:
            tokens, lengths, segments, nsp_labels = self._pairs()
        else:
            tokens, lengths, segments = self._windows()
        idx = torch.from_numpy(tokens)
        # Special ids ([CLS], [SEP], [PAD], ...) lie below first_normal: never targets.
        idx, labels = mask_tokens(idx, idx >= self.specials.first_normal, self.specials, self.gen,
                                  self.rate)
        batch = {"idx": idx, "labels": labels, "lengths": torch.from_numpy(lengths),
                 "segments": torch.from_numpy(segments)}
        if self.nsp:
            batch["nsp_labels"] = torch.from_numpy(nsp_labels)
        return {k: self._to_device(v[self.rows]) for k, v in batch.items()}

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _windows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.T - 2
        starts = torch.randint(len(self.data) - n + 1, (self.B,), generator=self.gen).numpy()
        window = self.data[starts[:, None] + np.arange(n)].astype(np.int64)  # (B, T - 2)
        column = np.ones((self.B, 1), dtype=np.int64)
        tokens = np.concatenate([column * self.specials.cls, window, column * self.specials.sep],
                                axis=1)
        return tokens, np.full(self.B, self.T), np.zeros_like(tokens)

    def _pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        B, g = self.B, self.gen
        doc = self.a_docs[np.searchsorted(
            self.a_cum, torch.randint(int(self.a_cum[-1]), (B,), generator=g).numpy(), "right")]
        span = np.minimum(self.lens[doc], self.T - 3)  # A + the text after it
        la = span // 2
        lb = span - la
        a = self.starts[doc] + self._offsets(self.lens[doc] - span + 1)
        not_next = (torch.rand(B, generator=g) < 0.5).numpy()
        # Uniform over the other non-empty documents: skip A's own place in b_docs.
        j = torch.randint(len(self.b_docs) - 1, (B,), generator=g).numpy()
        other = self.b_docs[j + (j >= self.b_place[doc])]
        lb_other = np.minimum(lb, self.lens[other])
        b_other = self.starts[other] + self._offsets(self.lens[other] - lb_other + 1)
        b = np.where(not_next, b_other, a + la)
        lb = np.where(not_next, lb_other, lb)
        tokens, lengths, segments = self._pack(a, la, b, lb)
        return tokens, lengths, segments, not_next.astype(np.int64)

    def _offsets(self, choices: np.ndarray) -> np.ndarray:
        """A uniform draw from range(c) for each c of `choices` (float64: exact for any shard)."""
        u = torch.rand(len(choices), generator=self.gen, dtype=torch.float64).numpy()
        return (u * choices).astype(np.int64)

    def _pack(self, a: np.ndarray, la: np.ndarray, b: np.ndarray, lb: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [CLS] data[a:a+la] [SEP] data[b:b+lb] [SEP] [PAD]..., their lengths, segments."""
        t = np.arange(self.T)[None, :]  # (1, T)
        a, la, b, lb = a[:, None], la[:, None], b[:, None], lb[:, None]  # (B, 1)
        last = len(self.data) - 1
        in_a = (t >= 1) & (t <= la)
        in_b = (t >= la + 2) & (t < la + 2 + lb)
        src = np.clip(np.where(in_a, a + t - 1, b + t - la - 2), 0, last)  # read where in A, B
        s = self.specials
        tokens = np.select(
            [in_a | in_b, t == 0, (t == la + 1) | (t == la + 2 + lb)],
            [self.data[src].astype(np.int64), s.cls, s.sep],
            default=s.pad,
        )  # (B, T)
        lengths = (la + lb + 3)[:, 0]
        segments = ((t >= la + 2) & (t < lengths[:, None])).astype(np.int64)  # B [SEP] → 1
        return tokens, lengths, segments


def _predict(model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(MLM logits (N, vocab) and targets (N,) at the N chosen positions, NSP logits (B, 2) or
    None). Hidden states through `model` itself (DDP hooks its forward); heads on the inner
    module, projecting only the chosen positions onto the vocabulary."""
    h = model(batch["idx"], batch["lengths"], batch["segments"])  # (B, T, C)
    heads = getattr(model, "module", model)
    chosen = batch["labels"] != IGNORE
    logits = heads.mlm_logits(h[chosen])  # (N, vocab)
    nsp = heads.nsp_logits(h) if "nsp_labels" in batch else None
    return logits, batch["labels"][chosen], nsp


def mlm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the chosen positions, plus the NSP cross-entropy when the batch has
    next-sentence labels (the sum, as in BERT)."""
    logits, targets, nsp = _predict(model, batch)
    if targets.numel() == 0:  # the mean over no positions is NaN, which would read as divergence
        raise BigModelError("MLM batch has no chosen positions (every label is ignored): "
                            "each row needs at least one masked token")
    loss = F.cross_entropy(logits.float(), targets)
    if nsp is not None:
        loss = loss + F.cross_entropy(nsp.float(), batch["nsp_labels"])
    return loss


def mlm_metrics(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Over fixed batches, in eval mode: `mlm_loss` (masked-token cross-entropy, NSP left out,
    so it compares with unigram_baseline) and `masked_accuracy`, both over all chosen positions
    together; with NSP batches also `nsp_loss` and `nsp_accuracy`."""
    was_training = model.training
    model.eval()
    loss = correct = targets_seen = nsp_loss = nsp_correct = pairs = 0.0
    with torch.no_grad():
        for batch in batches:
            logits, targets, nsp = _predict(model, batch)
            loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            correct += (logits.argmax(-1) == targets).sum().item()
            targets_seen += targets.numel()
            if nsp is not None:
                labels = batch["nsp_labels"]
                nsp_loss += F.cross_entropy(nsp.float(), labels, reduction="sum").item()
                nsp_correct += (nsp.argmax(-1) == labels).sum().item()
                pairs += labels.numel()
    model.train(was_training)
    metrics = {"mlm_loss": loss / targets_seen, "masked_accuracy": correct / targets_seen}
    if pairs:
        metrics |= {"nsp_loss": nsp_loss / pairs, "nsp_accuracy": nsp_correct / pairs}
    return metrics


def unigram_baseline(train_data: np.ndarray, specials: Specials,
                     batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """`mlm_loss` and `masked_accuracy` on `batches` of a model that ignores the context and
    predicts the train split's normal-token frequencies (add-one smoothed, so no target has
    probability 0): the floor a masked LM has to beat."""
    counts = np.zeros(specials.vocab_size, dtype=np.int64)
    chunk = 1 << 24  # bincount copies to int64: a chunk at a time for a memory-mapped shard
    for i in range(0, len(train_data), chunk):
        counts += np.bincount(train_data[i:i + chunk], minlength=specials.vocab_size)
    normal = counts[specials.first_normal:] + 1
    log_p = torch.from_numpy(np.log(normal / normal.sum()))
    targets = torch.cat([b["labels"][b["labels"] != IGNORE].cpu() for b in batches])
    guess = specials.first_normal + int(normal.argmax())
    return {"mlm_loss": -log_p[targets - specials.first_normal].mean().item(),
            "masked_accuracy": (targets == guess).double().mean().item()}


# --- what the pretrain stage asks of an objective ----------------------------------------------

@dataclass
class MLM:
    sampler: MLMSampler
    val_batches: list[dict[str, torch.Tensor]]
    units_per_step: int
    unit: str = "tokens"

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.sampler()

    @staticmethod
    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return mlm_loss(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {f"val_{k}": v for k, v in mlm_metrics(model, self.val_batches).items()}

    def flops_per_unit(self, model: nn.Module) -> float:
        return model.flops_per_token()


def specials_of(tok: TokenizerSpecials) -> Specials:
    """This objective's Specials from a WordPiece tokenizer's."""
    if tok.cls is None or tok.sep is None or tok.mask is None:
        raise BigModelError("a masked LM needs a tokenizer with [CLS], [SEP] and [MASK] "
                            "(kind: wordpiece)")
    return Specials(cls=tok.cls, sep=tok.sep, mask=tok.mask, pad=tok.pad,
                    vocab_size=tok.vocab_size, first_normal=tok.n_special)


def make(spec: Any, train: Split, val: Split, tok: TokenizerSpecials, key: str, seed: int,
         device: torch.device, world: World) -> MLM:
    """`spec` is the pretrain run (block_size, batch_size, grad_accum, eval_batches, nsp,
    mask_rate); `key` its params name, for error messages."""
    specials = specials_of(tok)

    def sampler(split: Split, split_seed: int, split_world: World | None) -> MLMSampler:
        return MLMSampler(split.tokens, split.doc_starts, spec.block_size, spec.batch_size,
                          split_seed, device, specials, spec.nsp, split_world,
                          key=f"{key}.batch_size", rate=spec.mask_rate)

    val_sampler = sampler(val, seed + 1, None)  # every rank scores the same whole batches
    return MLM(sampler(train, seed, world), [val_sampler() for _ in range(spec.eval_batches)],
               spec.batch_size * spec.block_size * spec.grad_accum)
