import numpy as np
import pandas as pd

from bigmodel import config
from bigmodel.stages import tokenize
from bigmodel.stages.tokenizer import bytes_per_token
from bigmodel.text import shards
from bigmodel.text.tokenizers import EOT, encode_texts, encode_words, specials


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


def tokenized(tmp_path, texts: list[str], tok, tokenizer: str, run: str,  # noqa: ANN001
              batch_size: int = 1024) -> config.Params:
    """`tokenize@<run>` over `texts` split 3 ways (train, val, test, every third text), with
    `tok` saved as tokenizer run `tokenizer`."""
    params = config.validate({"tokenize": {"batch_size": batch_size}})
    params._root = tmp_path
    prepared = params.path("data", "stdlib") / "prepared"
    prepared.mkdir(parents=True)
    for i, split in enumerate(("train", "val", "test")):
        pd.DataFrame({"text": texts[i::3]}).to_parquet(prepared / f"pretrain_{split}.parquet")
    params.path("tokenizer", tokenizer).mkdir(parents=True)
    tok.save(str(params.path("tokenizer", tokenizer) / "tokenizer.json"))
    tokenize.run(params, run)
    return params


def test_tokenize_writes_flat_uint16_shards_equal_to_the_encodings(tiny_tokenizer, tiny_texts, tmp_path):
    params = tokenized(tmp_path, tiny_texts, tiny_tokenizer, "bpe", "gpt", batch_size=7)

    val = shards.load_split(params.path("tokens", "gpt"), "val")
    encodings = [tiny_tokenizer.encode(t).ids for t in tiny_texts[1::3]]
    expected = [i for ids in encodings for i in ids]
    assert val.tokens.dtype == np.uint16
    assert val.tokens.tolist() == expected  # batches of 7 joined in order, each doc ending in EOT
    assert val.n_bytes == sum(len(t.encode()) for t in tiny_texts[1::3])
    assert val.doc_starts.tolist() == np.cumsum([0] + [len(e) for e in encodings[:-1]]).tolist()
    assert shards.read_meta(params.path("tokens", "gpt"))["tokenizer"] == "bpe"


def test_bert_shards_drop_cls_and_end_every_document_with_sep(tiny_wordpiece, tiny_texts, tmp_path):
    params = tokenized(tmp_path, tiny_texts, tiny_wordpiece, "wordpiece", "bert")

    train = shards.load_split(params.path("tokens", "bert"), "train")
    sp = specials(tiny_wordpiece)
    ends = np.append(train.doc_starts[1:], len(train.tokens)) - 1
    assert (train.tokens[ends] == sp.sep).all()
    assert sp.cls not in train.tokens.tolist()
    assert len(train.doc_starts) == len(tiny_texts[0::3])


def test_wordpiece_has_berts_special_tokens_first_and_wraps_texts_in_cls_sep(tiny_wordpiece):
    sp = specials(tiny_wordpiece)
    assert [tiny_wordpiece.id_to_token(i) for i in range(5)] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (sp.pad, sp.cls, sp.sep, sp.mask, sp.n_special) == (0, 2, 3, 4, 5)
    enc = tiny_wordpiece.encode("def add(a, b)")
    assert enc.ids[0] == sp.cls and enc.ids[-1] == sp.sep
    assert "Queue" in tiny_wordpiece.decode(tiny_wordpiece.encode("class Queue").ids)  # cased


def test_encode_texts_pads_right_and_keeps_the_special_tokens_when_truncating(tiny_wordpiece):
    ids, lengths = encode_texts(tiny_wordpiece, ["def add", "def add(a, b): return a + b"], 6)
    sp = specials(tiny_wordpiece)
    assert ids.shape == (2, 6) and lengths.tolist() == [int((ids[0] != sp.pad).sum()), 6]
    assert ids[1, 0] == sp.cls and ids[1, -1] == sp.sep  # truncated, still [CLS] ... [SEP]
    assert (ids[0, lengths[0]:] == sp.pad).all()


def test_encode_words_maps_every_subword_to_its_word(tiny_tokenizer, tiny_wordpiece):
    words = ["def", "naïveword", "(", "a", ")"]
    for tok in (tiny_tokenizer, tiny_wordpiece):
        ids, lengths, word_ids = encode_words(tok, [words], 32)
        real = [w for w in word_ids[0] if w is not None]
        assert sorted(set(real)) == list(range(len(words)))  # every word has a token
        assert real == sorted(real)  # in order
        pieces = {}
        for i, w in zip(ids[0], word_ids[0]):
            if w is not None:
                pieces.setdefault(w, []).append(int(i))
        for w, word in enumerate(words):  # a word's tokens decode back to it
            assert tok.decode(pieces[w]).strip().replace(" ", "") == word.replace(" ", "")


