"""Model families and the self-describing model folder.

A family is a module `bigmodel/models/<family>.py` exposing `Config` (a dataclass) and `Model`
(an nn.Module built from it: a text family with `hidden(idx, lengths)` giving token states,
`blocks`, `attention_maps`, `num_params`, `flops_per_token`; an image family with
`features`, `feature_maps`, `stages`, `num_params`, `flops_per_image`); adding a family adds
that file and nothing here. A model folder holds `model.safetensors`, `config.json` (the family,
the task: `clm`, `mlm`, `seq2seq`, `seq_cls`, `token_cls`, `image_cls`; the architecture and
what the task needs: labels, max_len, pooling) and the inputs' processor (`tokenizer.json`, or
an image model's `processor.json`), so any folder loads with `load_backbone(directory)`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from bigmodel.errors import BigModelError


def family_module(family: str) -> ModuleType:
    try:
        return importlib.import_module(f"bigmodel.models.{family}")
    except ModuleNotFoundError:
        raise BigModelError(f"model family {family!r} is not known (no bigmodel/models/"
                            f"{family}.py)") from None


def arch_config(family: str, values: dict[str, Any]) -> Any:
    """The family's config dataclass from the keys of `values` it has (others are ignored)."""
    cls = family_module(family).Config
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def build(family: str, arch: dict[str, Any] | Any) -> nn.Module:
    """A fresh backbone of `family` from a config dataclass or its dict."""
    mod = family_module(family)
    cfg = arch if isinstance(arch, mod.Config) else mod.Config(**arch)
    return mod.Model(cfg)


def save(model: nn.Module, directory: Path, family: str, task: str, arch: Any,
         extra: dict[str, Any] | None = None) -> None:
    """weights → model.safetensors (a tied matrix stored once), config → config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    info = {"family": family, "task": task, "arch": asdict(arch), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise BigModelError(f"{file}: model config not found")
    try:
        info = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BigModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(info, dict) or not {"family", "task", "arch"} <= set(info):
        raise BigModelError(f"{file}: not a bigmodel model config (needs family, task, arch); "
                            f"written by an older bigmodel? retrain it")
    return info


def load_weights(model: nn.Module, directory: Path, strict: bool = True) -> None:
    file = directory / "model.safetensors"
    if not file.is_file():
        raise BigModelError(f"{file}: model weights not found")
    try:
        missing, unexpected = load_model(model, str(file), strict=strict)
    except (RuntimeError, SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BigModelError(f"{file}: weights do not fit the model in config.json ({first[:200]})") from None
    if strict and (missing or unexpected):
        raise BigModelError(f"{file}: weights do not match the model ({missing or unexpected})")


def load_backbone(directory: Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A pretrained backbone (weights loaded) and its folder's config; `overrides` change
    architecture fields that do not shape weights (dropout)."""
    info = read_config(directory)
    arch = {**info["arch"], **overrides}
    model = build(info["family"], arch)
    load_weights(model, directory)
    return model, {**info, "arch": arch}
