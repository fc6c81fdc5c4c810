"""Task `image_cls`: an image in → a label and its probabilities (a ResNet, pretrained or
finetuned).

- `ImageClassifier`: the one inference path of evaluate, explain, the gate and serving; it
  takes uint8 pixels, or PNG / JPEG bytes (base64 in a served request), decoded and resized
  as `prepare` did for the model's own data.
- Metrics and baselines: accuracy, macro-F1, per-class scores, a confusion matrix, and
  calibration (expected calibration error over 15 equal-width confidence bins, and a
  reliability diagram), beside the majority class and a logistic regression on the pixels,
  trained on the same train split.
- Explanation (bigmodel/tasks/image_explain.py): SHAP attributions (shap's Partition explainer
  over an Image masker) and Grad-CAM heatmaps over the images, and the deletion faithfulness
  score of each.
- Gate metric: test macro-F1, higher is better.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from bigmodel.data import images
from bigmodel.errors import BigModelError
from bigmodel.models import registry
from bigmodel.io import read_parquet

GATE_METRIC, HIGHER_IS_BETTER = "macro_f1", True
GATE_MARGIN = "margin"  # a pretrained ResNet is gated like a finetuned classifier
ECE_BINS = 15
LOGREG_C_GRID = (0.01, 0.1, 1.0, 10.0)
DELETE_FRACTION = 0.2
SERVING_INPUT = "image"  # base64 PNG / JPEG


# --- the predictor ----------------------------------------------------------------------------

@dataclass
class ImageClassifier:
    model: nn.Module  # a ResNet, its fc sized to `labels`
    labels: list[str]
    info: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> "ImageClassifier":
        model, info = registry.load_backbone(directory)
        if info["task"] != "image_cls":
            raise BigModelError(f"{directory}: a {info['task']} model, not an image classifier")
        return cls(model.eval(), list(info["labels"]), info)

    @property
    def size(self) -> int:
        return int(self.info["arch"]["image_size"])

    @property
    def channels(self) -> int:
        return int(self.info["arch"]["in_channels"])

    @torch.no_grad()
    def logits(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, H, W, C) pixels, uint8 or float in [0, 1] → (N, K) logits."""
        out = []
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.array(pixels[i : i + batch_size]))  # a writable copy
            x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
            out.append(self.model(x.permute(0, 3, 1, 2)).float().numpy())  # (B, C, H, W) in
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predict_proba(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return torch.from_numpy(self.logits(pixels, batch_size)).softmax(-1).numpy()

    def decode(self, encoded: list[str]) -> np.ndarray:
        """Base64 PNG / JPEG strings → (N, size, size, C) uint8, as prepare decodes files."""
        out = []
        for i, text in enumerate(encoded):
            try:
                data = base64.b64decode(text.split(",", 1)[-1], validate=True)  # a data: URL too
            except (binascii.Error, ValueError):
                raise BigModelError(f"image {i}: not base64 (send PNG / JPEG bytes, base64 "
                                    f"encoded)") from None
            img = images.decode(data, self.size, gray=self.channels == 1)
            if img is None:
                raise BigModelError(f"image {i}: not a readable image ({len(data)} bytes; "
                                    f"PNG or JPEG expected)")
            out.append(img if self.channels == img.shape[-1] else np.repeat(img, 3, axis=-1))
        return np.stack(out) if out else np.zeros((0, self.size, self.size, self.channels), np.uint8)

    def predict(self, encoded: list[str]) -> pd.DataFrame:
        """The served answer: `label` and one `p_<class>` column per class."""
        probs = self.predict_proba(self.decode(encoded))
        out = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.labels])
        out.insert(0, "label", [self.labels[i] for i in probs.argmax(1)])
        return out


load = ImageClassifier.load


def png_base64(pixels: np.ndarray) -> str:
    """(H, W, C) uint8 → a base64 PNG: what a client sends."""
    from PIL import Image

    img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_EXAMPLE = (np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4)  # a gray ramp: any model resizes it
SERVING_EXAMPLE = pd.DataFrame({SERVING_INPUT: [png_base64(_EXAMPLE)]})


# --- evaluation -------------------------------------------------------------------------------

