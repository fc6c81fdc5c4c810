"""The champion gate: move a registered model's `champion` alias only to a better model.

For each registered model the pipeline produces (the finetuned classifier, the pretrained GPT),
the newest version (the challenger, noted in its stage's `registry.json`) and the version the
alias points at (the champion) are scored on the *same* test split, by the same code, now:
- classifier: macro-F1 (or accuracy) on `labelled_test.parquet` — higher is better;
- GPT: bits per byte on the start of `pretrain_test.parquet` — lower is better (bits per byte
  does not depend on the tokenizer, so models with different vocabularies compare fairly).
The alias moves when there is no champion yet, or when the challenger is better by at least
`promote.margin` (classifier) / `promote.margin_bpb` (GPT). Every decision is written as tags on
the challenger version, so the registry says why each model was or was not promoted.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.evaluate import classification_scores, window_loss
from bigmodel.io import read_json


@dataclass
class Decision:
    model: str  # registered model name
    metric: str
    challenger: str | None  # versions
    champion_before: str | None
    champion_after: str | None
    challenger_score: float | None
    champion_score: float | None
    moved: bool
    reason: str

    def line(self) -> str:
        return f"{self.model}: {self.reason}"


def run(params: Params) -> list[Decision]:
    """Gate both registered models; returns one decision each."""
    return [gate_classifier(params), gate_generator(params)]


def gate_classifier(params: Params) -> Decision:
    cfg = params.promote
    test = _read(params.path("prepared") / "labelled_test.parquet")

    def score(model_dir: Path) -> float:
        from bigmodel.predict import TextClassifier

        clf = TextClassifier.load(model_dir)
        pred = clf.predict_proba(test["text"].tolist(), params.evaluate.batch_size).argmax(1)
        scores = classification_scores(test["label"].tolist(), [clf.labels[i] for i in pred],
                                       clf.labels, per_class=False)
        return scores[cfg.metric]

    return _gate(params, params.path("finetune"), cfg.metric, score, higher_is_better=True,
                 margin=cfg.margin)


def gate_generator(params: Params) -> Decision:
    cfg = params.promote
    texts = _read(params.path("prepared") / "pretrain_test.parquet")["text"].tolist()

    def score(model_dir: Path) -> float:
        return text_bpb(model_dir, texts, cfg.lm_eval_bytes, params.evaluate.batch_size)

    return _gate(params, params.path("pretrain"), "test_bpb", score, higher_is_better=False,
                 margin=cfg.margin_bpb)


def _gate(params: Params, stage_dir: Path, metric: str, score, higher_is_better: bool,  # noqa: ANN001
          margin: float) -> Decision:
    alias = params.promote.alias
    reg_file = stage_dir / "registry.json"
    if not reg_file.is_file():
        raise BigModelError(f"{reg_file}: not found (run the stage that registers the model first)")
    reg = read_json(reg_file)
    name, challenger = reg["name"], str(reg["version"])
    champion = tracking.alias_version(params, name, alias)
    if champion == challenger:
        return Decision(name, metric, challenger, champion, champion, None, None, False,
                        f"v{challenger} is already the {alias}; kept")
    new_score = score(stage_dir)
    old_score = None
    if champion is None:
        moved, reason = True, f"no {alias} yet: v{challenger} ({metric} {new_score:.4f}) promoted"
    else:
        with tempfile.TemporaryDirectory() as d:
            folder = tracking.download_model(params, f"models:/{name}@{alias}", Path(d))
            old_score = score(folder)
        gain = (new_score - old_score) if higher_is_better else (old_score - new_score)
        moved = gain >= margin
        verdict = "promoted" if moved else f"kept v{champion}"
        reason = (f"challenger v{challenger} {metric} {new_score:.4f} vs {alias} v{champion} "
                  f"{old_score:.4f}: {'better' if gain > 0 else 'not better'} by {gain:+.4f} "
                  f"(margin {margin}) -> {verdict}")
    decision = Decision(name, metric, challenger, champion, challenger if moved else champion,
                        new_score, old_score, moved, reason)
    tags = {f"bigmodel.gate.{k}": str(v) for k, v in asdict(decision).items()
            if k not in ("model",)}
    if moved:
        tracking.set_alias(params, name, alias, challenger, tags)
    else:
        tracking.set_tags_on_version(params, name, challenger, tags)
    return decision


@torch.no_grad()
def text_bpb(model_dir: Path, texts: list[str], max_bytes: int, batch_size: int) -> float:
    """Bits per byte of a GPT on the first `max_bytes` (whole documents) of `texts`."""
    from bigmodel.generate import TextGenerator

    gen = TextGenerator.load(model_dir)
    chosen, total = [], 0
    for t in texts:
        chosen.append(t)
        total += len(t.encode("utf-8"))
        if total >= max_bytes:
            break
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64)
                          for e in gen.tokenizer.encode_batch(chosen)])
    loss = window_loss(gen.model, ids, gen.model.cfg.block_size, batch_size)
    return loss / math.log(2) * len(ids) / total


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise BigModelError(f"{path}: not found (run the prepare stage first)")
    return pd.read_parquet(path)
