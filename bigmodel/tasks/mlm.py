"""Task `mlm`: a BERT encoder scored on masked-token prediction.

Evaluation draws fixed masked batches from the test shard (the pretraining sampler, the same
15% / 80-10-10 masking) and reports masked-token accuracy and loss (and NSP accuracy for a
model trained with it), beside a unigram model of the train split on the same masked positions.
An MLM encoder is not registered for serving: its finetuned classifiers and taggers are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigmodel.models import registry
from bigmodel.objectives import mlm as objective
from bigmodel.text import shards
from bigmodel.text.shards import Split
from bigmodel.text.tokenizers import load as load_tokenizer, specials

GATE_METRIC, HIGHER_IS_BETTER = "masked_accuracy", True


def evaluate(model_dir: Path, test: Split, train: Split, n_batches: int, batch_size: int,
             seed: int, mask_rate: float) -> tuple[dict[str, Any], str]:
    info = registry.read_config(model_dir)
    model = registry.build(info["family"], info["arch"])
    registry.load_weights(model, model_dir)
    model.eval()
    sp = objective.specials_of(specials(load_tokenizer(model_dir / "tokenizer.json")))
    sampler = objective.MLMSampler(test.tokens, test.doc_starts, info["arch"]["block_size"],
                                   batch_size, seed, model.wte.weight.device, sp,
                                   bool(info["arch"].get("nsp")), rate=mask_rate)
    batches = [sampler() for _ in range(n_batches)]
    scores = objective.mlm_metrics(model, batches)
    baseline = objective.unigram_baseline(train.tokens, sp, batches)
    metrics = {"task": "mlm", "family": info["family"], "test": scores,
               "baselines": {"unigram": baseline},
               "gate": {GATE_METRIC: scores[GATE_METRIC]}}
    nsp = f", NSP accuracy {scores['nsp_accuracy']:.3f}" if "nsp_accuracy" in scores else ""
    return metrics, (f"test masked-token accuracy {scores['masked_accuracy']:.3f} (unigram "
                     f"{baseline['masked_accuracy']:.3f}), loss {scores['mlm_loss']:.3f}{nsp}")


def evaluate_pretrained(params: Any, name: str) -> tuple[dict[str, Any], str]:
    """`evaluate` on the run's test shard (the evaluate-pretrain stage)."""
    tokens = params.path("tokens", name)
    return evaluate(params.path("pretrain", name), shards.load_split(tokens, "test"),
                    shards.load_split(tokens, "train"), params.evaluate.eval_batches,
                    params.evaluate.batch_size, params.seed, params.pretrain[name].mask_rate)


def explain_pretrained(params: Any, name: str, out: Path) -> tuple[dict[str, float], str]:
    """Attention maps of the first test documents (the evaluate-pretrain stage's explanation)."""
    from bigmodel.tasks import attention

    return attention.explain_run(params, name, out)
