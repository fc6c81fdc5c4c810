"""GPT: a decoder-only transformer (pre-norm, GELU MLP, learned positions, tied embeddings;
dropout on the residual branches, none on the attention weights).

`GPT.hidden` gives the token states any task head reads (bigmodel/models/heads.py); with right
padding and causal attention, padding never reaches a real token, so it needs no padding mask.

Generation passes a KV cache (`GPT.new_cache()`, one `KVCache` per block) to `forward`: each
call then feeds only the tokens not yet cached, at positions that follow the cached ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.models.layers import Block, KVCache, init_weights


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        # dropout on the residual branches only, as BERT and the seq2seq model have it: dropped
        # attention weights would take the CPU off its fused attention kernel (measured in the
        # gpt-cls finetune: 10.5 of its 28 s of forward passes were attention)
        self.blocks = nn.ModuleList(
            Block(cfg.n_embd, cfg.n_head, cfg.dropout, causal=True, attn_dropout=0.0)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layer)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix for input and output

    def hidden(self, idx: torch.Tensor, lengths: torch.Tensor | None = None,
               cache: list[KVCache] | None = None) -> torch.Tensor:
        """Token states (B, T, C). `lengths` (real tokens per right-padded row) is accepted for
        the common backbone signature and not needed: causal attention never looks right."""
        B, T = idx.shape
        start = cache[0].length if cache else 0  # tokens already in the cache come first
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        if cache is None:
            for block in self.blocks:
                x = block(x)
        else:
            for block, layer_cache in zip(self.blocks, cache, strict=True):
                x = block(x, cache=layer_cache)  # appends this chunk's keys/values
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.lm_head(self.hidden(idx, cache=cache))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def new_cache(self) -> list[KVCache]:
        """An empty KV cache for `forward(idx, cache=...)`: one per block, block_size long."""
        return [KVCache(self.cfg.block_size) for _ in self.blocks]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N + 12·L·T·C."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd

    def attention_maps(self, keep: bool) -> None:
        for block in self.blocks:
            block.attn.keep_maps = keep


# the names the model registry (bigmodel/models/registry.py) builds a family from
Config, Model = GPTConfig, GPT
