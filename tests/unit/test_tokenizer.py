import numpy as np
import pandas as pd

from bigmodel import config, tokenize
from bigmodel.tokenizer import EOT, bytes_per_token


def test_bpe_roundtrips_code_and_unicode_and_ends_documents_with_eot(tiny_tokenizer):
    text = "def naïve(x):\n\treturn x  # ünïcödé ✓ 漢字\n"
    enc = tiny_tokenizer.encode(text)
    assert enc.ids[-1] == tiny_tokenizer.token_to_id(EOT)
    assert tiny_tokenizer.decode(enc.ids[:-1]) == text
    # bytes never seen in training still encode (byte-level alphabet)
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("\x07 ☃")  .ids[:-1]) == "\x07 ☃"


def test_bytes_per_token_counts_text_bytes_over_tokens_without_eot(tiny_tokenizer, tmp_path):
    texts = ["hello world, hello world", "def add(a, b): return a + b"]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "v.parquet")
    n_tokens = sum(len(tiny_tokenizer.encode(t).ids) - 1 for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert bytes_per_token(tiny_tokenizer, tmp_path / "v.parquet") == n_bytes / n_tokens


def test_tokenize_writes_flat_uint16_shards_equal_to_the_encodings(tiny_tokenizer, tiny_texts, tmp_path):
    params = config.validate({"tokenize": {"batch_size": 7}})
    params._root = tmp_path
    prepared = params.path("prepared")
    prepared.mkdir(parents=True)
    for i, split in enumerate(("train", "val", "test")):
        pd.DataFrame({"text": tiny_texts[i::3]}).to_parquet(prepared / f"pretrain_{split}.parquet")
    params.path("tokenizer").mkdir(parents=True)
    tiny_tokenizer.save(str(params.path("tokenizer") / "tokenizer.json"))
    tokenize.run(params)

    data, meta = tokenize.load_split(params.path("tokens"), "val")
    expected = [i for t in tiny_texts[1::3] for i in tiny_tokenizer.encode(t).ids]
    assert data.dtype == np.uint16
    assert data.tolist() == expected  # batches of 7 joined in order, each doc ending in EOT
    assert meta["splits"]["val"] == {"tokens": len(expected),
                                     "bytes": sum(len(t.encode()) for t in tiny_texts[1::3])}
    assert meta["eot_id"] == tiny_tokenizer.token_to_id(EOT)


def test_char_tokenizer_has_one_token_per_character_and_maps_unseen_ones_to_unk(tmp_path):
    from bigmodel.tokenizer import UNK, train_char

    tok = train_char(iter(["Prince Andrew", "naïve\tpeace\n"]))
    text = "peace Andrew\n"
    enc = tok.encode(text)
    assert enc.tokens[:-1] == list(text) and enc.ids[-1] == tok.token_to_id(EOT)
    assert tok.decode(enc.ids[:-1]) == text
    assert tok.get_vocab_size() == len(set("Prince Andrewnaïve\tpeace\n")) + 3  # + eot, pad, unk
    assert tok.encode("Zq").tokens[:-1] == [UNK, UNK]  # never seen in training
    pd.DataFrame({"text": ["naïve"]}).to_parquet(tmp_path / "v.parquet")
    assert bytes_per_token(tok, tmp_path / "v.parquet") == 6 / 5  # ï: two bytes, one token
