"""Stage `finetune`: the pretrained GPT body + a classification head, trained on the labelled set.

Output: `paths.finetune`/ model.safetensors, config.json (architecture, labels, max_len) and
tokenizer.json — a self-contained folder that `bigmodel.predict.TextClassifier` loads; the model
is also logged to MLflow as a pyfunc and registered. metrics/finetune.json; plots/finetune.csv.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, write_json
from bigmodel.models import gpt as gpt_lib
from bigmodel.predict import encode_texts
from bigmodel.tokenizer import load as load_tokenizer
from bigmodel.train.trainer import History, Trainer, seed_everything

TRAIN_ACC_SAMPLE = 1000  # training accuracy is measured on this many fixed training examples


class Encoded:
    """A labelled split as padded token ids on the device."""

    def __init__(self, table: pd.DataFrame, tok, labels: list[str], max_len: int,  # noqa: ANN001
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
    """Shuffled mini-batches, epoch after epoch, from a seeded generator."""

    def __init__(self, data: Encoded, batch_size: int, seed: int):
        self.data, self.bs = data, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.empty(0, dtype=torch.long), 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.pos >= len(self.order):
            self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
        rows = self.order[self.pos : self.pos + self.bs].to(self.data.ids.device)
        self.pos += self.bs
        return self.data.batch(rows)


def ce_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, lengths, y = batch
    return F.cross_entropy(model(ids, lengths).float(), y)


@torch.no_grad()
def score(model: torch.nn.Module, data: Encoded, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over a whole split."""
    loss_sum, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, lengths, y = data.batch(torch.arange(i, min(i + batch_size, len(data)),
                                                  device=data.ids.device))
        logits = model(ids, lengths).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return loss_sum / len(data), correct / len(data)


def run(params: Params) -> str:
    cfg = params.finetune
    seed_everything(params.seed)
    prepared, pre_dir, out = params.path("prepared"), params.path("pretrain"), params.path("finetune")
    train_t, val_t = (read_split(prepared, s) for s in ("train", "val"))
    pre_cfg = gpt_lib.read_config(pre_dir)["gpt"]
    if cfg.max_len > pre_cfg["block_size"]:
        raise BigModelError(f"finetune.max_len ({cfg.max_len}) exceeds the pretrained model's "
                            f"block_size ({pre_cfg['block_size']})")
    labels = sorted(train_t["label"].unique())
    gcfg = gpt_lib.GPTConfig(**{**pre_cfg, "dropout": cfg.dropout})
    gpt = gpt_lib.GPT(gcfg)
    gpt_lib.load_weights(gpt, pre_dir)
    model = gpt_lib.GPTClassifier(gpt, len(labels), cfg.dropout)

    steps_per_epoch = math.ceil(len(train_t) / (cfg.batch_size * cfg.grad_accum))
    trainer = Trainer(model, cfg, cfg.epochs * steps_per_epoch)
    tok = load_tokenizer(params.path("tokenizer"))
    train = Encoded(train_t, tok, labels, cfg.max_len, trainer.device)
    val = Encoded(val_t, tok, labels, cfg.max_len, trainer.device)
    sample = Encoded(train_t.sample(min(TRAIN_ACC_SAMPLE, len(train_t)), random_state=params.seed),
                     tok, labels, cfg.max_len, trainer.device)

    def evaluate() -> dict[str, float]:
        val_loss, val_acc = score(model, val, cfg.batch_size)
        train_loss, train_acc = score(model, sample, cfg.batch_size)
        return {"epoch": trainer.step / steps_per_epoch, "val_loss": val_loss, "val_accuracy": val_acc,
                "train_eval_loss": train_loss, "train_accuracy": train_acc}

    with tracking.stage_run("finetune", params, ["seed", "finetune"]) as mlrun:
        mlrun.metrics({"train_examples": len(train), "val_examples": len(val),
                       "n_classes": len(labels)})
        history = History(mlrun.metrics)
        result = trainer.fit(
            EpochBatches(train, cfg.batch_size, params.seed), ce_loss,
            evaluate=evaluate, eval_interval=steps_per_epoch,
            log=history, log_interval=max(1, steps_per_epoch // 4),
            tokens_per_step=cfg.batch_size * cfg.max_len * cfg.grad_accum,
        )
        with atomic_path(out) as tmp:
            gpt_lib.save(model.to("cpu"), gcfg, tmp, {"labels": labels, "max_len": cfg.max_len})
            shutil.copy(params.path("tokenizer") / "tokenizer.json", tmp / "tokenizer.json")
        metrics = {k: v for k, v in result.eval_metrics.items() if k != "epoch"}
        metrics.update(seconds=result.seconds, epochs=cfg.epochs)
        write_json(params.metrics_file("finetune"), metrics)
        history.write_csv(params.plot_file("finetune"),
                          ["train_loss", "val_loss", "train_accuracy", "val_accuracy"])
        mlrun.artifact(params.plot_file("finetune"), "plots")
        version = mlrun.log_classifier(out, params.tracking.registered_model,
                                       example=val_t["text"].head(2).tolist())
    return (f"val accuracy {metrics['val_accuracy']:.3f} after {cfg.epochs} epochs; "
            f"registered {params.tracking.registered_model} v{version}")


def read_split(prepared, split: str) -> pd.DataFrame:  # noqa: ANN001
    path = prepared / f"labelled_{split}.parquet"
    if not path.is_file():
        raise BigModelError(f"{path}: no labelled data (the prepare source has no labels; set "
                            "prepare.files.label_column or prepare.hf.label_column)")
    return pd.read_parquet(path)
