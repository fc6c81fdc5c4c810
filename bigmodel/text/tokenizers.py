"""Tokenizers (HF `tokenizers`), their special tokens, and how text becomes padded id arrays.

- `bpe`: byte-level BPE with `vocab_size` entries (any byte sequence stays encodable); a text
  encodes to its tokens followed by `<|endoftext|>` (GPT; the encoder-decoder's end of
  sequence, its decoder starting from `<|bos|>`). Its pieces (what merges never cross) are
  GPT-2's (`bytelevel`: a word carries the space before it) or `code`'s (names, numbers, each
  punctuation mark and each run of whitespace apart: a name is the same tokens after a space,
  a dot or a bracket, so a seq2seq model can copy it from source to target).
- `wordpiece`: BERT's WordPiece (lower-casing off: code is case-sensitive), with
  [PAD] [UNK] [CLS] [SEP] [MASK] as ids 0-4; a text encodes to `[CLS] tokens [SEP]`.
- `char`: one token per character seen in the train split plus `<|unk|>` (nanoGPT's
  character-level setup, for like-for-like comparisons; bits per byte compares any of them).

Each tokenizer's own post-processor adds its family's special tokens, so `encode_texts` and
`encode_words` work for any of them; `specials(tok)` names the ids a model needs.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from bigmodel.errors import BigModelError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
BOS = "<|bos|>"  # the first input of a seq2seq decoder
GPT_SPECIALS = [EOT, PAD, BOS]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class Specials:
    """The special-token ids of a tokenizer; absent ones are None."""

    pad: int
    eot: int | None = None  # GPT: end of text (ends every document); seq2seq: end of sequence
    bos: int | None = None  # seq2seq: the decoder's start
    unk: int | None = None
    cls: int | None = None  # BERT
    sep: int | None = None
    mask: int | None = None
    n_special: int = 0  # ids below this are special tokens (WordPiece puts them first)
    vocab_size: int = 0


def specials(tok: Tokenizer) -> Specials:
    if tok.token_to_id("[CLS]") is not None:
        ids = [tok.token_to_id(t) for t in BERT_SPECIALS]
        return Specials(pad=ids[0], unk=ids[1], cls=ids[2], sep=ids[3], mask=ids[4],
                        n_special=max(ids) + 1, vocab_size=tok.get_vocab_size())
    pad = tok.token_to_id(PAD)
    if pad is None:
        raise BigModelError("tokenizer has neither BERT's [PAD] nor GPT's <|pad|> token; "
                            "retrain it with `bigmodel tokenizer`")
    return Specials(pad=pad, eot=tok.token_to_id(EOT), unk=tok.token_to_id(UNK),
                    bos=tok.token_to_id(BOS), n_special=len(GPT_SPECIALS),
                    vocab_size=tok.get_vocab_size())


PIECES = {  # a bpe tokenizer's pre-tokenizer: the pieces that BPE merges never cross
    "bytelevel": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "code": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]),
}


def train(kind: str, texts: Iterator[str], vocab_size: int, min_frequency: int,
          pieces: str = "bytelevel") -> Tokenizer:
    if kind == "char":
        return train_char(texts)
    if kind == "wordpiece":
        return train_wordpiece(texts, vocab_size, min_frequency)
    return train_bpe(texts, vocab_size, min_frequency, pieces)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int,
              pieces: str = "bytelevel") -> Tokenizer:
    if pieces not in PIECES:
        raise BigModelError(f"bpe pieces must be one of {sorted(PIECES)}, not {pieces!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PIECES[pieces]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=GPT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _end_with_eot(tok)


PRIVATE = 0xF0000  # Supplementary Private Use Area-A: stand-ins while WordPiece learns
PRIVATE_END = 0xFFFFE


def train_wordpiece(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """BERT's WordPiece: split on whitespace and punctuation, `##` continuation pieces. No
    lower-casing or accent stripping: code and identifiers are case-sensitive.

    The vocabulary is learnt as `tokenizers`' WordPieceTrainer learns it (BPE merges within
    words, every character also as a `##` piece), but the same in every process. That trainer
    numbers the `##` pieces in the order of a hash map, which differs from process to process,
    and through the numbers its tie-breaking picks different merges (huggingface/tokenizers
    issue 1794): two runs of the default pipeline's tokenizer differed in 2 of 4,096 tokens and
    in 359 ids. Here each character inside a word is first written as a private-use stand-in,
    so that every piece is a single character of the BPE trainer's alphabet, which it sorts;
    the learnt vocabulary is then written back with `##`."""
    nfc, words_of = normalizers.NFC(), pre_tokenizers.BertPreTokenizer()
    stand_in: dict[int, str] = {}  # str.translate's table: a character → its stand-in

    def rewritten() -> Iterator[str]:
        for text in texts:
            text = nfc.normalize_str(text)
            new = {c for c in set(text) if ord(c) not in stand_in}
            if any(PRIVATE <= ord(c) < PRIVATE_END for c in new):
                raise BigModelError("a text holds a character of U+F0000-U+FFFFD (private use), "
                                    "which WordPiece training needs for itself; remove it")
            for c in sorted(new):
                if PRIVATE + len(stand_in) >= PRIVATE_END:
                    raise BigModelError("more than 65,534 distinct characters: too many for "
                                        "WordPiece training")
                stand_in[ord(c)] = chr(PRIVATE + len(stand_in))
            # every new character once as a word of its own: in the alphabet as a word start
            # too, as WordPieceTrainer has every character
            pieces = sorted(new)
            for word, _ in words_of.pre_tokenize_str(text):
                pieces.append(word[0] + word[1:].translate(stand_in))
            yield " ".join(pieces)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(rewritten(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BERT_SPECIALS,
        show_progress=False))
    back = {v: chr(k) for k, v in stand_in.items()}
    vocab = {}
    for token, i in bpe.get_vocab().items():
        if token in BERT_SPECIALS:
            vocab[token] = i
        elif token[0] in back:  # a piece inside a word
            vocab["##" + "".join(back[c] for c in token)] = i
        else:  # a word's first piece
            vocab[token[0] + "".join(back[c] for c in token[1:])] = i
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(BERT_SPECIALS)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def train_char(texts: Iterator[str]) -> Tokenizer:
    """A character-level tokenizer: every character of the training texts is one token."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {t: i for i, t in enumerate([*GPT_SPECIALS, UNK, *sorted(chars)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([*GPT_SPECIALS, UNK])
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
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust library's error for a corrupt file
        raise BigModelError(f"{file}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None


def added_per_text(tok: Tokenizer) -> int:
    """How many special tokens the post-processor adds to one text (1 for GPT, 2 for BERT)."""
    return tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor else 0


def _encode_padded(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[list, np.ndarray, np.ndarray]:
    """(encodings, ids (N, L), lengths (N,)): truncated to max_len, right-padded to the longest."""
    tok = Tokenizer.from_str(tok.to_str())  # a private copy: truncation/padding are stateful
    tok.enable_truncation(max_len)
    pad = specials(tok).pad
    tok.enable_padding(pad_id=pad, pad_token=tok.id_to_token(pad))
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), -1)
    lengths = np.array([sum(e.attention_mask) for e in enc], dtype=np.int64)
    return enc, ids, lengths


