"""Stage `evaluate-pretrain@<run>`: a pretrained model on its held-out shards by its objective's
task (`evaluate_pretrained` of bigmodel/tasks/<objective>.py: clm bits per byte, mlm masked-token
accuracy, seq2seq BLEU and chrF, image_cls accuracy, macro-F1 and calibration on its own
classes), beside that task's baselines; then explained by the same task (`explain_pretrained`:
attention maps of test documents for GPT and BERT; alignment maps and SHAP attributions of its
outputs for seq2seq; SHAP maps and Grad-CAM of test images, with the test figures, for a ResNet).
Output: metrics/evaluate-pretrain/<run>.json, reports/explain/<run>/, metrics/explain/<run>.json."""

from __future__ import annotations

import importlib
import time

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.io import atomic_path, write_json
from bigmodel.stages import param_keys


def run(params: Params, name: str) -> str:
    task = importlib.import_module(f"bigmodel.tasks.{params.pretrain[name].objective}")
    with tracking.stage_run(f"evaluate-pretrain@{name}", params,
                            param_keys(params, "evaluate-pretrain", name)) as mlrun:
        metrics, summary = task.evaluate_pretrained(params, name)
        start = time.perf_counter()
        out_dir = params.path("explain", name)
        with atomic_path(out_dir) as out:
            explained, why = task.explain_pretrained(params, name, out)
        explained["seconds"] = time.perf_counter() - start
        write_json(params.metrics_file("evaluate-pretrain", name), metrics)
        write_json(params.metrics_file("explain", name), explained)
        mlrun.metrics({k: v for k, v in tracking.flatten(metrics).items()
                       if isinstance(v, (int, float))})
        mlrun.metrics({f"explain_{k}": v for k, v in explained.items()})
        mlrun.artifact(out_dir, "explain")
    return f"{summary}; {why}"
