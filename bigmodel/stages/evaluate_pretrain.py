"""Stage `evaluate-pretrain@<run>`: a pretrained model on its held-out shards by its objective's
task (bigmodel/tasks/clm.py: bits per byte; tasks/mlm.py: masked-token accuracy), beside a
unigram baseline. Output: metrics/evaluate-pretrain/<run>.json."""

from __future__ import annotations

from bigmodel import tracking
from bigmodel.config import Params
from bigmodel.io import write_json
from bigmodel.stages import param_keys
from bigmodel.text import shards


def run(params: Params, name: str) -> str:
    spec, cfg = params.pretrain[name], params.evaluate
    model_dir, tokens = params.path("pretrain", name), params.path("tokens", name)
    train = shards.load_split(tokens, "train")
    with tracking.stage_run(f"evaluate-pretrain@{name}", params,
                            param_keys(params, "evaluate-pretrain", name)) as mlrun:
        if spec.objective == "clm":
            from bigmodel.tasks import clm

            splits = {s: shards.load_split(tokens, s) for s in ("val", "test")}
            metrics, summary = clm.evaluate(model_dir, splits, train, cfg.eval_tokens, cfg.batch_size)
        else:
            from bigmodel.tasks import mlm

            metrics, summary = mlm.evaluate(model_dir, shards.load_split(tokens, "test"), train,
                                            cfg.eval_batches, cfg.batch_size, params.seed,
                                            spec.mask_rate)
        write_json(params.metrics_file("evaluate-pretrain", name), metrics)
        mlrun.metrics({k: v for k, v in tracking.flatten(metrics).items()
                       if isinstance(v, (int, float))})
    return summary