def encode_texts(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (with the tokenizer's special tokens) right-padded to the longest text
    (≤ max_len) and each text's length: (N, L) int64, (N,) int64."""
    _, ids, lengths = _encode_padded(tok, texts, max_len)
    return ids, lengths


def encode_words(tok: Tokenizer, sentences: list[list[str]], max_len: int
                 ) -> tuple[np.ndarray, np.ndarray, list[list[int | None]]]:
    """Pre-split words → token ids as `encode_texts` gives them, plus each token's word index
    (None for special tokens and padding). Words are joined by single spaces and mapped back by
    character offsets, so a byte-level BPE sees the spaces it was trained with."""
    texts, spans = [], []
    for words in sentences:
        pos, starts = 0, []
        for w in words:
            starts.append((pos, pos + len(w)))
            pos += len(w) + 1
        texts.append(" ".join(words))
        spans.append(starts)
    enc, ids, lengths = _encode_padded(tok, texts, max_len)
    word_ids: list[list[int | None]] = []
    for e, starts in zip(enc, spans):
        firsts = [a for a, _ in starts]
        row: list[int | None] = []
        for special, (a, b) in zip(e.special_tokens_mask, e.offsets):
            # a token belongs to the word holding its last character (a byte-level BPE token
            # starts at the space before its word); a token of spaces only, to no word
            w = bisect.bisect_right(firsts, b - 1) - 1
            inside = not special and b > a and w >= 0 and b - 1 < starts[w][1]
            row.append(w if inside else None)
        word_ids.append(row)
    return ids, lengths, word_ids
