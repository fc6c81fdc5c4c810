"""Stage `explain`: why the classifier predicts what it does, for N test examples.

- SHAP token attributions: shap's Partition explainer over a Text masker that tokenizes with our
  own tokenizer; a masked token is deleted (the model sees the text without it). Explains the
  logits, so each example's values sum to its logit minus the all-masked logit.
- Faithfulness: deleting the top-20% tokens by SHAP should hurt the predicted class more than
  deleting as many random tokens (`deletion_drop_shap` vs `deletion_drop_random`).
- Attention maps: every layer's attention (mean over heads) for the same examples.
Output: `paths.explain`/ shap.html, shap_<i>.png, attention_<i>.png; metrics/explain.json.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import shap  # noqa: E402
import torch  # noqa: E402

from bigmodel import tracking  # noqa: E402
from bigmodel.config import Params  # noqa: E402
from bigmodel.io import atomic_path, write_json  # noqa: E402
from bigmodel.predict import TextClassifier, encode_texts  # noqa: E402
from bigmodel.tokenizer import EOT  # noqa: E402
from bigmodel.train.finetune import read_split  # noqa: E402

DELETE_FRACTION = 0.2


def run(params: Params) -> str:
    cfg = params.explain
    start = time.perf_counter()
    clf = TextClassifier.load(params.path("finetune"))
    test = read_split(params.path("prepared"), "test")
    picked = test.sample(min(cfg.n_examples, len(test)), random_state=params.seed)
    texts = [truncate(clf, t, cfg.max_len) for t in picked["text"]]

    with tracking.stage_run("explain", params, ["seed", "explain"]) as mlrun:
        values = shap_values(clf, texts, cfg.max_evals, params.seed)
        predicted = clf.logits(texts).argmax(1)
        with atomic_path(params.path("explain")) as out:
            out.mkdir()
            write_html(values, texts, picked["label"].tolist(), clf.labels, predicted, out / "shap.html")
            for i, text in enumerate(texts):
                plot_tokens(values[i, :, int(predicted[i])], clf.labels[predicted[i]], out / f"shap_{i}.png")
                plot_attention(clf, text, out / f"attention_{i}.png")
        metrics = {
            "n_examples": len(texts),
            "additivity_max_error": additivity_error(clf, values, texts),
            **deletion_scores(clf, values, texts, predicted, params.seed),
            "seconds": time.perf_counter() - start,
        }
        write_json(params.metrics_file("explain"), metrics)
        mlrun.metrics(metrics)
        mlrun.artifact(params.path("explain"), "explain")
    return (f"{len(texts)} examples; deleting top-SHAP tokens drops p(pred) by "
            f"{metrics['deletion_drop_shap']:.3f} vs {metrics['deletion_drop_random']:.3f} at random")


def truncate(clf: TextClassifier, text: str, max_len: int) -> str:
    """The longest prefix of `text` that fits in max_len tokens (the appended EOT included)."""
    enc = clf.tokenizer.encode(text)
    if len(enc.ids) <= max_len:
        return text
    return text[: enc.offsets[max_len - 2][1]]


class ShapTokenizer:
    """Our tokenizer in the shape shap's Text masker asks for: called on a string it gives ids
    and character offsets; the trailing `<|endoftext|>` is declared as the eos token, which shap
    then keeps unmasked."""

    def __init__(self, clf: TextClassifier):
        self.tok = clf.tokenizer
        self.special_tokens_map = {"eos_token": EOT}

    def __call__(self, s: str, return_offsets_mapping: bool = True) -> dict[str, list]:
        enc = self.tok.encode(s)
        return {"input_ids": enc.ids, "offset_mapping": enc.offsets}

    def decode(self, ids: int | list[int]) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.tok.decode(ids, skip_special_tokens=False)


def shap_values(clf: TextClassifier, texts: list[str], max_evals: int, seed: int) -> shap.Explanation:
    masker = shap.maskers.Text(ShapTokenizer(clf), mask_token="", collapse_mask_token=False)
    explainer = shap.Explainer(lambda xs: clf.logits([str(x) for x in xs]), masker,
                               output_names=clf.labels, algorithm="partition", seed=seed)
    return explainer(texts, max_evals=max_evals, batch_size=64, silent=True)


def additivity_error(clf: TextClassifier, values: shap.Explanation, texts: list[str]) -> float:
    """max |base + Σ values − f(x)|: how exactly the attributions account for the output."""
    full = clf.logits(texts)
    err = 0.0
    for i in range(len(texts)):
        total = values.base_values[i] + values.values[i].sum(0)
        err = max(err, float(np.abs(total - full[i]).max()))
    return err


def deletion_scores(clf: TextClassifier, values: shap.Explanation, texts: list[str],
                    predicted: np.ndarray, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    by_shap, at_random, base = [], [], []
    for i, text in enumerate(texts):
        segments = list(values.data[i])
        real = np.array([j for j, s in enumerate(segments) if s])  # not the (empty) EOT suffix
        v = values.values[i][real, predicted[i]]
        k = max(1, int(round(DELETE_FRACTION * len(real))))
        top = set(real[np.argsort(-v)[:k]].tolist())
        rand = set(rng.choice(real, size=k, replace=False).tolist())
        by_shap.append("".join(s for j, s in enumerate(segments) if j not in top))
        at_random.append("".join(s for j, s in enumerate(segments) if j not in rand))
        base.append(text)
    rows = np.arange(len(texts))
    p = [clf.predict_proba(x)[rows, predicted] for x in (base, by_shap, at_random)]
    return {"deletion_drop_shap": float(np.mean(p[0] - p[1])),
            "deletion_drop_random": float(np.mean(p[0] - p[2]))}


def write_html(values: shap.Explanation, texts: list[str], actual: list[str], labels: list[str],
               predicted: np.ndarray, path: Path) -> None:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>SHAP explanations</title>"
             "</head><body><h1>SHAP token attributions (logits)</h1>"]
    for i in range(len(texts)):
        cls = int(predicted[i])
        parts.append(f"<h3>example {i}: actual <b>{html.escape(actual[i])}</b>, predicted "
                     f"<b>{html.escape(labels[cls])}</b></h3>")
        parts.append(shap.plots.text(values[i, :, cls], display=False))
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))


def plot_tokens(v: shap.Explanation, label: str, path: Path, top: int = 15) -> None:
    tokens = [repr(t.strip() or t)[1:-1] for t in v.data]
    order = np.argsort(-np.abs(v.values))[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1.2))
    ax.barh(range(len(order)), v.values[order],
            color=["tab:red" if v.values[j] > 0 else "tab:blue" for j in order])
    ax.set_yticks(range(len(order)), [tokens[j] for j in order], fontsize=8)
    ax.set_xlabel(f"SHAP value for logit of '{label}'")
    ax.set_title(f"top {len(order)} tokens")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_attention(clf: TextClassifier, text: str, path: Path) -> None:
    ids, lengths = encode_texts(clf.tokenizer, [text], clf.max_len)
    gpt = clf.model.gpt
    gpt.attention_maps(True)
    try:
        clf.model(torch.from_numpy(ids), torch.from_numpy(lengths))
        maps = [b.attn.last_map[0].mean(0).numpy() for b in gpt.blocks]  # each (T, T)
    finally:
        gpt.attention_maps(False)
    labels = [clf.tokenizer.id_to_token(i).replace("Ġ", "·") for i in ids[0]]
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    for layer, (ax, m) in enumerate(zip(axes[0], maps)):
        ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer} (mean of heads)", fontsize=9)
        if len(labels) <= 40:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
