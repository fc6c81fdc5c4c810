"""Stage `finetune@<run>`: the run's pretrained base (any family) + a task head, trained on the
labelled set its task names (`seq_cls_*` or `token_cls_*` of its data run). An image_cls run
takes a pretrained ResNet to its own label set (`classes`): a new classifier, the backbone
trained at a lower LR (`backbone_lr_scale`), frozen (`freeze_backbone`: a linear probe), or
started afresh in the same shape (`from_scratch`: the control that transfer is measured
against).

Output: `models/finetune/<run>/` model.safetensors, config.json (family, task, architecture,
labels, max_len, pooling) and tokenizer.json, from the epoch with the best val score — a
self-contained folder that the task's predictor loads; the model is also logged to MLflow as a
pyfunc and registered as `bigmodel-<run>`. metrics/finetune/<run>.json; plots/finetune/<run>.csv.
"""

from __future__ import annotations

import importlib
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.data.prepared import read_split
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, sha256_file, write_json
from bigmodel.models import heads, registry
from bigmodel.stages import param_keys
from bigmodel.text.tokenizers import load as load_tokenizer
from bigmodel.train.trainer import History, Trainer, seed_everything


class BestEpoch:
    """Keeps the weights of the epoch with the best value of `key` (early stopping, in memory)."""

    def __init__(self, model: torch.nn.Module, key: str):
        self.model, self.key, self.best, self.state, self.metrics = model, key, -1.0, None, {}

    def offer(self, metrics: dict[str, float]) -> None:
        if metrics[self.key] > self.best:
            self.best, self.metrics = metrics[self.key], dict(metrics)
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> dict[str, float]:
        if self.state is not None:
            self.model.load_state_dict(self.state)
        return self.metrics


