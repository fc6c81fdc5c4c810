"""Stage `finetune`: the pretrained GPT body + a classification head, trained on the labelled set.

Output: `paths.finetune`/ model.safetensors, config.json (architecture, labels, max_len) and
tokenizer.json, from the epoch with the best val macro-F1 — a self-contained folder that `bigmodel.predict.TextClassifier` loads; the model
is also logged to MLflow as a pyfunc and registered. metrics/finetune.json; plots/finetune.csv.
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

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
def score(model: torch.nn.Module, data: Encoded, batch_size: int) -> dict[str, float]:
    """Mean loss, accuracy and macro-F1 over a whole split."""
    loss_sum, predicted = 0.0, []
    for i in range(0, len(data), batch_size):
        ids, lengths, y = data.batch(torch.arange(i, min(i + batch_size, len(data)),
                                                  device=data.ids.device))
        logits = model(ids, lengths).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predicted.append(logits.argmax(-1))
    pred, y = torch.cat(predicted).cpu().numpy(), data.y.cpu().numpy()
    return {"loss": loss_sum / len(data), "accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}


class BestEpoch:
    """Keeps the weights of the epoch with the best val macro-F1 (early stopping, in memory)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.best, self.state, self.metrics = model, -1.0, None, {}

    def offer(self, metrics: dict[str, float]) -> None:
        if metrics["val_macro_f1"] > self.best:
            self.best, self.metrics = metrics["val_macro_f1"], dict(metrics)
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> dict[str, float]:
        if self.state is not None:
            self.model.load_state_dict(self.state)
        return self.metrics


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
    model = gpt_lib.GPTClassifier(gpt, len(labels), cfg.dropout, cfg.pooling)

    steps_per_epoch = math.ceil(len(train_t) / (cfg.batch_size * cfg.grad_accum))
    trainer = Trainer(model, cfg, cfg.epochs * steps_per_epoch)
    tok = load_tokenizer(params.path("tokenizer"))
    train = Encoded(train_t, tok, labels, cfg.max_len, trainer.device)
    val = Encoded(val_t, tok, labels, cfg.max_len, trainer.device)
    sample = Encoded(train_t.sample(min(TRAIN_ACC_SAMPLE, len(train_t)), random_state=params.seed),
                     tok, labels, cfg.max_len, trainer.device)

    best = BestEpoch(model)

    def evaluate() -> dict[str, float]:
        v, t = score(model, val, cfg.batch_size), score(model, sample, cfg.batch_size)
        metrics = {"epoch": trainer.step / steps_per_epoch, "val_loss": v["loss"],
                   "val_accuracy": v["accuracy"], "val_macro_f1": v["macro_f1"],
                   "train_eval_loss": t["loss"], "train_accuracy": t["accuracy"]}
        best.offer(metrics)
        return metrics

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
        metrics = best.restore()
        with atomic_path(out) as tmp:
            gpt_lib.save(model.to("cpu"), gcfg, tmp, {"labels": labels, "max_len": cfg.max_len,
                                                "pooling": cfg.pooling})
            shutil.copy(params.path("tokenizer") / "tokenizer.json", tmp / "tokenizer.json")
        metrics.update(best_epoch=metrics.pop("epoch"), seconds=result.seconds, epochs=cfg.epochs)
        write_json(params.metrics_file("finetune"), metrics)
        history.write_csv(params.plot_file("finetune"),
                          ["train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_macro_f1"])
        mlrun.artifact(params.plot_file("finetune"), "plots")
        version = mlrun.log_classifier(out, params.tracking.registered_model,
                                       example=val_t["text"].head(2).tolist())
        write_json(out / "registry.json", {"name": params.tracking.registered_model,
                                           "version": version, "run_id": mlrun.run_id})
    return (f"val macro-F1 {metrics['val_macro_f1']:.3f} (best of {cfg.epochs} epochs: "
            f"{metrics['best_epoch']:.0f}); "
            f"registered {params.tracking.registered_model} v{version}")


def read_split(prepared, split: str) -> pd.DataFrame:  # noqa: ANN001
    path = prepared / f"labelled_{split}.parquet"
    if not path.is_file():
        raise BigModelError(f"{path}: no labelled data (the prepare source has no labels; set "
                            "prepare.files.label_column or prepare.hf.label_column)")
    return pd.read_parquet(path)
