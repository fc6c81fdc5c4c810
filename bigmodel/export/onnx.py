"""ONNX files of the classifiers, the tagger and the ResNet, through `torch.onnx.export`.

The graph is the model as it serves: a text model takes `input_ids` (batch, sequence; int64,
right-padded) and `lengths` (batch; the real tokens of each row) and gives `logits` (batch,
classes) or (batch, sequence, tags); a ResNet takes `pixels` (batch, channels, height, width;
float in [0, 1], normalised inside, as the served model takes them) and gives `logits`. Batch
and sequence (a ResNet's batch, height and width) are dynamic axes. `tokenizer.json` or
`processor.json` and `labels.json` go beside `model.onnx`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.errors import BigModelError

OPSET = 18


class _Text(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, lengths)


def check_exportable(info: dict[str, Any]) -> None:
    if info["task"] not in ("seq_cls", "token_cls", "image_cls"):
        raise BigModelError(f"--format onnx exports classifiers, taggers and ResNets; this is a "
                            f"{info['family']} {info['task']} model (use --format hf for a "
                            f"pretrained GPT or BERT)")


def export(model: nn.Module, info: dict[str, Any], sample: tuple[torch.Tensor, ...],
           file: Path) -> None:
    check_exportable(info)
    model = model.eval()
    if info["task"] == "image_cls":
        wrapped, names = model, ["pixels"]
        axes = {"pixels": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
    else:
        wrapped, names = _Text(model), ["input_ids", "lengths"]
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "lengths": {0: "batch"},
                "logits": {0: "batch", **({1: "sequence"} if info["task"] == "token_cls" else {})}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing (shape-dependent code)
        torch.onnx.export(wrapped, sample, str(file), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def run(file: Path, inputs: dict[str, Any]) -> Any:
    """The file's `logits` under onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {k: v.numpy() if torch.is_tensor(v) else v
                                    for k, v in inputs.items()})[0]
