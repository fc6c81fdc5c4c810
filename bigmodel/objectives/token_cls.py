"""The token-classification objective: cross-entropy on each word's first sub-word (the other
sub-words, special tokens and padding are ignored), epoch by epoch over tagged sentences;
evaluated by val loss and seqeval's entity F1 (the best epoch is kept by `select`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from bigmodel.errors import BigModelError
from bigmodel.objectives.seq_cls import EpochBatches
from bigmodel.tasks.token_cls import IGNORE, align_labels, decode_words, entity_scores
from bigmodel.text.tokenizers import encode_words

SELECT = "val_entity_f1"


class EncodedTags:
    """Tagged sentences as padded token ids and per-token labels on the device."""

    def __init__(self, table: pd.DataFrame, tok: Tokenizer, labels: list[str], max_len: int,
                 device: torch.device):
        index = {t: i for i, t in enumerate(labels)}
        unknown = sorted({t for tags in table["tags"] for t in tags} - set(index))
        if unknown:
            raise BigModelError(f"tags {unknown[:5]} are not in the training split")
        self.words = [list(w) for w in table["tokens"]]
        self.tags = [list(t) for t in table["tags"]]
        ids, lengths, self.word_ids = encode_words(tok, self.words, max_len)
        y = np.full(ids.shape, IGNORE, dtype=np.int64)
        for r, (wids, tags) in enumerate(zip(self.word_ids, self.tags)):
            y[r, : len(wids)] = align_labels(wids, [index[t] for t in tags])
        self.ids = torch.from_numpy(ids).to(device)
        self.lengths = torch.from_numpy(lengths).to(device)
        self.y = torch.from_numpy(y).to(device)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self.lengths[rows]
        width = int(lengths.max())
        return self.ids[rows, :width], lengths, self.y[rows, :width]


def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, lengths, y = batch
    logits = model(ids, lengths).float()  # (B, T, n_tags)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def score(model: nn.Module, data: EncodedTags, labels: list[str], batch_size: int) -> dict[str, Any]:
    """Mean loss over the labelled sub-words, and entity scores of the decoded word tags."""
    loss_sum, n, predicted = 0.0, 0, []
    for i in range(0, len(data), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(data)), device=data.ids.device)
        ids, lengths, y = data.batch(rows)
        logits = model(ids, lengths).float()
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                    ignore_index=IGNORE, reduction="sum").item()
        n += int((y != IGNORE).sum())
        for j, r in enumerate(rows.tolist()):
            predicted.append(decode_words(logits[j].cpu().numpy(), data.word_ids[r],
                                          len(data.words[r]), labels))
    return {"loss": loss_sum / max(n, 1), **entity_scores(data.tags, predicted)}


class TokenCls:
    unit = "sentences"
    select = SELECT

    def __init__(self, spec: Any, train: pd.DataFrame, val: pd.DataFrame, tok: Tokenizer,
                 labels: list[str], seed: int, device: torch.device):
        self.labels, self.bs = labels, spec.batch_size
        self.train = EncodedTags(train, tok, labels, spec.max_len, device)
        self.val = EncodedTags(val, tok, labels, spec.max_len, device)
        self.next_batch = EpochBatches(self.train, spec.batch_size, seed)
        self.units_per_step = spec.batch_size * spec.grad_accum
        self.loss = loss

    def __len__(self) -> int:
        return len(self.train)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        v = score(model, self.val, self.labels, self.bs)
        return {"val_loss": v["loss"], "val_entity_f1": v["f1"],
                "val_entity_precision": v["precision"], "val_entity_recall": v["recall"],
                "val_token_accuracy": v["token_accuracy"]}


def labels_of(train: pd.DataFrame) -> list[str]:
    """O first, then each entity type's B- and I- tags, sorted by type."""
    seen = {t for tags in train["tags"] for t in tags} - {"O"}
    types = sorted({t[2:] for t in seen})
    return ["O", *[f"{p}-{k}" for k in types for p in ("B", "I")]]


def make(spec: Any, train: pd.DataFrame, val: pd.DataFrame, tok: Tokenizer, labels: list[str],
         seed: int, device: torch.device) -> TokenCls:
    return TokenCls(spec, train, val, tok, labels, seed, device)
