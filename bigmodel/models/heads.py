"""Task heads on any backbone: a pooled state → class logits, or each token's state → tag
logits. A backbone is any family's Model: `hidden(idx, lengths) -> (B, T, C)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bigmodel.models import registry
from bigmodel.models.layers import ClassificationHead

POOLINGS = ("cls", "pooler", "mean", "last")


class SequenceClassifier(nn.Module):
    """Pooling: the first token's state ("cls": BERT's [CLS]); that state through BERT's
    pooler, dense + tanh ("pooler": the layout of Hugging Face's BertForSequenceClassification,
    so it exports to it; the pretrained pooler when the backbone has one, next-sentence
    pretraining's); the mean over real tokens ("mean"); or the last real token's ("last": with
    causal attention, the one that has read the whole text)."""

    def __init__(self, backbone: nn.Module, n_classes: int, dropout: float = 0.0,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        if pooling == "pooler":
            C = backbone.cfg.n_embd
            self.pooler = nn.Linear(C, C)
            if isinstance(getattr(backbone, "pooler", None), nn.Linear):
                self.pooler.load_state_dict(backbone.pooler.state_dict())
            else:  # as BERT's own init: N(0, 0.02), zero bias
                nn.init.normal_(self.pooler.weight, std=0.02)
                nn.init.zeros_(self.pooler.bias)
        self.head = ClassificationHead(backbone.cfg.n_embd, n_classes, dropout)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.backbone.hidden(idx, lengths)  # (B, T, C)
        if self.pooling == "cls":
            pooled = h[:, 0]  # (B, C)
        elif self.pooling == "pooler":
            pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, C)
        elif self.pooling == "last":
            pooled = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        else:
            real = torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]  # (B, T)
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        return self.head(pooled)  # (B, n_classes)


class TokenClassifier(nn.Module):
    """A tag for every token: (B, T, C) states → (B, T, n_tags) logits."""

    def __init__(self, backbone: nn.Module, n_tags: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = ClassificationHead(backbone.cfg.n_embd, n_tags, dropout)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.hidden(idx, lengths))  # (B, T, n_tags)


def with_head(backbone: nn.Module, info: dict[str, Any], dropout: float = 0.0) -> nn.Module:
    """The finetuned model a folder's config describes, around `backbone`."""
    if info["task"] == "seq_cls":
        return SequenceClassifier(backbone, len(info["labels"]), dropout, info["pooling"])
    if info["task"] == "token_cls":
        return TokenClassifier(backbone, len(info["labels"]), dropout)
    raise ValueError(f"task {info['task']!r} has no head")


def load_finetuned(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A finetuned model folder → the model (eval mode, weights loaded) and its config."""
    info = registry.read_config(directory)
    model = with_head(registry.build(info["family"], info["arch"]), info)
    registry.load_weights(model, directory)
    return model.eval(), info
