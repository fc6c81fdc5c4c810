"""Text generation from a pretrained GPT: temperature, top-k and top-p (nucleus) sampling.

With the KV cache (the default) the prompt is run once (prefill) and each later step feeds only
the newest token. Positions are learned and end at `block_size`, so a cache cannot slide: once
the text is longer than `block_size`, every step reruns the model on the last `block_size`
tokens, exactly what `use_cache=False` does all along, so both give the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bigmodel.errors import BigModelError
from bigmodel.models import gpt as gpt_lib
from bigmodel.models.layers import KVCache
from bigmodel.tokenizer import EOT, load as load_tokenizer


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
        cfg = gpt_lib.read_config(directory)
        model = gpt_lib.GPT(gpt_lib.GPTConfig(**cfg["gpt"]))
        gpt_lib.load_weights(model, directory)
        model.eval()
        return cls(model, load_tokenizer(directory / "tokenizer.json"))

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
