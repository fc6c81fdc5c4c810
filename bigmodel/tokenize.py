"""Stage `tokenize`: encode every pretraining split into one flat token file per split.

Output (in `paths.tokens`): {train,val,test}.bin (uint16 when the vocabulary fits, else uint32;
documents joined by `<|endoftext|>`), meta.json (dtype, vocab, tokens and UTF-8 bytes per split —
the bytes make bits-per-byte computable from a loss in nats per token).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.data.prepare import SPLITS
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, read_json, sha256_file, write_json
from bigmodel.tokenizer import EOT, load as load_tokenizer


def run(params: Params) -> str:
    prepared, out = params.path("prepared"), params.path("tokens")
    tok_file = params.path("tokenizer") / "tokenizer.json"
    tok = load_tokenizer(tok_file)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    meta: dict[str, object] = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eot_id": tok.token_to_id(EOT),
        "tokenizer_sha256": sha256_file(tok_file),
        "splits": {},
    }
    with tracking.stage_run("tokenize", params, ["tokenize"]) as mlrun, atomic_path(out) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            src = prepared / f"pretrain_{split}.parquet"
            if not src.is_file():
                raise BigModelError(f"{src}: not found (run `bigmodel prepare` first)")
            n_tokens, n_bytes = encode_file(tok, src, tmp / f"{split}.bin", dtype,
                                            params.tokenize.batch_size)
            meta["splits"][split] = {"tokens": n_tokens, "bytes": n_bytes}  # type: ignore[index]
            mlrun.metrics({f"{split}_tokens": n_tokens, f"{split}_bytes_per_token": n_bytes / n_tokens})
        write_json(tmp / "meta.json", meta)
    write_json(params.metrics_file("tokenize"),
               {f"{s}_tokens": v["tokens"] for s, v in meta["splits"].items()})  # type: ignore[union-attr]
    train = meta["splits"]["train"]  # type: ignore[index]
    return f"train {train['tokens']:,} tokens ({meta['dtype']})"


def encode_file(tok, src: Path, dst: Path, dtype: type, batch_size: int) -> tuple[int, int]:  # noqa: ANN001
    """Encode in batches (the Rust encoder runs them in parallel) and append each batch as one
    flat array; returns (tokens written, UTF-8 bytes of the text)."""
    n_tokens = n_bytes = 0
    with open(dst, "wb") as f:
        for batch in pq.ParquetFile(src).iter_batches(batch_size=batch_size, columns=["text"]):
            texts = batch.column(0).to_pylist()
            ids = [e.ids for e in tok.encode_batch(texts)]
            count = sum(map(len, ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=count)
            f.write(flat.tobytes())
            n_tokens += count
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    return n_tokens, n_bytes


def load_split(tokens_dir: Path, split: str) -> tuple[np.memmap, dict]:
    """Memory-map one split's tokens; returns (tokens, meta)."""
    meta_file = tokens_dir / "meta.json"
    if not meta_file.is_file():
        raise BigModelError(f"{meta_file}: not found (run `bigmodel tokenize` first)")
    meta = read_json(meta_file)
    data = np.memmap(tokens_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
    return data, meta
