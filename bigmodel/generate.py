"""Text generation from a pretrained GPT: temperature, top-k and top-p (nucleus) sampling.

Each new token reruns the model on the last `block_size` tokens (no KV cache yet), which is fine
for the short completions the served model answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bigmodel.errors import BigModelError
from bigmodel.models import gpt as gpt_lib
from bigmodel.tokenizer import EOT, load as load_tokenizer


@torch.no_grad()
def sample(model: gpt_lib.GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend `idx` (1, T) by up to `max_new_tokens`; temperature 0 is greedy decoding."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 0:
        raise BigModelError("generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                            "max_new_tokens >= 0")
    block = model.cfg.block_size
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -block:])
        logits = logits[:, -1, :].float()  # (1, vocab)
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
                 top_k: int = 50, top_p: float = 1.0, seed: int | None = None) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        eos = self.tokenizer.token_to_id(EOT)
        if not ids:
            ids = [eos]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out = sample(self.model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p,
                     eos_id=eos, generator=gen)
        return self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
