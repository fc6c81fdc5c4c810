"""Stage `evaluate-pretrain@<run>`: a pretrained model on its held-out shards by its objective's
task (`evaluate_pretrained` of bigmodel/tasks/<objective>.py: clm bits per byte, mlm masked-token
accuracy, seq2seq BLEU and chrF), beside that task's baselines.
Output: metrics/evaluate-pretrain/<run>.json."""

from __future__ import annotations

import importlib

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.io import write_json
from bigmodel.stages import param_keys


def run(params: Params, name: str) -> str:
    task = importlib.import_module(f"bigmodel.tasks.{params.pretrain[name].objective}")
    with tracking.stage_run(f"evaluate-pretrain@{name}", params,
                            param_keys(params, "evaluate-pretrain", name)) as mlrun:
        metrics, summary = task.evaluate_pretrained(params, name)
        write_json(params.metrics_file("evaluate-pretrain", name), metrics)
        mlrun.metrics({k: v for k, v in tracking.flatten(metrics).items()
                       if isinstance(v, (int, float))})
    return summary
