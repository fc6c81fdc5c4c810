"""The sequence-classification objective: cross-entropy on a pooled state, epoch by epoch over a
labelled split; evaluated by val loss, accuracy and macro-F1 (the best epoch is kept by
`select`)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from bigmodel.errors import BigModelError
from bigmodel.tasks.seq_cls import classification_scores
from bigmodel.text.tokenizers import encode_texts

SELECT = "val_macro_f1"  # the epoch with the best value of this is the one kept
TRAIN_SAMPLE = 1000  # training accuracy is measured on this many fixed training examples


class Encoded:
    """A labelled split as padded token ids on the device."""

    def __init__(self, table: pd.DataFrame, tok: Tokenizer, labels: list[str], max_len: int,
                 device: torch.device):
        unknown = sorted(set(table["label"]) - set(labels))
        if unknown:
            raise BigModelError(f"labels {unknown[:5]} are not in the training split")
        ids, lengths = encode_texts(tok, table["text"].tolist(), max_len)
        index = {label: i for i, label in enumerate(labels)}
        self.ids = torch.from_numpy(ids).to(device)
        self.lengths = torch.from_numpy(lengths).to(device)
        self.y = torch.tensor([index[v] for v in table["label"]], device=device)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self.lengths[rows]
        width = int(lengths.max())  # trim padding to the longest text in the batch
        return self.ids[rows, :width], lengths, self.y[rows]


class EpochBatches:
    """Shuffled mini-batches, epoch after epoch, from a seeded generator. Each epoch's random
    order is cut into pools of `pool` batches, and each pool sorted by length before it is cut
    into batches (whose order is shuffled again): a batch then holds texts of about one length,
    so the padding a batch is trimmed to wastes little compute (measured: benchmarks/RESULTS.md)."""

    def __init__(self, data: Any, batch_size: int, seed: int, pool: int = 50):
        self.data, self.bs, self.pool = data, batch_size, pool
        self.gen = torch.Generator().manual_seed(seed)
        self.batches: list[torch.Tensor] = []

    def epoch(self) -> list[torch.Tensor]:
        order = torch.randperm(len(self.data), generator=self.gen)
        lengths = self.data.lengths.cpu()
        batches = []
        for i in range(0, len(order), self.bs * self.pool):
            chunk = order[i : i + self.bs * self.pool]
            chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
            batches += list(chunk.split(self.bs))
        shuffle = torch.randperm(len(batches), generator=self.gen).tolist()
        return [batches[j] for j in shuffle]

    def __call__(self) -> Any:
        if not self.batches:
            self.batches = self.epoch()
        rows = self.batches.pop().to(self.data.ids.device)
        return self.data.batch(rows)


def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, lengths, y = batch
    return F.cross_entropy(model(ids, lengths).float(), y)


@torch.no_grad()
def score(model: nn.Module, data: Encoded, labels: list[str], batch_size: int) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 over a whole split."""
    loss_sum, predicted = 0.0, []
    for i in range(0, len(data), batch_size):
        ids, lengths, y = data.batch(torch.arange(i, min(i + batch_size, len(data)),
                                                  device=data.ids.device))
        logits = model(ids, lengths).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predicted.append(logits.argmax(-1))
    pred, y = torch.cat(predicted).cpu().tolist(), data.y.cpu().tolist()
    s = classification_scores([labels[i] for i in y], [labels[i] for i in pred], labels,
                              per_class=False)
    return {"loss": loss_sum / len(data), **s}


class SeqCls:
    unit = "examples"
    select = SELECT

    def __init__(self, spec: Any, train: pd.DataFrame, val: pd.DataFrame, tok: Tokenizer,
                 labels: list[str], seed: int, device: torch.device):
        self.labels, self.bs = labels, spec.batch_size
        self.train = Encoded(train, tok, labels, spec.max_len, device)
        self.val = Encoded(val, tok, labels, spec.max_len, device)
        self.sample = Encoded(train.sample(min(TRAIN_SAMPLE, len(train)), random_state=seed),
                              tok, labels, spec.max_len, device)
        self.next_batch = EpochBatches(self.train, spec.batch_size, seed)
        self.units_per_step = spec.batch_size * spec.grad_accum
        self.loss = loss

    def __len__(self) -> int:
        return len(self.train)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        v = score(model, self.val, self.labels, self.bs)
        t = score(model, self.sample, self.labels, self.bs)
        return {"val_loss": v["loss"], "val_accuracy": v["accuracy"], "val_macro_f1": v["macro_f1"],
                "train_eval_loss": t["loss"], "train_accuracy": t["accuracy"]}


def labels_of(train: pd.DataFrame) -> list[str]:
    return sorted(train["label"].unique())


def make(spec: Any, train: pd.DataFrame, val: pd.DataFrame, tok: Tokenizer, labels: list[str],
         seed: int, device: torch.device) -> SeqCls:
    return SeqCls(spec, train, val, tok, labels, seed, device)
