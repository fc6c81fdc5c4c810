"""Stage `explain@<finetune run>`: why the model predicts what it does, for N test examples, by
its task (bigmodel/tasks/<task>.py): SHAP token attributions and their faithfulness for a
classifier, attention maps and attention rollout for every model. Output:
`reports/explain/<run>/`; metrics/explain/<run>.json."""

from __future__ import annotations

import importlib
import time

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.data.prepared import read_split
from bigmodel.io import atomic_path, write_json
from bigmodel.stages import param_keys


def run(params: Params, name: str) -> str:
    spec, cfg = params.finetune[name], params.explain
    start = time.perf_counter()
    task = importlib.import_module(f"bigmodel.tasks.{spec.task}")
    test = read_split(params.path("data", spec.data) / "prepared", spec.task, "test", name)
    out_dir = params.path("explain", name)
    with tracking.stage_run(f"explain@{name}", params, param_keys(params, "explain", name)) as mlrun:
        with atomic_path(out_dir) as out:
            metrics, summary = task.explain(params.path("finetune", name), test, out,
                                            cfg.n_examples, cfg.max_evals, cfg.max_len, params.seed)
        metrics["seconds"] = time.perf_counter() - start
        if metrics.get("n_examples"):
            metrics["examples_per_s"] = metrics["n_examples"] / metrics["seconds"]
        write_json(params.metrics_file("explain", name), metrics)
        mlrun.metrics(metrics)
        mlrun.artifact(out_dir, "explain")
    return summary
