"""`bigmodel export <name> --format hf|onnx --out DIR`: a trained model, out of bigmodel.

`name` is a pretrain or finetune run of params.yaml; its model folder (models/pretrain/<name>,
models/finetune/<name>) is what goes out. `hf` writes a transformers model folder
(bigmodel.export.hf: `from_pretrained` loads it offline); `onnx` writes model.onnx
(bigmodel.export.onnx). Before anything is kept, the export is loaded back (transformers'
`from_pretrained`, or onnxruntime) and its logits are compared with ours on sample inputs: more
than TOLERANCE apart and nothing is written. DIR must be new or empty; it appears whole or not
at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path

FORMATS = ("hf", "onnx")
TOLERANCE = 1e-4
SAMPLE_TEXTS = ["def read(path): return open(path).read()", "a button on a window",
                "open the file and parse its lines"]


def model_folder(params: Params, name: str) -> Path:
    sections = [s for s in ("pretrain", "finetune") if name in getattr(params, s)]
    if not sections:
        known = sorted({*params.pretrain, *params.finetune})
        raise BigModelError(f"no pretrain or finetune run named {name!r} in params.yaml "
                            f"(known: {', '.join(known)})")
    if len(sections) > 1:
        raise BigModelError(f"{name!r} is both a pretrain and a finetune run; rename one")
    folder = params.path(sections[0], name)
    if not (folder / "config.json").is_file():
        raise BigModelError(f"{folder}: no trained model yet; run `dvc repro "
                            f"{sections[0]}@{name}` first")
    return folder


def load(folder: Path) -> tuple[nn.Module, dict[str, Any], Any]:
    """(our model in eval mode, its folder's config, its tokenizer or None)."""
    from bigmodel.models import heads, registry

    info = registry.read_config(folder)
    if info["task"] in ("seq_cls", "token_cls"):
        model, info = heads.load_finetuned(folder)
    else:
        model, info = registry.load_backbone(folder)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from bigmodel.text.tokenizers import load as load_tokenizer

        tokenizer = load_tokenizer(folder / "tokenizer.json")
    return model.eval(), info, tokenizer


def sample_inputs(model: nn.Module, info: dict[str, Any], tokenizer: Any) -> dict[str, torch.Tensor]:
    """What the exports are checked on: three texts (padded, so padding is part of the check),
    or three images of random pixels."""
    if info["task"] == "image_cls":
        a = info["arch"]
        gen = torch.Generator().manual_seed(0)
        return {"pixels": torch.rand(3, a["in_channels"], a["image_size"], a["image_size"],
                                     generator=gen)}
    from bigmodel.text.tokenizers import encode_texts

    max_len = min(int(info.get("max_len") or info["arch"]["block_size"]),
                  int(info["arch"]["block_size"]))
    ids, lengths = encode_texts(tokenizer, SAMPLE_TEXTS, max_len)
    return {"input_ids": torch.from_numpy(ids), "lengths": torch.from_numpy(lengths)}


@torch.no_grad()
def our_logits(model: nn.Module, info: dict[str, Any], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    task = info["task"]
    if task == "image_cls":
        out = model(inputs["pixels"])
    elif task == "clm":
        out = model(inputs["input_ids"])[0]
    elif task == "mlm":
        out = model.mlm_logits(model.hidden(inputs["input_ids"], inputs["lengths"]))
    elif task in ("seq_cls", "token_cls"):
        out = model(inputs["input_ids"], inputs["lengths"])
    else:
        raise BigModelError(f"a {info['family']} {task} model has no export")
    return out.float().numpy()


def real_positions(info: dict[str, Any], inputs: dict[str, torch.Tensor]) -> np.ndarray | None:
    """(B, T) True at real tokens, for outputs per token (padding positions mean nothing)."""
    if info["task"] in ("clm", "mlm", "token_cls"):
        ids, lengths = inputs["input_ids"], inputs["lengths"]
        return (torch.arange(ids.size(1))[None, :] < lengths[:, None]).numpy()
    return None


def compare(ours: np.ndarray, theirs: np.ndarray, real: np.ndarray | None, what: str) -> float:
    if ours.shape != theirs.shape:
        raise BigModelError(f"{what} gives logits of shape {theirs.shape}, ours {ours.shape}: "
                            f"a bug in the export; nothing was written")
    diff = np.abs(ours - theirs)
    worst = float((diff[real] if real is not None else diff).max())
    if not worst <= TOLERANCE:
        raise BigModelError(f"{what}'s logits differ from ours by {worst:.2e} (> {TOLERANCE}): "
                            f"a bug in the export; nothing was written")
    return worst


def hf_logits(hf: nn.Module, info: dict[str, Any], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        if info["task"] == "image_cls":
            a = info["arch"]
            mean = torch.tensor(a["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(a["std"]).view(1, -1, 1, 1)
            x = (inputs["pixels"] - mean) / std
            # a gray model went out taking RGB: a gray image is the same value in all three
            x = x.expand(-1, hf.config.num_channels, -1, -1)
            return hf(pixel_values=x).logits.float().numpy()
        ids, lengths = inputs["input_ids"], inputs["lengths"]
        mask = (torch.arange(ids.size(1))[None, :] < lengths[:, None]).long()
        return hf(input_ids=ids, attention_mask=mask).logits.float().numpy()


def export(params: Params, name: str, fmt: str, out: Path) -> str:
    """Write the export; the one-line summary of what was written and how closely it matched."""
    if fmt not in FORMATS:
        raise BigModelError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BigModelError(f"{out}: exists and is not an empty folder; choose a new one "
                            f"(nothing was written)")
    folder = model_folder(params, name)
    model, info, tokenizer = load(folder)
    if fmt == "hf":
        from bigmodel.export import hf as hf_lib

        try:
            import transformers  # noqa: F401
        except ImportError:
            raise BigModelError("--format hf needs transformers: pip install "
                                "'bigmodel[hf]'") from None
        converted, extra = hf_lib.convert(model, info, tokenizer)
        what = type(converted).__name__
    else:
        from bigmodel.export import onnx as onnx_lib

        onnx_lib.check_exportable(info)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BigModelError("--format onnx needs onnx and onnxruntime: pip install "
                                "'bigmodel[hf]'") from None
        what = "model.onnx"
    inputs = sample_inputs(model, info, tokenizer)
    ours = our_logits(model, info, inputs)
    real = real_positions(info, inputs)
    if out.is_dir():
        out.rmdir()  # empty: replaced whole by the atomic move below
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if fmt == "hf":
            hf_lib.save(converted, extra, tmp)
            loaded = type(converted).from_pretrained(tmp, local_files_only=True).eval()
            worst = compare(ours, hf_logits(loaded, info, inputs), real, f"the exported {what}")
        else:
            onnx_lib.export(model, info, tuple(inputs.values()), tmp / "model.onnx")
            worst = compare(ours, onnx_lib.run(tmp / "model.onnx", inputs), real,
                            "onnxruntime on model.onnx")
            for file in ("tokenizer.json", "processor.json"):
                if (folder / file).is_file():
                    shutil.copy(folder / file, tmp / file)
            (tmp / "labels.json").write_text(json.dumps(list(info.get("labels") or [])) + "\n")
    return (f"export@{name}: {what} ({info['family']} {info['task']}) in {out}; logits within "
            f"{worst:.1e} of ours on {len(ours)} sample inputs")
