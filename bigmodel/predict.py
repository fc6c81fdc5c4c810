"""Load a finetuned classifier folder and score text: the one inference path shared by evaluate,
explain and the MLflow pyfunc model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from bigmodel.models import gpt as gpt_lib
from bigmodel.tokenizer import PAD, load as load_tokenizer


def encode_texts(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids right-padded to the longest text (≤ max_len, ending in `<|endoftext|>`) and
    each text's length: (N, L) int64, (N,) int64."""
    tok = Tokenizer.from_str(tok.to_str())  # a private copy: truncation/padding are stateful
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=tok.token_to_id(PAD), pad_token=PAD)
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    lengths = np.array([sum(e.attention_mask) for e in enc], dtype=np.int64)
    return ids, lengths


@dataclass
class TextClassifier:
    model: gpt_lib.GPTClassifier
    tokenizer: Tokenizer
    labels: list[str]
    max_len: int

    @classmethod
    def load(cls, directory: Path) -> "TextClassifier":
        cfg = gpt_lib.read_config(directory)
        gpt = gpt_lib.GPT(gpt_lib.GPTConfig(**cfg["gpt"]))
        model = gpt_lib.GPTClassifier(gpt, len(cfg["labels"]), pooling=cfg["pooling"])
        gpt_lib.load_weights(model, directory)
        model.eval()
        return cls(model, load_tokenizer(directory / "tokenizer.json"), cfg["labels"], cfg["max_len"])

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, lengths = encode_texts(self.tokenizer, texts[i : i + batch_size], self.max_len)
            out.append(self.model(torch.from_numpy(ids), torch.from_numpy(lengths)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        logits = torch.from_numpy(self.logits(texts, batch_size))
        return logits.softmax(-1).numpy()
