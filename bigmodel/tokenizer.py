"""Stage `tokenizer`: train a tokenizer (HF `tokenizers`) on the train split only.

`kind: bpe` — byte-level BPE with `vocab_size` entries (any byte sequence stays encodable).
`kind: char` — one token per character seen in the train split, plus `<|unk|>` for the rest
(nanoGPT's character-level setup, for like-for-like comparisons; bits per byte compares either).

Output: `paths.tokenizer`/tokenizer.json (every document encodes to its tokens followed by
`<|endoftext|>`); metrics/tokenizer.json (vocabulary, bytes per token on val).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, write_json

EOT = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = [EOT, PAD]


def run(params: Params) -> str:
    cfg = params.tokenizer
    prepared, out = params.path("prepared"), params.path("tokenizer")
    with tracking.stage_run("tokenizer", params, ["tokenizer"]) as mlrun:
        texts = iter_texts(prepared / "pretrain_train.parquet")
        tok = (train_char(texts) if cfg.kind == "char" else
               train(texts, cfg.vocab_size, cfg.min_frequency))
        metrics = {
            "vocab_size": tok.get_vocab_size(),
            "val_bytes_per_token": bytes_per_token(tok, prepared / "pretrain_val.parquet"),
        }
        with atomic_path(out) as tmp:
            tmp.mkdir()
            tok.save(str(tmp / "tokenizer.json"))
        write_json(params.metrics_file("tokenizer"), metrics)
        mlrun.metrics(metrics)
        mlrun.artifact(out / "tokenizer.json", "tokenizer")
    return f"vocab {metrics['vocab_size']}, {metrics['val_bytes_per_token']:.2f} bytes/token on val"


def train(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _end_with_eot(tok)


def train_char(texts: Iterator[str]) -> Tokenizer:
    """A character-level tokenizer: every character of the training texts is one token."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, UNK, *sorted(chars)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([*SPECIAL_TOKENS, UNK])
    return _end_with_eot(tok)


def _end_with_eot(tok: Tokenizer) -> Tokenizer:
    eot = tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOT}", special_tokens=[(EOT, eot)]
    )
    return tok


def load(path: Path) -> Tokenizer:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise BigModelError(f"{file}: tokenizer not found (run `bigmodel tokenizer` first)")
    return Tokenizer.from_file(str(file))


def iter_texts(parquet: Path, batch_rows: int = 256) -> Iterator[str]:
    if not parquet.is_file():
        raise BigModelError(f"{parquet}: not found (run `bigmodel prepare` first)")
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=batch_rows, columns=["text"]):
        yield from batch.column(0).to_pylist()


def bytes_per_token(tok: Tokenizer, parquet: Path) -> float:
    texts = list(iter_texts(parquet))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(e.ids) - 1 for e in tok.encode_batch(texts))  # minus the appended EOT
    return n_bytes / max(n_tokens, 1)