def split_of(clf: ImageClassifier, table: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The rows of a prepared table whose label the model knows: pixels and labels."""
    table = table[table["label"].isin(clf.labels)]
    if table.empty:
        raise BigModelError(f"no test images of the model's classes ({', '.join(clf.labels)})")
    return images.pixels_of(table, images.shape_of(table)), table["label"].tolist()


def gate_score(model_dir: Path, test: pd.DataFrame, batch_size: int) -> float:
    from bigmodel.tasks.seq_cls import classification_scores

    clf = ImageClassifier.load(model_dir)
    pixels, actual = split_of(clf, test)
    pred = clf.predict_proba(pixels).argmax(1)
    return classification_scores(actual, [clf.labels[i] for i in pred], clf.labels,
                                 per_class=False)[GATE_METRIC]


def gate_scorer(params: Any, name: str) -> Any:
    """A pretrained ResNet serves as it is: scored on its corpus's test images of its classes."""
    spec = params.pretrain[name]
    test = read_parquet(params.path("data", spec.corpus) / "prepared" / "image_cls_test.parquet")
    return lambda model_dir: gate_score(model_dir, test, params.evaluate.batch_size)


def saved_config(spec: Any) -> dict[str, Any]:
    return {}


def calibration(probs: np.ndarray, actual_idx: np.ndarray, bins: int = ECE_BINS
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error (Guo et al., 2017): the confidence-weighted gap between
    confidence and accuracy over equal-width bins of the top probability; and the bins."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = (predicted == actual_idx).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if not inside.any():
            continue
        acc, conf = float(correct[inside].mean()), float(confidence[inside].mean())
        ece += inside.mean() * abs(acc - conf)
        rows.append({"low": float(lo), "high": float(hi), "count": int(inside.sum()),
                     "accuracy": acc, "confidence": conf})
    return float(ece), rows


def reliability_figure(rows: list[dict[str, float]], ece: float, path: Path) -> None:
    from bigmodel.tasks import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    ax.bar(centers, [r["accuracy"] for r in rows], width=1 / ECE_BINS, edgecolor="black",
           color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="tab:red",
            label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy",
           title=f"reliability: ECE {ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def majority_baseline(train_labels: list[str], n: int) -> list[str]:
    return [pd.Series(train_labels).value_counts().index[0]] * n


def logreg_baseline(train: tuple[np.ndarray, list[str]], val: tuple[np.ndarray, list[str]],
                    test: np.ndarray, seed: int) -> list[str]:
    """A logistic regression on the raw pixels (scaled to [0, 1]); C picked on val macro-F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32) / 255

    fitted = {c: LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(flat(train[0]), train[1])
              for c in LOGREG_C_GRID}
    best = max(LOGREG_C_GRID, key=lambda c: f1_score(val[1], fitted[c].predict(flat(val[0])),
                                                     average="macro"))
    return fitted[best].predict(flat(test)).tolist()


def test_scores(clf: ImageClassifier, test: pd.DataFrame, batch_size: int, out: Path | None
                ) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """The model's scores on the test images of its classes (with `out`: its predictions,
    per-class table, confusion matrix and reliability diagram written there)."""
    from bigmodel.tasks import plots
    from bigmodel.tasks.seq_cls import classification_scores

    pixels, actual = split_of(clf, test)
    probs = clf.predict_proba(pixels, batch_size)
    predicted = [clf.labels[i] for i in probs.argmax(1)]
    scores = classification_scores(actual, predicted, clf.labels)
    index = {label: i for i, label in enumerate(clf.labels)}
    ece, bins = calibration(probs, np.array([index[a] for a in actual]))
    scores["ece"] = ece
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame({"actual": actual, "predicted": predicted,
                              "confidence": probs.max(1).round(4)})
        table.to_csv(out / "predictions.csv", index=False)
        pd.DataFrame(scores["per_class"]).T.rename_axis("class").to_csv(out / "per_class.csv")
        pd.DataFrame(bins).to_csv(out / "reliability.csv", index=False)
        plots.confusion(actual, predicted, clf.labels, out / "confusion.png")
        reliability_figure(bins, ece, out / "reliability.png")
    return scores, pixels, actual


def scores_beside_baselines(clf: ImageClassifier, train: pd.DataFrame, val: pd.DataFrame,
                            test: pd.DataFrame, out: Path | None, seed: int, batch_size: int
                            ) -> tuple[dict[str, Any], str]:
    from bigmodel.tasks.seq_cls import classification_scores

    model_scores, pixels, actual = test_scores(clf, test, batch_size, out)
    ece = model_scores["ece"]
    train_split, val_split = split_of(clf, train), split_of(clf, val)
    baselines = {
        "majority": classification_scores(actual, majority_baseline(train_split[1], len(actual)),
                                          clf.labels, per_class=False),
        "pixel_logreg": classification_scores(actual, logreg_baseline(train_split, val_split,
                                                                      pixels, seed),
                                              clf.labels, per_class=False),
    }
    metrics = {"task": "image_cls", "family": clf.info["family"], "test": model_scores,
               "baselines": baselines, "gate": {GATE_METRIC: model_scores[GATE_METRIC]}}
    summary = (f"test accuracy {model_scores['accuracy']:.3f}, macro-F1 "
               f"{model_scores['macro_f1']:.3f}, ECE {ece:.3f} (pixel logistic regression "
               f"{baselines['pixel_logreg']['macro_f1']:.3f}, majority "
               f"{baselines['majority']['macro_f1']:.3f})")
    return metrics, summary


def evaluate(model_dir: Path, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame,
             out: Path, seed: int, batch_size: int) -> tuple[dict[str, Any], str]:
    """A finetuned classifier on the test images of its classes, beside the baselines."""
    return scores_beside_baselines(ImageClassifier.load(model_dir), train, val, test, out, seed,
                                   batch_size)


def _prepared(params: Any, name: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    prepared = params.path("data", params.pretrain[name].corpus) / "prepared"
    return tuple(read_parquet(prepared / f"image_cls_{s}.parquet")  # type: ignore[return-value]
                 for s in ("train", "val", "test"))


def evaluate_pretrained(params: Any, name: str) -> tuple[dict[str, Any], str]:
    """A pretrained ResNet is a classifier of its own classes: scored as a finetuned one is,
    on the test images of those classes (its figures: explain_pretrained)."""
    train, val, test = _prepared(params, name)
    clf = ImageClassifier.load(params.path("pretrain", name))
    return scores_beside_baselines(clf, train, val, test, None, params.seed,
                                   params.evaluate.batch_size)


def explain_pretrained(params: Any, name: str, out: Path) -> tuple[dict[str, float], str]:
    """The explanations of `explain`, and the model's test predictions, confusion matrix and
    reliability diagram (in `out`/test, the one folder its stage writes)."""
    _, _, test = _prepared(params, name)
    test_scores(ImageClassifier.load(params.path("pretrain", name)), test,
                params.evaluate.batch_size, out / "test")
    cfg = params.explain
    return explain(params.path("pretrain", name), test, out, cfg.n_examples, cfg.max_evals,
                   cfg.max_len, params.seed)


# --- explanation ------------------------------------------------------------------------------

def explain(model_dir: Path, test: pd.DataFrame, out: Path, n_examples: int, max_evals: int,
            max_len: int, seed: int) -> tuple[dict[str, float], str]:
    """SHAP maps and Grad-CAM heatmaps of `n_examples` test images (`max_len` is a text
    setting), and how faithful each is: deleting the top-attributed 20% of the pixels against
    deleting as many random ones."""
    from bigmodel.tasks import image_explain as ex

    clf = ImageClassifier.load(model_dir)
    table = test[test["label"].isin(clf.labels)].sample(frac=1.0, random_state=seed)
    table = table.head(n_examples)
    if table.empty:
        raise BigModelError(f"no test images of the model's classes ({', '.join(clf.labels)})")
    pixels = images.pixels_of(table, images.shape_of(table)).astype(np.float32) / 255
    actual = table["label"].tolist()

    def predict(x: np.ndarray) -> np.ndarray:
        return clf.predict_proba(np.asarray(x, dtype=np.float32))

    probs = predict(pixels)
    predicted = probs.argmax(1)
    values = ex.shap_images(predict, pixels, clf.labels, max_evals, seed)
    shap_maps = ex.class_maps(values, predicted)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    cam = ex.grad_cam(clf.model, clf.model.stages[-1], x, torch.from_numpy(predicted))
    fill = np.asarray(clf.info["arch"]["mean"], dtype=np.float32)  # "removed": the mean pixel
    shap_del = ex.deletion_scores(predict, pixels, shap_maps, predicted, DELETE_FRACTION, seed, fill)
    cam_del = ex.deletion_scores(predict, pixels, cam, predicted, DELETE_FRACTION, seed, fill)
    out.mkdir(parents=True, exist_ok=True)
    titles = [f"actual {a}, predicted {clf.labels[p]} ({probs[i, p]:.2f})"
              for i, (a, p) in enumerate(zip(actual, predicted))]
    ex.shap_figure(pixels, shap_maps, titles, out / "shap.png")
    ex.overlay_figure(pixels, cam, titles, out / "gradcam.png")
    np.save(out / "shap_maps.npy", shap_maps)
    np.save(out / "gradcam_maps.npy", cam)
    metrics = {
        "n_examples": len(table),
        "additivity_max_error": ex.additivity_error(values, predict, pixels),
        "deletion_drop_shap": shap_del["deletion_drop_top"],
        "deletion_drop_gradcam": cam_del["deletion_drop_top"],
        "deletion_drop_random": shap_del["deletion_drop_random"],
    }
    summary = (f"{len(table)} images; deleting the top-20% pixels drops p(pred) by "
               f"{metrics['deletion_drop_shap']:.3f} (SHAP), {metrics['deletion_drop_gradcam']:.3f} "
               f"(Grad-CAM) vs {metrics['deletion_drop_random']:.3f} at random")
    return metrics, summary
