import numpy as np

from bigmodel import explain
from bigmodel.predict import TextClassifier


def test_shap_values_account_exactly_for_the_logits(tiny_classifier_dir):
    clf = TextClassifier.load(tiny_classifier_dir)
    texts = ["Open the file and read it", "class Queue: a first-in first-out queue"]
    values = explain.shap_values(clf, texts, max_evals=60, seed=0)
    assert values.values.shape[0] == 2 and values.values[0].shape[1] == 3
    # one segment per token of our own tokenizer; the EOT suffix is never masked, so gets 0
    assert len(values.data[0]) == len(clf.tokenizer.encode(texts[0]).ids)
    assert values.data[0][-1] == "" and np.allclose(values.values[0][-1], 0, atol=1e-6)
    assert "".join(values.data[0]).strip() == texts[0]
    assert explain.additivity_error(clf, values, texts) < 1e-4
    scores = explain.deletion_scores(clf, values, texts, clf.logits(texts).argmax(1), seed=0)
    assert set(scores) == {"deletion_drop_shap", "deletion_drop_random"}
    assert all(np.isfinite(v) for v in scores.values())


def test_truncate_keeps_the_longest_prefix_that_fits(tiny_classifier_dir):
    clf = TextClassifier.load(tiny_classifier_dir)
    text = " ".join(f"word{i}" for i in range(100))
    short = explain.truncate(clf, text, max_len=10)
    assert text.startswith(short) and len(short) < len(text)
    assert len(clf.tokenizer.encode(short).ids) <= 10
    assert explain.truncate(clf, "tiny", max_len=10) == "tiny"


def test_attention_figure_is_written(tiny_classifier_dir, tmp_path):
    clf = TextClassifier.load(tiny_classifier_dir)
    explain.plot_attention(clf, "read the file", tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not clf.model.gpt.blocks[0].attn.keep_maps  # switched back off
