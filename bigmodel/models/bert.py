"""BERT: a bidirectional transformer encoder with the masked-LM and next-sentence heads.

Token + learned position + segment embeddings, then LayerNorm and dropout (as Hugging Face's
BertEmbeddings), then `n_layer` blocks of bidirectional self-attention in which padding keys
get no weight. `forward`/`hidden` return the hidden states, so task heads wrap the encoder the
way they wrap a GPT; the pre-training heads are separate calls:

- `mlm_logits(h)`: dense + GELU + LayerNorm, then a decoder tied to the token embeddings plus an
  output bias; it takes any (..., C) so the objective projects only the masked positions;
- `nsp_logits(h)`: the pooler (dense + tanh on the [CLS], position-0, state), then 2 classes.

Post-norm (`norm="post"`, LayerNorm after each residual add) is the default because it is the
original BERT, so every parameter maps one to one onto a Hugging Face `BertForPreTraining`
(qkv splits into query/key/value; the bias-free linears and norms export with zero biases,
and layer_norm_eps is 1e-5) for a later export. `norm="pre"` (the GPT block, plus a final
LayerNorm) trains more stably when deep but has no Hugging Face BERT counterpart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.models.layers import Block


@dataclass
class BERTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    type_vocab_size: int = 2  # segments: 0 = [CLS] A [SEP], 1 = B [SEP]
    norm: str = "post"  # "post" (original BERT) | "pre"
    nsp: bool = False  # has the next-sentence head (without it DDP would see unused parameters)
    pad_id: int = 0  # recorded for an export (HF pad_token_id); padding itself comes as lengths


class BERT(nn.Module):
    def __init__(self, cfg: BERTConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.wse = nn.Embedding(cfg.type_vocab_size, C)  # segment (token type) embeddings
        self.ln_emb = nn.LayerNorm(C, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        # Dropout on the embeddings and each sublayer's output, not on the attention weights:
        # on the CPU attention dropout forces the unfused attention kernel (measured:
        # benchmarks/RESULTS.md), and short pretraining runs underfit rather than overfit (the
        # Cramming study drops dropout altogether). An export sets attention_probs_dropout 0.
        self.blocks = nn.ModuleList(
            Block(C, cfg.n_head, cfg.dropout, causal=False, norm=cfg.norm, attn_dropout=0.0)
            for _ in range(cfg.n_layer)
        )
        # Post-norm blocks end normalised; pre-norm leaves the residual stream raw.
        self.ln_f = nn.LayerNorm(C, bias=False) if cfg.norm == "pre" else nn.Identity()
        self.mlm_dense = nn.Linear(C, C)
        self.mlm_ln = nn.LayerNorm(C, bias=False)
        self.mlm_decoder = nn.Linear(C, cfg.vocab_size)  # its bias is the output bias
        if cfg.nsp:
            self.pooler = nn.Linear(C, C)
            self.nsp_head = nn.Linear(C, 2)
        self._init_weights()
        self.mlm_decoder.weight = self.wte.weight  # weight tying: one matrix for input and output

    def _init_weights(self) -> None:
        """As Hugging Face's BertPreTrainedModel: N(0, 0.02) matrices, zero biases. No GPT-2
        1/sqrt(2L) scaling of residual projections: that is for an unnormalised residual stream
        growing with depth, which post-norm renormalises after every add."""
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, idx: torch.Tensor, lengths: torch.Tensor | None = None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) of right-padded rows: `lengths` (B,) counts each row's real
        tokens (None: no padding); `segments` (B, T) token types (None: all 0). Real positions
        never see the padding; the states at padding positions are meaningless."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        x = x + (self.wse(segments) if segments is not None else self.wse.weight[0])
        x = self.drop(self.ln_emb(x))
        pad_mask = None  # (B, T) True = real token; every row needs one (its [CLS])
        if lengths is not None:
            pad_mask = pos[None, :] < lengths[:, None]
        for block in self.blocks:
            x = block(x, pad_mask)
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden(idx, lengths, segments)  # (B, T, C)

    def mlm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits of hidden states (..., C) → (..., vocab)."""
        return self.mlm_decoder(self.mlm_ln(F.gelu(self.mlm_dense(h))))

    def nsp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-sentence logits (B, 2) from hidden states (B, T, C): 0 = B follows A."""
        if not self.cfg.nsp:
            raise ValueError("this BERT has no next-sentence head (built with nsp=False)")
        pooled = torch.tanh(self.pooler(h[:, 0]))  # (B, C), the [CLS] state
        return self.nsp_head(pooled)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; non_embedding leaves out the position and segment tables (the token
        table stays: it is also the MLM decoder), as GPT.num_params does."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() + self.wse.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N + 12·L·T·C, the GPT formula, so the
        two compare. An upper bound: the vocab projection runs on the masked ~15% only."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd

    def attention_maps(self, keep: bool) -> None:
        for block in self.blocks:
            block.attn.keep_maps = keep


# the names the model registry (bigmodel/models/registry.py) builds a family from
Config, Model = BERTConfig, BERT
