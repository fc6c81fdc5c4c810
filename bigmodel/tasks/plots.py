"""Figures the tasks share: a confusion matrix and a bar chart of per-token scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion(actual: list[str], predicted: list[str], labels: list[str], path: Path,
              title: str = "test confusion matrix") -> None:
    from sklearn.metrics import confusion_matrix

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
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def token_bars(tokens: list[str], values: np.ndarray, xlabel: str, path: Path, top: int = 15) -> None:
    """The `top` tokens by |value|, red for positive, blue for negative."""
    names = [repr(t.strip() or t)[1:-1] for t in tokens]
    order = np.argsort(-np.abs(values))[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1.2))
    ax.barh(range(len(order)), values[order],
            color=["tab:red" if values[j] > 0 else "tab:blue" for j in order])
    ax.set_yticks(range(len(order)), [names[j] for j in order], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(f"top {len(order)} tokens")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
