"""Token shards: each pretraining split as one flat, memory-mapped token array.

Written by the `tokenize` stage into `paths.tokens/<pretrain run>/`: {train,val,test}.bin (uint16
when the vocabulary fits, else uint32; every document followed by its end token, `<|endoftext|>`
for GPT or `[SEP]` for BERT), {split}_docs.npy (each document's start offset, for objectives
that need document boundaries such as next-sentence prediction), and meta.json (dtype,
vocabulary, the tokenizer's sha256, tokens and UTF-8 bytes per split — the bytes make bits per
byte computable from a loss in nats per token).

A corpus of (source, target) pairs (the seq2seq objective) is laid out as `meta.json` says with
`"layout": "pairs"`: {split}_src.bin and {split}_tgt.bin (each text followed by <|endoftext|>)
with {split}_src.npy / {split}_tgt.npy, each pair's start offsets plus the end (P + 1 entries).
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


@dataclass
class Pairs:
    """A split of (source, target) token pairs; pair i is src[src_offsets[i]:src_offsets[i+1]]."""

    src: np.ndarray  # (N_src,) memory-mapped
    src_offsets: np.ndarray  # (P + 1,) int64
    tgt: np.ndarray
    tgt_offsets: np.ndarray
    n_bytes: int  # UTF-8 bytes of the target texts

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        return np.diff(self.src_offsets)

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.tgt_offsets)

    def source(self, i: int) -> np.ndarray:
        return np.asarray(self.src[self.src_offsets[i]:self.src_offsets[i + 1]], dtype=np.int64)

    def target(self, i: int) -> np.ndarray:
        return np.asarray(self.tgt[self.tgt_offsets[i]:self.tgt_offsets[i + 1]], dtype=np.int64)


def load(directory: Path, split: str) -> Split | Pairs:
    """One split, in the layout meta.json names (a token stream, or pairs)."""
    if read_meta(directory).get("layout", "stream") == "pairs":
        return load_pairs(directory, split)
    return load_split(directory, split)


def load_pairs(directory: Path, split: str) -> Pairs:
    meta = read_meta(directory)
    info = meta["splits"][split]
    sides = []
    for side in ("src", "tgt"):
        offsets = np.load(directory / f"{split}_{side}.npy")
        file = directory / f"{split}_{side}.bin"
        # np.memmap refuses an empty file: a split without pairs reads as no tokens
        tokens = (np.memmap(file, dtype=meta["dtype"], mode="r") if file.stat().st_size
                  else np.zeros(0, dtype=meta["dtype"]))
        if len(tokens) != offsets[-1] or len(offsets) != info["pairs"] + 1:
            raise BigModelError(f"{directory / f'{split}_{side}.bin'}: {len(tokens)} tokens in "
                                f"{len(offsets) - 1} pairs do not match meta.json (a truncated "
                                f"file? rerun `bigmodel tokenize`)")
        sides += [tokens, offsets]
    return Pairs(*sides, n_bytes=int(info["bytes"]))
