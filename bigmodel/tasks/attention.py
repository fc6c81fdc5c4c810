"""Attention maps of any backbone, and attention rollout (Abnar & Zuidema, 2020).

Each block's attention is recorded during one forward pass (the explicit-softmax path of
`layers.SelfAttention`), averaged over heads. Rollout follows attention through the layers:
each layer's map plus the identity (the residual path), rows renormalised, multiplied from the
first layer up, so entry (i, j) estimates how much token j flows into token i's last state. A
GPT's maps are lower-triangular (causal); a BERT's are full.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


@torch.no_grad()
def maps(model: nn.Module, backbone: nn.Module, ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Every layer's head-averaged attention (T, T) for the one row of `ids` (1, T)."""
    backbone.attention_maps(True)
    try:
        model(torch.from_numpy(ids), torch.from_numpy(lengths))
        n = int(lengths[0])
        return [b.attn.last_map[0].mean(0)[:n, :n].float().numpy() for b in backbone.blocks]
    finally:
        backbone.attention_maps(False)


def rollout(layer_maps: list[np.ndarray]) -> np.ndarray:
    out = np.eye(layer_maps[0].shape[0])
    for a in layer_maps:
        a = 0.5 * a + 0.5 * np.eye(a.shape[0])
        out = (a / a.sum(-1, keepdims=True)) @ out
    return out


def token_labels(tok: Tokenizer, ids: np.ndarray) -> list[str]:
    return [tok.id_to_token(int(i)).replace("Ġ", "·") for i in ids]


def figure(model: nn.Module, backbone: nn.Module, tok: Tokenizer, ids: np.ndarray,
           lengths: np.ndarray, path: Path) -> list[np.ndarray]:
    """Each layer's map and the rollout, side by side, in one PNG; returns the layer maps."""
    layer_maps = maps(model, backbone, ids, lengths)
    labels = token_labels(tok, ids[0, : int(lengths[0])])
    panels = [*[(f"layer {i} (mean of heads)", m) for i, m in enumerate(layer_maps)],
              ("attention rollout", rollout(layer_maps))]
    ticks = labels if len(labels) <= 40 else []
    heatmaps(panels, ticks, ticks, "key", "query", (4.2 * len(panels), 4.6), path)
    return layer_maps


def heatmaps(panels: list[tuple[str, np.ndarray]], xs: list[str], ys: list[str], xlabel: str,
             ylabel: str, size: tuple[float, float], path: Path, aspect: str = "equal") -> None:
    """Titled maps side by side in one PNG, columns labelled `xs` and rows `ys` (none if empty)."""
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        ax.imshow(m, cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-6), aspect=aspect)
        ax.set_title(title, fontsize=9)
        if xs:
            ax.set_xticks(range(len(xs)), xs, rotation=90, fontsize=6)
            ax.set_yticks(range(len(ys)), ys, fontsize=6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def explain_run(params: Any, name: str, out: Path) -> tuple[dict[str, float], str]:
    """`explain_pretrained` of pretrain run `name` on its test token split (GPT and BERT)."""
    from bigmodel.text import shards

    cfg = params.explain
    return explain_pretrained(params.path("pretrain", name),
                              shards.load_split(params.path("tokens", name), "test"),
                              out, cfg.n_examples, cfg.max_len)


def explain_pretrained(model_dir: Path, split: Any, out: Path, n_examples: int,
                       max_len: int) -> tuple[dict[str, float], str]:
    """A pretrained backbone's attention maps and rollout for the first `max_len` tokens of the
    first `n_examples` documents of a token split (GPT and BERT pretrain runs)."""
    from bigmodel.models import registry
    from bigmodel.text.tokenizers import load as load_tokenizer

    info = registry.read_config(model_dir)
    model = registry.build(info["family"], info["arch"])
    registry.load_weights(model, model_dir)
    model.eval()
    tok = load_tokenizer(model_dir / "tokenizer.json")
    starts = np.asarray(split.doc_starts)[:n_examples]
    out.mkdir(parents=True, exist_ok=True)
    block = min(max_len, info["arch"]["block_size"])
    for i, start in enumerate(starts):
        ids = np.asarray(split.tokens[start:start + block], dtype=np.int64)[None, :]
        figure(lambda x, n: model.hidden(x, n), model, tok, ids, np.array([ids.shape[1]]),
               out / f"attention_{i}.png")
    return {"n_examples": len(starts)}, f"attention maps of {len(starts)} test documents"
