"""Stage `tokenize@<pretrain run>`: encode the run's corpus with the run's tokenizer into one
flat token file per split, or, for an objective that trains on (source, target) pairs
(`LAYOUT = "pairs"` in its module), one file per side of the pairs (the layouts:
bigmodel/text/shards.py). For a ResNet run, its corpus's images as memory-mappable arrays:
{split}_images.npy (N, H, W, C) uint8 and {split}_labels.npy (indices into meta.json's
`labels`), checked against the run's image processor (bigmodel/data/images.py); which of the
classes it trains on is the pretrain stage's choice (`classes`), so changing them reruns
that stage alone."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from bigmodel import tracking
from bigmodel.config import SPLIT_NAMES, Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, read_parquet, reading_parquet, sha256_file, write_json
from bigmodel.stages import param_keys
from bigmodel.text.tokenizers import load as load_tokenizer


def run(params: Params, name: str) -> str:
    spec = params.pretrain[name]
    prepared = params.path("data", spec.corpus) / "prepared"
    if spec.family == "resnet":
        return run_images(params, name, prepared)
    tok_file = params.path("tokenizer", spec.tokenizer) / "tokenizer.json"
    tok = load_tokenizer(tok_file)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    meta: dict[str, object] = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "tokenizer": spec.tokenizer,
        "tokenizer_sha256": sha256_file(tok_file),
        "splits": {},
    }
    layout = getattr(importlib.import_module(f"bigmodel.objectives.{spec.objective}"), "LAYOUT",
                     "stream")
    meta["layout"] = layout
    out = params.path("tokens", name)
    if layout == "pairs":
        return run_pairs(params, name, tok, prepared, out, meta, dtype)
    with tracking.stage_run(f"tokenize@{name}", params, param_keys(params, "tokenize", name)) as mlrun, \
            atomic_path(out) as tmp:
        tmp.mkdir()
        for split in SPLIT_NAMES:
            src = prepared / f"pretrain_{split}.parquet"
            if not src.is_file():
                raise BigModelError(f"{src}: not found (run `bigmodel prepare --name "
                                    f"{spec.corpus}` first)")
            n_tokens, n_bytes, starts = encode_file(tok, src, tmp / f"{split}.bin", dtype,
                                                    params.tokenize.batch_size)
            np.save(tmp / f"{split}_docs.npy", starts)
            meta["splits"][split] = {"tokens": n_tokens, "bytes": n_bytes,  # type: ignore[index]
                                     "documents": len(starts)}
            mlrun.metrics({f"{split}_tokens": n_tokens,
                           f"{split}_bytes_per_token": n_bytes / max(n_tokens, 1)})
        write_json(tmp / "meta.json", meta)
    write_json(params.metrics_file("tokenize", name),
               {f"{s}_tokens": v["tokens"] for s, v in meta["splits"].items()})  # type: ignore[union-attr]
    train = meta["splits"]["train"]  # type: ignore[index]
    return f"train {train['tokens']:,} tokens in {train['documents']:,} documents ({meta['dtype']})"


def encode_file(tok: Tokenizer, src: Path, dst: Path, dtype: type, batch_size: int
                ) -> tuple[int, int, np.ndarray]:
    """Encode in batches (the Rust encoder runs them in parallel) and append each batch as one
    flat array; returns (tokens written, UTF-8 bytes of the text, document start offsets)."""
    n_tokens = n_bytes = 0
    starts: list[int] = []
    with open(dst, "wb") as f, reading_parquet(src):
        for batch in pq.ParquetFile(src).iter_batches(batch_size=batch_size, columns=["text"]):
            texts = batch.column(0).to_pylist()
            ids = [doc_ids(e.ids, tok) for e in tok.encode_batch(texts)]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            starts.extend((n_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])).tolist())
            count = int(lengths.sum())
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=count)
            f.write(flat.tobytes())
            n_tokens += count
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
    return n_tokens, n_bytes, np.asarray(starts, dtype=np.int64)


def doc_ids(ids: list[int], tok: Tokenizer) -> list[int]:
    """A document's tokens in the stream: GPT's end with <|endoftext|> as encoded; BERT's drop
    the leading [CLS] (each training window adds its own) and keep the closing [SEP]."""
    cls = tok.token_to_id("[CLS]")
    return ids[1:] if cls is not None and ids and ids[0] == cls else ids


def run_pairs(params: Params, name: str, tok: Tokenizer, prepared: Path, out: Path,
              meta: dict[str, object], dtype: type) -> str:
    """Each split's `seq2seq_<split>.parquet` → {split}_src/_tgt .bin and offset files."""
    with tracking.stage_run(f"tokenize@{name}", params, param_keys(params, "tokenize", name)) as mlrun, \
            atomic_path(out) as tmp:
        tmp.mkdir()
        for split in SPLIT_NAMES:
            src = prepared / f"seq2seq_{split}.parquet"
            if not src.is_file():
                raise BigModelError(f"{src}: not found: data.{params.pretrain[name].corpus} has "
                                    f"no (source, target) pairs (see the README: parallel text)")
            with reading_parquet(src):
                table = pq.read_table(src, columns=["source", "target"])
            info: dict[str, int] = {"pairs": table.num_rows}
            for side, column in (("src", "source"), ("tgt", "target")):
                texts = table.column(column).to_pylist()
                ids = [e.ids for e in tok.encode_batch(texts)]  # each ends with <|endoftext|>
                lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                np.save(tmp / f"{split}_{side}.npy", np.concatenate([[0], np.cumsum(lengths)]))
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                                   count=int(lengths.sum()))
                (tmp / f"{split}_{side}.bin").write_bytes(flat.tobytes())
                info[f"{side}_tokens"] = int(lengths.sum())
            info["tokens"] = info["tgt_tokens"]
            info["bytes"] = sum(len(t.encode("utf-8")) for t in table.column("target").to_pylist())
            meta["splits"][split] = info  # type: ignore[index]
            mlrun.metrics({f"{split}_{k}": v for k, v in info.items() if k != "bytes"})
        write_json(tmp / "meta.json", meta)
    write_json(params.metrics_file("tokenize", name),
               {f"{s}_{k}": v[k] for s, v in meta["splits"].items()  # type: ignore[union-attr]
                for k in ("pairs", "src_tokens", "tgt_tokens")})
    train = meta["splits"]["train"]  # type: ignore[index]
    return (f"train {train['pairs']:,} pairs: {train['src_tokens']:,} source and "
            f"{train['tgt_tokens']:,} target tokens ({meta['dtype']})")