def run(params: Params, name: str) -> str:
    spec = params.finetune[name]
    seed_everything(params.seed)
    pre_dir, out = params.path("pretrain", spec.base), params.path("finetune", name)
    prepared = params.path("data", spec.data) / "prepared"
    train_t, val_t = (read_split(prepared, spec.task, s, name) for s in ("train", "val"))
    family, found = params.pretrain[spec.base].family, registry.read_config(pre_dir)["family"]
    if found != family:  # a folder copied from another run, or a stale output
        raise BigModelError(f"{pre_dir / 'config.json'}: holds a {found} model, but "
                            f"pretrain.{spec.base} is a {family} run; rerun pretrain@{spec.base}")
    backbone, info = registry.load_backbone(pre_dir, dropout=spec.dropout)
    objective_mod = importlib.import_module(f"bigmodel.objectives.{spec.task}")
    lr_scale = None
    if spec.task == "image_cls":
        inputs, tok = "processor.json", None
        model, labels, head_info, lr_scale = image_model(backbone, info, spec, name, train_t,
                                                         params.seed)
        train_t, val_t = (t[t["label"].isin(labels)] for t in (train_t, val_t))
        if spec.max_per_class:  # a seeded pick of each class's images (few-shot)
            train_t = (train_t.sample(frac=1.0, random_state=params.seed)
                       .groupby("label").head(spec.max_per_class).sort_index())
    else:
        inputs, tok = "tokenizer.json", load_tokenizer(pre_dir / "tokenizer.json")
        check_tokenizer(pre_dir, info)
        pooling = resolve_pooling(spec.pooling, info["family"], name)
        labels = objective_mod.labels_of(train_t)
        head_info = {"task": spec.task, "labels": labels, "max_len": spec.max_len,
                     "pooling": pooling, "base": spec.base,
                     "tokenizer_sha256": info.get("tokenizer_sha256", "")}
        model = heads.with_head(backbone, head_info, spec.dropout)

    steps_per_epoch = math.ceil(len(train_t) / (spec.batch_size * spec.grad_accum))
    trainer = Trainer(model, spec, spec.epochs * steps_per_epoch, label=f"finetune@{name}",
                      lr_scale=lr_scale)
    objective = objective_mod.make(spec, train_t, val_t, tok, labels, params.seed, trainer.device)
    best = BestEpoch(model, objective.select)

    def evaluate() -> dict[str, float]:
        metrics = {"epoch": trainer.step / steps_per_epoch, **objective.evaluate(model)}
        best.offer(metrics)
        return metrics

    with tracking.stage_run(f"finetune@{name}", params, param_keys(params, "finetune", name)) as mlrun:
        mlrun.metrics({"train_examples": len(train_t), "val_examples": len(val_t),
                       "n_labels": len(labels)})
        history = History(mlrun.metrics)
        result = trainer.fit(
            objective.next_batch, objective.loss,
            evaluate=evaluate, eval_interval=steps_per_epoch,
            log=history, log_interval=max(1, steps_per_epoch // 4),
            tokens_per_step=objective.units_per_step, unit=objective.unit,
        )
        metrics = best.restore()
        arch = registry.arch_config(info["family"], {**info["arch"], "dropout": 0.0,
                                                     **getattr(model, "cfg_overrides", {})})
        with atomic_path(out) as tmp:
            registry.save(model.to("cpu"), tmp, info["family"], spec.task, arch, head_info)
            shutil.copy(pre_dir / inputs, tmp / inputs)
        metrics.update(best_epoch=metrics.pop("epoch"), seconds=result.seconds, epochs=spec.epochs)
        write_json(params.metrics_file("finetune", name), metrics)
        history.write_csv(params.plot_file("finetune", name),
                          ["train_loss", *[k for k in metrics if k.startswith("val_")]])
        mlrun.artifact(params.plot_file("finetune", name), "plots")
        registered = params.registered_name(name)
        version = register(mlrun, out, registered, example_texts(val_t) if tok else None,
                           params.serving)
    return (f"{objective.select} {metrics[objective.select]:.3f} (best of {spec.epochs} epochs: "
            f"{metrics['best_epoch']:.0f}); registered {registered} v{version}")


def image_model(backbone: torch.nn.Module, info: dict[str, Any], spec: Any, name: str,
                train: pd.DataFrame, seed: int = 0
                ) -> tuple[torch.nn.Module, list[str], dict[str, Any], Any]:
    """A pretrained ResNet with a fresh classifier for the run's classes (fresh weights all
    through with from_scratch; its backbone frozen with freeze_backbone), and the learning-rate
    scale of each parameter (the backbone's: backbone_lr_scale)."""
    from bigmodel.data.images import selected_labels

    labels = selected_labels(train, spec.classes, f"finetune.{name}.classes")
    if spec.from_scratch:
        seed_everything(seed)  # the same fresh network whatever ran before
        backbone = registry.build(info["family"], {**info["arch"], "dropout": spec.dropout})
    backbone.reset_head(len(labels))
    backbone.freeze_backbone(spec.freeze_backbone)
    backbone.cfg_overrides = {"n_classes": len(labels)}  # what config.json must say of it
    head_info = {"task": spec.task, "labels": labels, "base": spec.base,
                 "from_scratch": spec.from_scratch,
                 "processor_sha256": info.get("processor_sha256", "")}
    scale = spec.backbone_lr_scale

    def lr_scale(param_name: str) -> float:
        return 1.0 if param_name.startswith("fc.") else scale

    return backbone, labels, head_info, lr_scale


def register(mlrun: tracking.StageRun, out: Path, registered: str, example: list[str] | None,
             limits: Any = None) -> str:
    from bigmodel import serving

    with tempfile.TemporaryDirectory() as d:  # the logged copy holds the model files only
        for file in ("model.safetensors", "config.json", "tokenizer.json", "processor.json"):
            if (out / file).is_file():
                shutil.copy(out / file, Path(d) / file)
        version = serving.log_model(mlrun, Path(d), registered, example, limits)
    write_json(out / "registry.json", {"name": registered, "version": version, "run_id": mlrun.run_id})
    return version


def example_texts(val: pd.DataFrame) -> list[str]:
    if "text" in val:
        return val["text"].head(2).tolist()
    return [" ".join(t) for t in val["tokens"].head(2)]


def resolve_pooling(pooling: str, family: str, name: str) -> str:
    if pooling == "auto":
        return "cls" if family == "bert" else "mean"
    if pooling in ("cls", "pooler") and family != "bert":
        raise BigModelError(f"finetune.{name}.pooling = {pooling!r}: a {family} model has no "
                            f"[CLS] token (use mean or last)")
    return pooling


def check_tokenizer(pre_dir: Path, info: dict[str, Any]) -> None:
    """The tokenizer beside the weights must be the one the model was trained with."""
    want = info.get("tokenizer_sha256")
    if want and sha256_file(pre_dir / "tokenizer.json") != want:
        raise BigModelError(f"{pre_dir / 'tokenizer.json'}: not the tokenizer this model was "
                            f"trained with (sha256 differs from config.json); rerun its pretrain")
