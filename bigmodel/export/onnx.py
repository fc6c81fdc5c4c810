"""ONNX files of the classifiers, the tagger and the ResNet, through `torch.onnx.export`.

The graph is the model as it serves (exported through torch.export, whose exporter needs
onnxscript): a text model takes `input_ids` (batch, sequence; int64,
right-padded) and `lengths` (batch; the real tokens of each row) and gives `logits` (batch,
classes) or (batch, sequence, tags); a ResNet takes `pixels` (batch, channels, height, width;
float in [0, 1], normalised inside, as the served model takes them) and gives `logits`. Batch
and sequence (a ResNet's batch, height and width) are dynamic axes. `tokenizer.json` or
`processor.json` and `labels.json` go beside `model.onnx`.
"""

from __future__ import annotations

import contextlib
import io
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


class _Image(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


def check_exportable(info: dict[str, Any]) -> None:
    if info["task"] not in ("seq_cls", "token_cls", "image_cls"):
        raise BigModelError(f"--format onnx exports classifiers, taggers and ResNets; this is a "
                            f"{info['family']} {info['task']} model (use --format hf for a "
                            f"pretrained GPT or BERT)")


def export(model: nn.Module, info: dict[str, Any], sample: tuple[torch.Tensor, ...],
           file: Path) -> None:
    """torch.onnx.export through torch.export (the exporter torch maintains), with the
    dynamic axes as torch.export dimensions; a text model's sequence is at most its
    block_size (positions are learned or tabled up to there)."""
    check_exportable(info)
    model = model.eval()
    batch = torch.export.Dim("batch")
    if info["task"] == "image_cls":
        wrapped: nn.Module = _Image(model)
        names = ["pixels"]
        shapes: dict[str, Any] = {"pixels": {0: batch, 2: torch.export.Dim("height", min=8),
                                             3: torch.export.Dim("width", min=8)}}
    else:
        wrapped, names = _Text(model), ["input_ids", "lengths"]
        sequence = torch.export.Dim("sequence", max=int(info["arch"]["block_size"]))
        shapes = {"input_ids": {0: batch, 1: sequence}, "lengths": {0: batch}}
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own deprecations
            torch.onnx.export(wrapped, sample, str(file), input_names=names,
                              output_names=["logits"], dynamic_shapes=shapes,
                              opset_version=OPSET, dynamo=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter's own error, with its report
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BigModelError(f"torch.onnx.export failed: {first}; nothing was written") from e


def run(file: Path, inputs: dict[str, Any]) -> Any:
    """The file's `logits` under onnxruntime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {k: v.numpy() if torch.is_tensor(v) else v
                                    for k, v in inputs.items()})[0]
