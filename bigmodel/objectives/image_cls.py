"""The image-classification objective (a ResNet's pretraining, and its finetuning on another
label set): cross-entropy, optionally label-smoothed, on augmented batches of images.

The sampler draws each global batch's rows and its augmentation (random crops after padding,
left-right flips where the data allows them) from one seeded generator, in torch, on the
device: the generator's state is the whole data position, so a resumed run draws exactly the
batches and crops it would have drawn, and under DDP every rank draws the same global batch
and takes its own slice of it. Rows are drawn with replacement (each step a fresh random
batch), which is what keeps the position a generator state alone; an "epoch" of a finetune run
is as many images as the train split has. Evaluated on the whole val split: loss, accuracy,
macro-F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.errors import BigModelError
from bigmodel.train.distributed import World

LAYOUT = "images"  # what the tokenize stage writes for it: (N, H, W, C) uint8 arrays per split
SELECT = "val_macro_f1"  # a finetune keeps the epoch with the best value of this
TRAIN_SAMPLE = 1000  # training accuracy is measured on this many fixed training images


class ImageData:
    """A split's images as uint8 (N, C, H, W) on the device, with class indices."""

    def __init__(self, pixels: np.ndarray, y: np.ndarray, device: torch.device):
        if len(pixels) == 0:
            raise BigModelError("an image split is empty")
        self.x = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2).contiguous()  # owned
        self.x = self.x.to(device)  # (N, C, H, W) uint8: a quarter of float32's memory
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)

    def __len__(self) -> int:
        return len(self.y)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float in [0, 1], the unit every ResNet reads (it normalises inside)."""
    return x.float().div_(255)


class Augment:
    """Random crops (pad by `padding` with zeros, cut back to the original side at a random
    offset) and, when `flip`, random left-right flips; parameters for the whole global batch
    come from the sampler's generator."""

    def __init__(self, padding: int, flip: bool):
        self.padding, self.flip = padding, flip

    def __call__(self, x: torch.Tensor, gen: torch.Generator, B_all: int, rows: slice
                 ) -> torch.Tensor:
        """`x` is this rank's `rows` of a global batch of B_all: every rank draws the
        parameters of all of it and keeps its slice, so the generators stay in step."""
        p = self.padding
        if p:
            offsets = torch.randint(2 * p + 1, (B_all, 2), generator=gen)[rows].to(x.device)
            B, C, H, W = x.shape
            padded = F.pad(x, (p, p, p, p))  # (B, C, H + 2p, W + 2p)
            r = offsets[:, :1] + torch.arange(H, device=x.device)  # (B, H) rows kept
            c = offsets[:, 1:] + torch.arange(W, device=x.device)  # (B, W) columns kept
            b = torch.arange(B, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[b, r[:, :, None], c[:, None, :]]  # (B, H, W, C)
            x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.flip:
            flips = (torch.rand(B_all, generator=gen) < 0.5)[rows].to(x.device)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x


class ImageSampler:
    """Random augmented (images, labels) batches; see the module docstring."""

    def __init__(self, data: ImageData, batch_size: int, seed: int, augment: Augment,
                 world: World | None = None, key: str = "batch_size"):
        world = world or World()
        self.data, self.B, self.augment = data, batch_size, augment
        share = world.share(batch_size, key)
        self.rows = slice(world.rank * share, (world.rank + 1) * share)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = torch.randint(len(self.data), (self.B,), generator=self.gen)
        rows = picked[self.rows].to(self.data.y.device)
        x = self.augment(to_float(self.data.x[rows]), self.gen, self.B, self.rows)
        return x, self.data.y[rows]


@torch.no_grad()
def score(model: nn.Module, data: ImageData, labels: list[str], batch_size: int = 256
          ) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 over a whole split (eval mode, no augmentation)."""
    from bigmodel.tasks.seq_cls import classification_scores

    was_training = model.training
    model.eval()
    loss_sum, predicted = 0.0, []
    for i in range(0, len(data), batch_size):
        logits = model(to_float(data.x[i : i + batch_size])).float()
        loss_sum += F.cross_entropy(logits, data.y[i : i + batch_size], reduction="sum").item()
        predicted.append(logits.argmax(-1))
    model.train(was_training)
    pred, y = torch.cat(predicted).cpu().tolist(), data.y.cpu().tolist()
    s = classification_scores([labels[i] for i in y], [labels[i] for i in pred], labels,
                              per_class=False)
    return {"loss": loss_sum / len(data), **s}


class ImageCls:
    unit = "images"
    select = SELECT

    def __init__(self, spec: Any, train: ImageData, val: ImageData, labels: list[str], seed: int,
                 world: World | None = None, key: str = "batch_size"):
        self.labels, self.train, self.val = labels, train, val
        self.smoothing = spec.label_smoothing
        self.sampler = ImageSampler(train, spec.batch_size, seed,
                                    Augment(spec.augment.crop_padding, spec.augment.flip), world, key)
        g = torch.Generator().manual_seed(seed + 1)
        picked = torch.randperm(len(train), generator=g)[:TRAIN_SAMPLE].to(train.y.device)
        self.sample = ImageData.__new__(ImageData)
        self.sample.x, self.sample.y = train.x[picked], train.y[picked]
        self.units_per_step = spec.batch_size * spec.grad_accum

    def __len__(self) -> int:
        return len(self.train)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler()

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y, label_smoothing=self.smoothing)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        v = score(model, self.val, self.labels)
        t = score(model, self.sample, self.labels)
        return {"val_loss": v["loss"], "val_accuracy": v["accuracy"], "val_macro_f1": v["macro_f1"],
                "train_eval_loss": t["loss"], "train_accuracy": t["accuracy"]}

    def flops_per_unit(self, model: nn.Module) -> float:
        return model.flops_per_image()


def table_data(table: pd.DataFrame, labels: list[str], device: torch.device) -> ImageData:
    """A prepared image table (bigmodel/data/images.py), rows of `labels` only."""
    from bigmodel.data import images

    table = table[table["label"].isin(labels)]
    if table.empty:
        raise BigModelError(f"no images of the classes {labels}")
    index = {label: i for i, label in enumerate(labels)}
    pixels = images.pixels_of(table, images.shape_of(table))
    return ImageData(pixels, np.array([index[v] for v in table["label"]]), device)


def array_data(tokens: Path, split: str, all_labels: list[str], labels: list[str],
               device: torch.device) -> ImageData:
    """The tokenize stage's arrays of one split, the images of `labels` only (re-indexed)."""
    pixels, y = np.load(tokens / f"{split}_images.npy"), np.load(tokens / f"{split}_labels.npy")
    new = np.full(len(all_labels), -1)
    for i, label in enumerate(labels):
        new[all_labels.index(label)] = i
    keep = new[y] >= 0
    return ImageData(pixels[keep], new[y][keep], device)


def make_pretrain(spec: Any, tokens: Path, all_labels: list[str], labels: list[str], key: str,
                  seed: int, device: torch.device, world: World) -> ImageCls:
    """The pretrain stage's objective, on the tokenize stage's arrays (`tokens` is their
    folder), restricted to the run's classes."""
    train = array_data(tokens, "train", all_labels, labels, device)
    val = array_data(tokens, "val", all_labels, labels, device)
    return ImageCls(spec, train, val, labels, seed, world, key=f"{key}.batch_size")


def make(spec: Any, train: pd.DataFrame, val: pd.DataFrame, tok: Any, labels: list[str],
         seed: int, device: torch.device) -> ImageCls:
    """The finetune stage's objective, on prepared tables (`tok` is unused: images have none)."""
    return ImageCls(spec, table_data(train, labels, device), table_data(val, labels, device),
                    labels, seed)


def labels_of(train: pd.DataFrame) -> list[str]:
    return sorted(train["label"].unique())