def test_char_tokenizer_has_one_token_per_character_and_maps_unseen_ones_to_unk(tmp_path):
    from bigmodel.text.tokenizers import UNK, train_char

    tok = train_char(iter(["Prince Andrew", "naïve\tpeace\n"]))
    text = "peace Andrew\n"
    enc = tok.encode(text)
    assert enc.tokens[:-1] == list(text) and enc.ids[-1] == tok.token_to_id(EOT)
    assert tok.decode(enc.ids[:-1]) == text
    assert tok.get_vocab_size() == len(set("Prince Andrewnaïve\tpeace\n")) + 4  # + eot, pad, bos, unk
    assert tok.encode("Zq").tokens[:-1] == [UNK, UNK]  # never seen in training
    pd.DataFrame({"text": ["naïve"]}).to_parquet(tmp_path / "v.parquet")
    assert bytes_per_token(tok, tmp_path / "v.parquet") == 6 / 5  # ï: two bytes, one token


def test_code_pieces_give_a_name_the_same_tokens_after_a_space_a_dot_or_a_bracket():
    import pytest

    from bigmodel.errors import BigModelError
    from bigmodel.text.tokenizers import train_bpe

    texts = ["def close(self): return self._selector.close()",
             "LOAD_FAST self LOAD_ATTR _selector LOAD_METHOD close PRECALL CALL RETURN_VALUE"] * 20
    code = train_bpe(iter(texts), vocab_size=300, min_frequency=2, pieces="code")
    plain = train_bpe(iter(texts), vocab_size=300, min_frequency=2)

    def ids(tok, name: str, context: str) -> list[int]:
        enc = tok.encode(context)
        start = context.index(name)
        return [i for i, (a, b) in zip(enc.ids, enc.offsets) if a >= start and b <= start + len(name)]

    contexts = ["x._selector.y", "LOAD_ATTR _selector", "f(_selector)"]
    assert len({tuple(ids(code, "_selector", c)) for c in contexts}) == 1
    assert len({tuple(ids(plain, "_selector", c)) for c in contexts}) > 1  # GPT-2's: " _selector"
    for text in [*texts[:2], "a  =\t[1, 2]\n# ünï ✓"]:
        assert code.decode(code.encode(text).ids[:-1]) == text  # still byte-exact
    with pytest.raises(BigModelError, match="bpe pieces must be one of"):
        train_bpe(iter(texts), vocab_size=300, min_frequency=2, pieces="words")


def test_pieces_other_than_bytelevel_are_a_bpe_setting():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="pieces: code is a bpe setting"):
        config.TokenizerRun(kind="wordpiece", pieces="code")


def test_wordpiece_learns_the_same_vocabulary_in_every_process(tiny_texts):
    # tokenizers' own WordPieceTrainer numbers its `##` pieces in hash-map order, which differs
    # from process to process: the default pipeline's BERT tokenizer differed between two runs
    import subprocess
    import sys

    script = ("import sys\nfrom bigmodel.text.tokenizers import train_wordpiece\n"
              "texts = sys.stdin.read().split('\\x00')\n"
              "print(train_wordpiece(iter(texts), vocab_size=400, min_frequency=1).to_str())")
    corpus = "\x00".join(tiny_texts + ["naïve café — déjà vu", "ZZZ qqq xyzzy"])
    outs = {subprocess.run([sys.executable, "-c", script], input=corpus, capture_output=True,
                           text=True, check=True).stdout for _ in range(4)}
    assert len(outs) == 1


def test_wordpiece_learns_what_berts_trainer_learns_written_with_its_pieces(tiny_texts):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from bigmodel.text.tokenizers import BERT_SPECIALS, train_wordpiece

    texts = tiny_texts + ["naïve café — déjà vu", "ZZZ qqq xyzzy"]
    ours = train_wordpiece(iter(texts), vocab_size=400, min_frequency=1)
    ref = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    ref.normalizer, ref.pre_tokenizer = normalizers.NFC(), pre_tokenizers.BertPreTokenizer()
    ref.train_from_iterator(iter(texts), trainer=trainers.WordPieceTrainer(
        vocab_size=400, min_frequency=1, special_tokens=BERT_SPECIALS, show_progress=False))
    a, b = set(ours.get_vocab()), set(ref.get_vocab())
    # equal counts are common in this small corpus: tokenizers breaks their ties in an order
    # that changes from process to process (7-9 of 225 tokens apart from ours in three tries)
    assert len(a) == len(b) > 200 and len(a - b) <= 0.1 * len(a)
    assert {t for t in a if len(t.removeprefix("##")) == 1} == \
        {t for t in b if len(t.removeprefix("##")) == 1}  # every character, also as a ## piece
    assert "##z" in a and "q" in a  # 'z' only ever inside a word, 'q' also at a word's start
    assert ours.decode(ours.encode("naïve café").ids) == "naïve café"


def test_wordpiece_refuses_a_text_with_its_private_use_stand_ins():
    import pytest

    from bigmodel.errors import BigModelError
    from bigmodel.text.tokenizers import train_wordpiece

    with pytest.raises(BigModelError, match="private use"):
        train_wordpiece(iter(["def f(): pass", "x = '\U000F0001'"]), vocab_size=100,
                        min_frequency=1)
