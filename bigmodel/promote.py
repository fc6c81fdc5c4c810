"""The champion gate: move a registered model's `champion` alias only to a better model.

For each registered model the pipeline produces (every finetune run, every pretrain run whose
task serves as it is: clm, seq2seq), the newest version (the challenger, noted in its stage's
`registry.json`) and the version the alias points at (the champion) are scored on the *same*
test split, by the same code, now, with the metric of the model's task
(bigmodel/tasks/<task>.py, `gate_score` / `gate_scorer`):
- seq_cls: macro-F1 on its data run's `seq_cls_test.parquet` — higher is better;
- token_cls: entity F1 (seqeval) on `token_cls_test.parquet` — higher is better;
- clm: bits per byte on the start of its corpus's `pretrain_test.parquet` — lower is better;
- seq2seq: sacreBLEU BLEU on its corpus's `seq2seq_test.parquet` — higher is better.
The alias moves when there is no champion yet (unscored: there is nothing to compare with), or
when the challenger is better by at least `promote.margin` (F1) / `promote.margin_bpb` (bits
per byte) / `promote.margin_bleu` (BLEU). Every decision is written as tags on the challenger
version, so the registry says why each model was or was not promoted.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.errors import BigModelError
from bigmodel.io import read_json, read_parquet


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
    """Gate every registered model; returns one decision each."""
    decisions = [gate_finetuned(params, name) for name in params.finetune]
    decisions += [gate_pretrained(params, name) for name, spec in params.pretrain.items()
                  if hasattr(importlib.import_module(f"bigmodel.tasks.{spec.objective}"), "load")]
    return decisions


def gate_finetuned(params: Params, name: str) -> Decision:
    spec = params.finetune[name]
    task = importlib.import_module(f"bigmodel.tasks.{spec.task}")
    test = _read(params.path("data", spec.data) / "prepared" / f"{spec.task}_test.parquet")

    def score(model_dir: Path) -> float:
        return task.gate_score(model_dir, test, params.evaluate.batch_size)

    return _gate(params, params.path("finetune", name), task.GATE_METRIC, score,
                 higher_is_better=task.HIGHER_IS_BETTER, margin=params.promote.margin)


def gate_pretrained(params: Params, name: str) -> Decision:
    """A pretrain run served as it is, scored by its task's `gate_scorer`."""
    task = importlib.import_module(f"bigmodel.tasks.{params.pretrain[name].objective}")
    return _gate(params, params.path("pretrain", name), task.GATE_METRIC,
                 task.gate_scorer(params, name), higher_is_better=task.HIGHER_IS_BETTER,
                 margin=getattr(params.promote, task.GATE_MARGIN))


def _gate(params: Params, stage_dir: Path, metric: str, score: Callable[[Path], float],
          higher_is_better: bool, margin: float) -> Decision:
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
    new_score = old_score = None
    if champion is None:  # nothing to compare with: no need to score (the evaluate stage did)
        moved, reason = True, f"no {alias} yet: v{challenger} promoted"
    else:
        new_score = score(stage_dir)
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


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise BigModelError(f"{path}: not found (run the prepare stage first)")
    return read_parquet(path)