def run_images(params: Params, name: str, prepared: Path) -> str:
    from bigmodel.data import images

    spec = params.pretrain[name]
    proc_dir = params.path("tokenizer", spec.tokenizer)
    processor = images.read_processor(proc_dir)
    out = params.path("tokens", name)
    with tracking.stage_run(f"tokenize@{name}", params, param_keys(params, "tokenize", name)) as mlrun, \
            atomic_path(out) as tmp:
        tmp.mkdir()
        tables = {}
        for split in SPLIT_NAMES:
            src = prepared / f"image_cls_{split}.parquet"
            if not src.is_file():
                raise BigModelError(f"{src}: not found (run `bigmodel prepare --name "
                                    f"{spec.corpus}` first)")
            tables[split] = read_parquet(src)
        labels = sorted(tables["train"]["label"].unique())
        meta: dict[str, object] = {"layout": "images", "labels": labels,
                                   "processor_sha256": sha256_file(proc_dir / "processor.json"),
                                   **{k: processor[k] for k in ("size", "channels", "mean", "std")},
                                   "splits": {}}
        for split, table in tables.items():
            table = table[table["label"].isin(labels)]  # a class train lacks cannot be learnt
            if table.empty:
                raise BigModelError(f"{prepared}: the {split} split has no images of the train "
                                    f"split's classes")
            shape = images.shape_of(table)
            if shape != (processor["size"], processor["size"], processor["channels"]):
                raise BigModelError(f"{prepared / f'image_cls_{split}.parquet'}: images of "
                                    f"{shape} but the processor "
                                    f"{spec.tokenizer!r} was fitted on "
                                    f"{processor['size']}×{processor['size']}×{processor['channels']}")
            np.save(tmp / f"{split}_images.npy", images.pixels_of(table, shape))
            index = {label: i for i, label in enumerate(labels)}
            np.save(tmp / f"{split}_labels.npy", np.array([index[v] for v in table["label"]], np.int64))
            meta["splits"][split] = {"images": len(table)}  # type: ignore[index]
            mlrun.metrics({f"{split}_images": len(table)})
        write_json(tmp / "meta.json", meta)
    write_json(params.metrics_file("tokenize", name),
               {f"{s}_images": v["images"] for s, v in meta["splits"].items()})  # type: ignore[union-attr]
    train = meta["splits"]["train"]  # type: ignore[index]
    return f"train {train['images']:,} images of {len(labels)} classes ({', '.join(labels)})"
