"""Blocks every model is built from: attention (SDPA), MLP, transformer blocks, positions.

Attention runs through `F.scaled_dot_product_attention`, which picks flash / memory-efficient
kernels on CUDA and a fused kernel on the CPU. Only when attention maps are asked for (the
explain stage) does it compute the softmax explicitly. For generation, `KVCache` keeps each
layer's keys and values so that a step feeds only the new tokens; `CrossAttention` takes the
encoder's keys and values once per source (`memory_kv`) and reuses them at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float, is_causal: bool) -> torch.Tensor:
    """`F.scaled_dot_product_attention`; on the CPU, bf16 queries, keys and values are
    attended in fp32 and the result cast back: the CPU's bf16 attention backward is about 4x
    slower than its fp32 one at these sizes (benchmarks/RESULTS.md), and the copies are small."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
            is_causal=is_causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal)


class KVCache:
    """One attention layer's keys and values of the tokens seen so far, for generation.

    Allocated on the first `append` for `max_len` positions (learned positions stop at
    block_size, so the cache never needs to grow): k, v are (B, nh, max_len, hs), of which the
    first `length` positions are filled.
    """

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new (B, nh, T, hs) keys and values; return all so far, (B, nh, length, hs)."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        if self.k is None:
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search: each surviving hypothesis takes its parent's keys).
        Only the filled positions move: the buffer is as long as the longest output."""
        if self.k is None:
            return
        if index.numel() != self.k.size(0):  # fewer or more rows: a new buffer
            self.k, self.v = self.k[index], self.v[index]
            return
        end = self.length
        self.k[:, :, :end] = self.k[:, :, :end].index_select(0, index)
        self.v[:, :, :end] = self.v[:, :, :end].index_select(0, index)


class SelfAttention(nn.Module):
    """`dropout` drops the output; `attn_dropout` (default: the same) the attention weights,
    which on the CPU also means the unfused attention kernel (the fused one has no dropout)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, causal: bool = True,
                 attn_dropout: float | None = None):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.causal = n_head, causal
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_drop = nn.Dropout(dropout)
        self.keep_maps = False  # set True to record `last_map` (B, nh, T, T) on each forward
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        mask, causal = None, self.causal
        if pad_mask is not None:  # (B, T) True = real token; keys that are padding get no weight
            mask = pad_mask[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if cache is not None:
            assert self.causal and pad_mask is None, "a KV cache is for causal decoding only"
            past = cache.length
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
            if past:  # is_causal aligns the mask top-left: wrong once keys precede the queries
                causal = False
                if T > 1:  # a chunk sees every cached key, and its own tokens causally
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
                # T == 1: the one new token attends to everything, no mask needed
        if self.keep_maps:
            y = self._explicit(q, k, v, mask, causal)
        else:
            y = attend(q, k, v, mask, self.dropout if self.training else 0.0,
                       causal and mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T_k)
        if mask is None and causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = att.softmax(dim=-1)
        self.last_map = att.detach()
        return att @ v  # (B, nh, T, hs)


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output (`memory`), padding
    keys masked: the attention of "Attention Is All You Need"'s decoder that reads the source.
    `memory_kv(memory)` projects the keys and values once; decoding steps pass them back in."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0,
                 attn_dropout: float | None = None):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.q = nn.Linear(n_embd, n_embd, bias=False)
        self.kv = nn.Linear(n_embd, 2 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_drop = nn.Dropout(dropout)
        self.keep_maps = False  # True: record `last_map` (B, nh, T, S), the alignment to the source
        self.last_map: torch.Tensor | None = None

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, nh, S, hs), of encoder states (B, S, C)."""
        B, S, C = memory.shape
        k, v = self.kv(memory).split(C, dim=2)
        hs = C // self.n_head
        return (k.view(B, S, self.n_head, hs).transpose(1, 2),
                v.view(B, S, self.n_head, hs).transpose(1, 2))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) attends over the source keys/values `kv`; memory_mask (B, S) True = real."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k, v = kv
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, S)
        if self.keep_maps:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = att.softmax(dim=-1)
            self.last_map = att.detach()
            y = att @ v
        else:
            y = attend(q, k, v, mask, self.dropout if self.training else 0.0, False)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Transformer block, pre-norm by default: x + attn(ln(x)), then x + mlp(ln(x)).

    norm="post" is the original Transformer / BERT block: x = ln(x + attn(x)), then
    ln(x + mlp(x)). Same modules and parameter names either way, so ln_1 is the norm that
    belongs to attention and ln_2 the MLP's (which is how they map onto a Hugging Face BERT layer).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, causal: bool = True,
                 norm: str = "pre", attn_dropout: float | None = None):
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', not {norm!r}")
        self.norm = norm
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal, attn_dropout)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.norm == "post":
            x = self.ln_1(x + self.attn(x, pad_mask, cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), pad_mask, cache)
        return x + self.mlp(self.ln_2(x))


class DecoderBlock(nn.Module):
    """The encoder-decoder Transformer's decoder block: causal self-attention, attention over
    the encoder output, MLP; pre-norm by default, norm="post" is the 2017 paper's layout."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, norm: str = "pre",
                 attn_dropout: float | None = None):
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', not {norm!r}")
        self.norm = norm
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal=True, attn_dropout=attn_dropout)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.cross = CrossAttention(n_embd, n_head, dropout, attn_dropout)
        self.ln_3 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.norm == "post":
            x = self.ln_1(x + self.attn(x, cache=cache))
            x = self.ln_2(x + self.cross(x, kv, memory_mask))
            return self.ln_3(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), cache=cache)
        x = x + self.cross(self.ln_2(x), kv, memory_mask)
        return x + self.mlp(self.ln_3(x))


def sinusoidal_positions(n_positions: int, n_embd: int) -> torch.Tensor:
    """(n_positions, n_embd) sin/cos position encodings of Vaswani et al. (2017), section 3.5:
    PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(pos / 10000^(2i/C))."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    rate = torch.pow(10000.0, -torch.arange(0, n_embd, 2, dtype=torch.float64) / n_embd)
    table = torch.zeros(n_positions, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * rate)
    table[:, 1::2] = torch.cos(pos * rate)[:, : n_embd // 2]
    return table.float()


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
        nn.init.normal_(p, mean=0.0, std=std)


class ClassificationHead(nn.Module):
    """Pooled hidden state → class logits."""

    def __init__(self, n_embd: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(n_embd, n_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(pooled))  # (B, n_classes)
