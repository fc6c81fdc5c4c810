"""Token shards: each pretraining split as one flat, memory-mapped token array.

Written by the `tokenize` stage into `paths.tokens/<pretrain run>/`: {train,val,test}.bin (uint16
when the vocabulary fits, else uint32; every document followed by its end token, `<|endoftext|>`
for GPT or `[SEP]` for BERT), {split}_docs.npy (each document's start offset, for objectives
that need document boundaries such as next-sentence prediction), and meta.json (dtype,
vocabulary, the tokenizer's sha256, tokens and UTF-8 bytes per split — the bytes make bits per
byte computable from a loss in nats per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigmodel.errors import BigModelError
from bigmodel.io import read_json


@dataclass
class Split:
    tokens: np.ndarray  # (N,) memory-mapped
    doc_starts: np.ndarray  # (D,) int64
    n_bytes: int  # UTF-8 bytes of the text these tokens encode

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(len(self.tokens), 1)


def read_meta(directory: Path) -> dict:
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        raise BigModelError(f"{meta_file}: not found (run `bigmodel tokenize` first)")
    return read_json(meta_file)


def load_split(directory: Path, split: str) -> Split:
    """Memory-map one split's tokens."""
    meta = read_meta(directory)
    info = meta["splits"][split]
    tokens = np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")
    if len(tokens) != info["tokens"]:
        raise BigModelError(f"{directory / f'{split}.bin'}: {len(tokens)} tokens, meta.json says "
                            f"{info['tokens']} (a truncated file? rerun `bigmodel tokenize`)")
    docs = np.load(directory / f"{split}_docs.npy")
    return Split(tokens, docs, int(info["bytes"]))
