"""Stage `evaluate@<finetune run>`: a finetuned model on the test split of its labelled set by its
task's metrics (bigmodel/tasks/<task>.py), beside the task's baselines trained on the same
train split. Output: metrics/evaluate/<run>.json; `reports/evaluate/<run>/` (predictions,
confusion matrix or per-type table)."""

from __future__ import annotations

import importlib
import time

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.data.prepared import read_split
from bigmodel.io import atomic_path, write_json
from bigmodel.stages import param_keys


def run(params: Params, name: str) -> str:
    spec = params.finetune[name]
    task = importlib.import_module(f"bigmodel.tasks.{spec.task}")
    prepared = params.path("data", spec.data) / "prepared"
    train, val, test = (read_split(prepared, spec.task, s, name) for s in ("train", "val", "test"))
    out_dir = params.path("evaluate", name)
    with tracking.stage_run(f"evaluate@{name}", params, param_keys(params, "evaluate", name)) as mlrun:
        start = time.perf_counter()
        with atomic_path(out_dir) as out:
            metrics, summary = task.evaluate(params.path("finetune", name), train, val, test, out,
                                             params.seed, params.evaluate.batch_size)
        # the whole evaluation's rate over the test split (the baselines' training included)
        metrics["test_examples_per_s"] = len(test) / (time.perf_counter() - start)
        write_json(params.metrics_file("evaluate", name), metrics)
        mlrun.metrics({k: v for k, v in tracking.flatten(metrics).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlrun.artifact(out_dir, "evaluate")
    return summary
