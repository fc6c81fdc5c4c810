"""Stage `evaluate`: the language model and the classifier on held-out data, beside baselines.

LM: val/test loss (nats/token), perplexity and bits per byte. Classifier (test split): accuracy,
macro-F1, per-class precision/recall/F1 and a confusion matrix, beside a majority-class baseline
and a bag-of-words logistic regression (its C picked on val) trained on the same train split.
Output: metrics/evaluate.json; plots/confusion.csv (actual, predicted); `paths.evaluate`/
confusion.png.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.dummy import DummyClassifier  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from bigmodel import tracking  # noqa: E402
from bigmodel.config import Params  # noqa: E402
from bigmodel.io import atomic_path, write_json  # noqa: E402
from bigmodel.models import gpt as gpt_lib  # noqa: E402
from bigmodel.predict import TextClassifier  # noqa: E402
from bigmodel.tokenize import load_split  # noqa: E402
from bigmodel.train.finetune import read_split  # noqa: E402

BOW_C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def run(params: Params) -> str:
    prepared = params.path("prepared")
    with tracking.stage_run("evaluate", params, ["evaluate"]) as mlrun:
        lm = evaluate_lm(params)
        train, val, test = (read_split(prepared, s) for s in ("train", "val", "test"))
        clf = TextClassifier.load(params.path("finetune"))
        pred = clf.predict_proba(test["text"].tolist(), params.evaluate.batch_size).argmax(1)
        predicted = [clf.labels[i] for i in pred]
        model_scores = classification_scores(test["label"].tolist(), predicted, clf.labels)
        baselines = {
            "majority": classification_scores(
                test["label"].tolist(), majority_baseline(train, test), clf.labels, per_class=False),
            "bow_logreg": classification_scores(
                test["label"].tolist(), bow_baseline(train, val, test, params.seed), clf.labels,
                per_class=False),
        }
        metrics = {"lm": lm, "classifier": model_scores, "baselines": baselines}
        write_json(params.metrics_file("evaluate"), metrics)
        with atomic_path(params.plot_file("confusion")) as tmp:
            pd.DataFrame({"actual": test["label"], "predicted": predicted}).to_csv(tmp, index=False)
        png = params.path("evaluate") / "confusion.png"
        plot_confusion(test["label"].tolist(), predicted, clf.labels, png)
        mlrun.metrics(tracking.flatten({k: v for k, v in metrics.items()}))
        mlrun.artifact(params.metrics_file("evaluate"))
        mlrun.artifact(png, "plots")
    return (f"test macro-F1 {model_scores['macro_f1']:.3f} (bag-of-words "
            f"{baselines['bow_logreg']['macro_f1']:.3f}, majority "
            f"{baselines['majority']['macro_f1']:.3f}); test bpb {lm['test_bpb']:.3f}")


@torch.no_grad()
def evaluate_lm(params: Params) -> dict[str, float]:
    """Mean next-token loss over consecutive block_size windows of each split."""
    directory = params.path("pretrain")
    cfg = gpt_lib.GPTConfig(**gpt_lib.read_config(directory)["gpt"])
    model = gpt_lib.GPT(cfg)
    gpt_lib.load_weights(model, directory)
    model.eval()
    out: dict[str, float] = {}
    for split in ("val", "test"):
        data, meta = load_split(params.path("tokens"), split)
        limit = params.evaluate.eval_tokens or len(data)
        loss = window_loss(model, data[: limit + 1], cfg.block_size, params.evaluate.batch_size)
        info = meta["splits"][split]
        out[f"{split}_loss"] = loss
        out[f"{split}_perplexity"] = math.exp(loss)
        out[f"{split}_bpb"] = loss / math.log(2) * info["tokens"] / info["bytes"]
    return out


def window_loss(model: gpt_lib.GPT, data: np.ndarray, block: int, batch_size: int) -> float:
    n = (len(data) - 1) // block
    if n == 0:
        raise ValueError(f"split has {len(data)} tokens, fewer than one block of {block}")
    x_all = torch.from_numpy(data[: n * block].astype(np.int64)).view(n, block)
    y_all = torch.from_numpy(data[1 : n * block + 1].astype(np.int64)).view(n, block)
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x_all[i : i + batch_size], y_all[i : i + batch_size])
        total += loss.item() * len(x_all[i : i + batch_size])
    return total / n


def classification_scores(actual: list[str], predicted: list[str], labels: list[str],
                          per_class: bool = True) -> dict:
    scores: dict = {
        "accuracy": float(np.mean(np.array(actual) == np.array(predicted))),
        "macro_f1": float(f1_score(actual, predicted, labels=labels, average="macro", zero_division=0)),
    }
    if per_class:
        p, r, f, support = precision_recall_fscore_support(actual, predicted, labels=labels,
                                                           zero_division=0)
        scores["per_class"] = {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        }
    return scores


def majority_baseline(train: pd.DataFrame, test: pd.DataFrame) -> list[str]:
    dummy = DummyClassifier(strategy="most_frequent").fit(train[["text"]], train["label"])
    return dummy.predict(test[["text"]]).tolist()


def bow_baseline(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, seed: int) -> list[str]:
    """TF-IDF unigrams + bigrams → logistic regression; C chosen by val macro-F1."""
    def fit(c: float):  # noqa: ANN202
        return make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=c, max_iter=2000, random_state=seed),
        ).fit(train["text"], train["label"])

    best = max(BOW_C_GRID, key=lambda c: f1_score(val["label"], fit(c).predict(val["text"]),
                                                  average="macro"))
    return fit(best).predict(test["text"]).tolist()


def plot_confusion(actual: list[str], predicted: list[str], labels: list[str], path: Path) -> None:
    cm = confusion_matrix(actual, predicted, labels=labels)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
