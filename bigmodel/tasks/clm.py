"""Task `clm`: a pretrained GPT as a text generator, scored in bits per byte.

- `TextGenerator`: prompt in → completion out (temperature, top-k and top-p sampling).
- `evaluate`: loss, perplexity and bits per byte over consecutive windows of the val and test
  shards, beside a unigram model of the train split (the floor a language model must beat).
- Gate metric: test bits per byte on the start of the test text, lower is better (bits per byte
  does not depend on the tokenizer, so models with different vocabularies compare fairly).

With the KV cache (the default) the prompt is run once (prefill) and each later step feeds only
the newest token. Positions are learned and end at `block_size`, so a cache cannot slide: once
the text is longer than `block_size`, every step reruns the model on the last `block_size`
tokens, exactly what `use_cache=False` does all along, so both give the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bigmodel.errors import BigModelError
from bigmodel.models import gpt as gpt_lib
from bigmodel.models import registry
from bigmodel.models.layers import KVCache
from bigmodel.objectives.clm import window_loss
from bigmodel.text import shards
from bigmodel.text.shards import Split
from bigmodel.text.tokenizers import EOT, load as load_tokenizer
from bigmodel.io import read_parquet

GATE_METRIC, HIGHER_IS_BETTER = "test_bpb", False
SERVING_INPUT = "prompt"
GENERATE_DEFAULTS = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 50, "top_p": 1.0,
                     "seed": -1}
SERVING_PARAMS = GENERATE_DEFAULTS  # what a request may set (the pyfunc passes them on)


@torch.no_grad()
def sample(model: gpt_lib.GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
           generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Extend `idx` (1, T) by up to `max_new_tokens`; temperature 0 is greedy decoding."""
    check_args(max_new_tokens, temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(0) != 1 or idx.size(1) == 0:
        raise BigModelError(f"generate: need one non-empty prompt of shape (1, T), "
                            f"got {tuple(idx.shape)}")
    cache = model.new_cache() if use_cache else None
    for _ in range(max_new_tokens):
        logits = next_logits(model, idx, cache)  # (1, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1:
                sorted_logits, order = logits.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching p
                logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return idx


def next_logits(model: gpt_lib.GPT, idx: torch.Tensor,
                cache: list[KVCache] | None) -> torch.Tensor:
    """Logits (1, vocab) for the token after `idx` (1, T): fed through the cache while the text
    fits in block_size (the prompt at once, then one token a step), else recomputed."""
    block = model.cfg.block_size
    if cache is not None and idx.size(1) <= block:
        logits, _ = model(idx[:, cache[0].length:], cache=cache)  # (1, T_new, vocab)
    else:
        logits, _ = model(idx[:, -block:])  # (1, min(T, block), vocab)
    return logits[:, -1, :].float()


def check_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One clear line for the first sampling argument out of range."""
    if max_new_tokens < 0:
        raise BigModelError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also catches NaN
        raise BigModelError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise BigModelError(f"generate: top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise BigModelError(f"generate: top_p must be in (0, 1] (1 = no nucleus filter), "
                            f"got {top_p}")


@dataclass
class TextGenerator:
    """A pretrained GPT with its tokenizer: prompt text in, completion text out."""

    model: gpt_lib.GPT
    tokenizer: object

    @classmethod
    def load(cls, directory: Path) -> "TextGenerator":
        info = registry.read_config(directory)
        if info["task"] != "clm":
            raise BigModelError(f"{directory}: a {info['family']} {info['task']} model, not a "
                                f"text generator (a pretrain run with objective clm)")
        model = registry.build(info["family"], info["arch"])
        registry.load_weights(model, directory)
        model.eval()
        return cls(model, load_tokenizer(directory / "tokenizer.json"))

    def predict(self, prompts: list[str], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The served answer: one `completion` per prompt."""
        p = {**GENERATE_DEFAULTS, **(params or {})}
        return pd.DataFrame({"completion": [
            self.complete(t, int(p["max_new_tokens"]), float(p["temperature"]), int(p["top_k"]),
                          float(p["top_p"]), None if int(p["seed"]) < 0 else int(p["seed"]))
            for t in prompts]})

    def complete(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
                 use_cache: bool = True) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        eos = self.tokenizer.token_to_id(EOT)
        if not ids:
            ids = [eos]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out = sample(self.model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p,
                     eos_id=eos, generator=gen, use_cache=use_cache)
        return self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


load = TextGenerator.load
SERVING_EXAMPLE = (pd.DataFrame({"prompt": ["def read_config(path):"]}), dict(GENERATE_DEFAULTS))


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model_dir: Path, splits: dict[str, Split], train: Split, eval_tokens: int,
             batch_size: int) -> tuple[dict[str, Any], str]:
    """Next-token loss over consecutive block_size windows of each split, and a unigram
    baseline (train-split token frequencies, add-one smoothed) on the same tokens."""
    gen = TextGenerator.load(model_dir)
    block = gen.model.cfg.block_size
    counts = np.bincount(np.asarray(train.tokens), minlength=gen.model.cfg.vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    scores: dict[str, float] = {}
    baseline: dict[str, float] = {}
    for split, data in splits.items():
        tokens = data.tokens[: (eval_tokens or len(data.tokens)) + 1]
        loss = window_loss(gen.model, tokens, block, batch_size)
        scores[f"{split}_loss"] = loss
        scores[f"{split}_perplexity"] = math.exp(loss)
        scores[f"{split}_bpb"] = loss / math.log(2) / data.bytes_per_token
        n = (len(tokens) - 1) // block * block
        uni = float(-log_p[np.asarray(tokens[1 : n + 1], dtype=np.int64)].mean())
        baseline[f"{split}_loss"] = uni
        baseline[f"{split}_bpb"] = uni / math.log(2) / data.bytes_per_token
    metrics = {"task": "clm", "family": "gpt", "test": scores, "baselines": {"unigram": baseline},
               "gate": {GATE_METRIC: scores["test_bpb"]}}
    return metrics, (f"test bpb {scores['test_bpb']:.3f} (unigram {baseline['test_bpb']:.3f}), "
                     f"perplexity {scores['test_perplexity']:.1f}")


def evaluate_pretrained(params: Any, name: str) -> tuple[dict[str, Any], str]:
    """`evaluate` on the run's val and test shards (the evaluate-pretrain stage)."""
    tokens = params.path("tokens", name)
    splits = {s: shards.load_split(tokens, s) for s in ("val", "test")}
    return evaluate(params.path("pretrain", name), splits, shards.load_split(tokens, "train"),
                    params.evaluate.eval_tokens, params.evaluate.batch_size)


@torch.no_grad()
def text_bpb(model_dir: Path, texts: list[str], max_bytes: int, batch_size: int) -> float:
    """Bits per byte of a GPT on the first `max_bytes` (whole documents) of `texts`."""
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


def gate_score(model_dir: Path, texts: list[str], max_bytes: int, batch_size: int) -> float:
    return text_bpb(model_dir, texts, max_bytes, batch_size)


GATE_MARGIN = "margin_bpb"  # the promote key: the drop in bits per byte a challenger needs


def gate_scorer(params: Any, name: str) -> Any:
    """Scores a model folder of pretrain run `name` for the champion gate: bits per byte on the
    start of its corpus's raw test text (any tokenizer: the text is the same)."""
    cfg, spec = params.promote, params.pretrain[name]
    test = params.path("data", spec.corpus) / "prepared" / "pretrain_test.parquet"
    if not test.is_file():
        raise BigModelError(f"{test}: not found (run the prepare stage first)")
    texts = read_parquet(test)["text"].tolist()
    return lambda model_dir: gate_score(model_dir, texts, cfg.lm_eval_bytes, params.evaluate.batch_size)


def explain_pretrained(params: Any, name: str, out: Path) -> tuple[dict[str, float], str]:
    """Attention maps of the first test documents (the evaluate-pretrain stage's explanation)."""
    from bigmodel.tasks import attention

    return attention.explain_run(params, name, out)
