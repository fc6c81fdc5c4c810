import numpy as np
import pytest

from bigmodel.tasks import attention, seq_cls
from bigmodel.tasks.seq_cls import TextClassifier
from bigmodel.text.tokenizers import encode_texts


@pytest.mark.parametrize("fixture", ["tiny_classifier_dir", "tiny_bert_classifier_dir"])
def test_shap_values_account_exactly_for_the_logits(fixture, request):
    clf = TextClassifier.load(request.getfixturevalue(fixture))
    texts = ["Open the file and read it", "class Queue: a first-in first-out queue"]
    values = seq_cls.shap_values(clf, texts, max_evals=60, seed=0)
    assert values.values.shape[0] == 2 and values.values[0].shape[1] == 3
    # one segment per token of the model's own tokenizer; its special tokens (GPT's trailing
    # EOT; BERT's [CLS] and [SEP]) are never masked, so they get 0
    enc = clf.tokenizer.encode(texts[0])
    assert len(values.data[0]) == len(enc.ids)
    for j in [i for i, special in enumerate(enc.special_tokens_mask) if special]:
        assert values.data[0][j] == "" and np.allclose(values.values[0][j], 0, atol=1e-6)
    assert "".join(values.data[0]).strip() == texts[0]
    assert seq_cls.additivity_error(clf, values, texts) < 1e-4
    scores = seq_cls.deletion_scores(clf, values, texts, clf.logits(texts).argmax(1), seed=0)
    assert set(scores) == {"deletion_drop_shap", "deletion_drop_random"}
    assert all(np.isfinite(v) for v in scores.values())


@pytest.mark.parametrize("fixture", ["tiny_classifier_dir", "tiny_bert_classifier_dir"])
def test_truncate_keeps_the_longest_prefix_that_fits(fixture, request):
    clf = TextClassifier.load(request.getfixturevalue(fixture))
    text = " ".join(f"word{i}" for i in range(100))
    short = seq_cls.truncate(clf, text, max_len=10)
    assert text.startswith(short) and len(short) < len(text)
    assert len(clf.tokenizer.encode(short).ids) <= 10
    assert seq_cls.truncate(clf, "tiny", max_len=10) == "tiny"


def test_attention_maps_are_causal_for_gpt_and_full_for_bert(tiny_classifier_dir,
                                                             tiny_bert_classifier_dir, tmp_path):
    for directory, causal in ((tiny_classifier_dir, True), (tiny_bert_classifier_dir, False)):
        clf = TextClassifier.load(directory)
        ids, lengths = encode_texts(clf.tokenizer, ["read the file and close it"], clf.max_len)
        maps = attention.figure(clf.model, clf.model.backbone, clf.tokenizer, ids, lengths,
                                tmp_path / "a.png")
        assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not clf.model.backbone.blocks[0].attn.keep_maps  # switched back off
        m = maps[0]
        assert m.shape == (lengths[0], lengths[0]) and np.allclose(m.sum(-1), 1, atol=1e-5)
        above = np.triu(m, 1).max()
        assert (above == 0) if causal else (above > 0)


def test_attention_rollout_is_row_stochastic_and_follows_a_chain_of_attention():
    # layer 1: every token attends to token 0; layer 2: likewise; rollout keeps rows summing to 1
    # and puts most of the last token's flow on token 0
    t = 4
    a = np.zeros((t, t))
    a[:, 0] = 1.0
    r = attention.rollout([a, a])
    assert np.allclose(r.sum(-1), 1)
    assert r[-1, 0] > 0.7 and r[-1, 0] > r[-1, -1]
    assert np.allclose(attention.rollout([np.eye(t)]), np.eye(t))


@pytest.mark.parametrize("copy", [False, True])
def test_a_seq2seq_explanation_aligns_outputs_with_sources_and_its_shap_values_add_up(
        copy, tmp_path, tiny_tokenizer):
    import pandas as pd

    from bigmodel.tasks import seq2seq_explain
    from bigmodel.tasks.seq2seq import Translator
    from tests.conftest import save_tiny_model

    directory = save_tiny_model(tmp_path / "s2s", tiny_tokenizer, "seq2seq", "seq2seq",
                                arch={"copy_attention": copy})
    translator = Translator(directory)
    test = pd.DataFrame({"source": ["def add(a, b): return a + b", "import asyncio", "x = 1"],
                         "target": ["LOAD_FAST a", "IMPORT_NAME asyncio", "STORE_NAME x"]})
    out = tmp_path / "explain"
    metrics, summary = seq2seq_explain.explain(translator, test, out, n_examples=2,
                                               max_evals=40, max_len=12, seed=0)
    assert metrics["n_examples"] == 2 and "alignment on copied tokens" in summary
    assert metrics["additivity_max_error"] < 1e-4
    assert all(np.isfinite(metrics[k]) for k in ("deletion_drop_shap", "deletion_drop_random"))
    for i in range(2):
        assert (out / f"alignment_{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "shap.html").read_text().count("<h3>example") == 2
    maps, src = seq2seq_explain.alignment(translator, "def add(a, b): return a + b", [5, 6, 7])
    titles = [t for t, _ in maps]
    assert titles[-1] == ("copy attention" if copy else "decoder block 0: cross-attention")
    for _, m in maps:  # rows: the 3 outputs and EOS; each a distribution over the source
        assert m.shape == (4, len(src)) and np.allclose(m.sum(-1), 1, atol=1e-5)
    assert translator.model.last_copy is None and not translator.model.keep_maps


def test_alignment_hits_count_copied_tokens_whose_strongest_source_position_holds_them(
        tiny_tokenizer):
    from bigmodel.tasks.seq2seq_explain import alignment_hits

    name, other, space = (tiny_tokenizer.token_to_id(t) for t in ("a", "b", "Ġ"))
    assert None not in (name, other, space)
    src = [name, space, other]
    att = np.array([[0.8, 0.1, 0.1],    # output `name`: strongest on `name` → hit
                    [0.1, 0.8, 0.1],    # output space: not counted
                    [0.7, 0.1, 0.2],    # output `other`: strongest on `name` → miss
                    [0.3, 0.3, 0.4]])   # output not in the source: not counted
    assert alignment_hits(att, src, [name, space, other, 99], tiny_tokenizer) == (1, 2)


def test_a_pretrained_backbone_explains_with_attention_maps_of_test_documents(tiny_gpt_dir,
                                                                              tmp_path):
    from bigmodel.text.shards import Split

    split = Split(tokens=np.arange(3, 60, dtype=np.uint16) % 250, doc_starts=np.array([0, 20, 40]),
                  n_bytes=0)
    metrics, _ = attention.explain_pretrained(tiny_gpt_dir, split, tmp_path / "x", n_examples=2,
                                              max_len=16)
    assert metrics == {"n_examples": 2}
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["attention_0.png",
                                                                  "attention_1.png"]


def test_shap_is_imported_with_numbas_jit_off_unless_the_environment_says_otherwise(monkeypatch):
    import os

    monkeypatch.delenv("NUMBA_DISABLE_JIT", raising=False)
    seq_cls.import_shap()
    assert os.environ["NUMBA_DISABLE_JIT"] == "1"
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "0")
    seq_cls.import_shap()
    assert os.environ["NUMBA_DISABLE_JIT"] == "0"
