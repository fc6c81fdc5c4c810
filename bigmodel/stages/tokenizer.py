"""Stage `tokenizer@<run>`: train a tokenizer (bpe, wordpiece or char; bigmodel/text/tokenizers.py)
on the train split of the run's data, only: its pretraining documents, or (text: seq2seq) the
source and the target side of its pairs, for one joint vocabulary.

Output: `models/tokenizer/<run>/tokenizer.json`; metrics/tokenizer/<run>.json (vocabulary, bytes
per token on val). An image processor (kind: image) is fitted instead on the train images of an
image data run: `models/tokenizer/<run>/processor.json` (side, channels, per-channel mean and
std).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, read_parquet, reading_parquet, write_json
from bigmodel.stages import param_keys
from bigmodel.text import tokenizers


def run(params: Params, name: str) -> str:
    cfg = params.tokenizer[name]
    prepared, out = params.path("data", cfg.data) / "prepared", params.path("tokenizer", name)
    if cfg.kind == "image":
        return run_processor(params, name, prepared, out)
    with tracking.stage_run(f"tokenizer@{name}", params, param_keys(params, "tokenizer", name)) as mlrun:
        texts = iter_texts(prepared / f"{cfg.text}_train.parquet")
        tok = tokenizers.train(cfg.kind, texts, cfg.vocab_size, cfg.min_frequency,
                               cfg.pieces)
        metrics = {
            "vocab_size": tok.get_vocab_size(),
            "val_bytes_per_token": bytes_per_token(tok, prepared / f"{cfg.text}_val.parquet"),
        }
        with atomic_path(out) as tmp:
            tmp.mkdir()
            tok.save(str(tmp / "tokenizer.json"))
        write_json(params.metrics_file("tokenizer", name), metrics)
        mlrun.metrics(metrics)
        mlrun.artifact(out / "tokenizer.json", "tokenizer")
    return (f"{cfg.kind}: vocab {metrics['vocab_size']}, {metrics['val_bytes_per_token']:.2f} "
            f"bytes/token on val")


def run_processor(params: Params, name: str, prepared: Path, out: Path) -> str:
    """An image processor: the train images' side, channels and per-channel mean and std (a
    ResNet normalises its input with them; measured on train images only)."""
    from bigmodel.data.images import processor_of

    with tracking.stage_run(f"tokenizer@{name}", params, param_keys(params, "tokenizer", name)) as mlrun:
        train = prepared / "image_cls_train.parquet"
        if not train.is_file():
            raise BigModelError(f"{train}: not found (run `bigmodel prepare --name "
                                f"{params.tokenizer[name].data}` first)")
        processor = processor_of(read_parquet(train))
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write_json(tmp / "processor.json", processor)
        metrics = {"size": processor["size"], "channels": processor["channels"],
                   **{f"mean_{i}": v for i, v in enumerate(processor["mean"])},
                   **{f"std_{i}": v for i, v in enumerate(processor["std"])}}
        write_json(params.metrics_file("tokenizer", name), metrics)
        mlrun.metrics(metrics)
        mlrun.artifact(out / "processor.json", "tokenizer")
    return (f"image: {processor['size']}×{processor['size']}×{processor['channels']}, mean "
            f"{', '.join(f'{v:.3f}' for v in processor['mean'])}, std "
            f"{', '.join(f'{v:.3f}' for v in processor['std'])}")


def iter_texts(parquet: Path, batch_rows: int = 256) -> Iterator[str]:
    """Every text of a prepared table (both sides of a pairs table)."""
    if not parquet.is_file():
        raise BigModelError(f"{parquet}: not found (run `bigmodel prepare` first; a data run "
                            f"without pairs has no seq2seq tables)")
    with reading_parquet(parquet):
        names = pq.ParquetFile(parquet).schema_arrow.names
        columns = ["text"] if "text" in names else ["source", "target"]  # documents, or pairs
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=batch_rows, columns=columns):
            for column in batch.columns:
                yield from column.to_pylist()


def bytes_per_token(tok: Tokenizer, parquet: Path) -> float:
    texts = list(iter_texts(parquet))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    added = tokenizers.added_per_text(tok)
    n_tokens = sum(len(e.ids) - added for e in tok.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)
