"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

An encoder of `n_layer` bidirectional blocks reads the source (padding keys get no weight); a
decoder of `n_decoder_layer` blocks reads the target so far (causal self-attention) and the
encoder output (cross-attention over the real source tokens). Source and target share one
embedding table, which is also the output projection (the paper's weight sharing, for a joint
vocabulary); embeddings are scaled by sqrt(C) and added to sinusoidal positions
(`positions="learned"`: a learned table instead). Pre-norm by default (`norm="post"` is the
paper's layout, which needs warm-up and a lower peak rate to train).

`copy_attention=True` adds See et al.'s (2017) pointer-generator output: one more attention
head, from the decoder's output over the encoder's, puts its weights on the source tokens' ids,
and a learned gate mixes that copy distribution with the vocabulary's. The model then returns
log-probabilities instead of logits (log_softmax leaves them unchanged, so training and
decoding read them the same way). Why: with tied, sqrt(C)-scaled embeddings the plain model
starts out predicting its own input token, and copying a name it has never seen is a circuit
it learns slowly; on the built-in code → bytecode task it gave BLEU 30 after 400 steps, and
52 with the copy attention (benchmarks/RESULTS.md).

Decoding (bigmodel/tasks/seq2seq.py) encodes once, projects each layer's cross-attention keys
and values once (`start`), then feeds one target token a step through `step`, with a KV cache
for the decoder's self-attention; `State.reorder` keeps the rows of surviving beams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigmodel.models.layers import Block, DecoderBlock, KVCache, sinusoidal_positions


@dataclass
class Seq2SeqConfig:
    vocab_size: int
    block_size: int = 128  # the longest source, and the longest target (BOS included)
    n_layer: int = 3  # encoder blocks
    n_decoder_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    norm: str = "pre"  # "pre" | "post" (the paper's)
    positions: str = "sinusoidal"  # "sinusoidal" (the paper's) | "learned"
    pad_id: int = 1
    bos_id: int = 2  # the decoder's first input
    eos_id: int = 0  # ends a target
    copy_attention: bool = False  # copy source tokens beside the vocabulary (See et al., 2017)


@dataclass
class State:
    """What decoding carries between steps: the encoder's cross-attention keys and values per
    decoder block, the source padding mask, and the self-attention caches."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    memory_mask: torch.Tensor  # (B, S) True = real source token
    caches: list[KVCache]
    pointer: tuple[torch.Tensor, torch.Tensor] | None = None  # copy keys (B, S, C), source ids

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        """Keep rows `index` of everything (a beam's hypotheses follow their parents).
        `same_sources`: every row moves to a row of the same source (a beam search's parents
        are its own source's hypotheses), so the source side (cross-attention keys and
        values, mask, copy keys), equal over those rows, stays as it is; only the
        self-attention caches move."""
        if not same_sources:
            self.kv = [(k[index], v[index]) for k, v in self.kv]
            self.memory_mask = self.memory_mask[index]
            if self.pointer is not None:
                self.pointer = (self.pointer[0][index], self.pointer[1][index])
        for cache in self.caches:
            cache.reorder(index)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        if cfg.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', not {cfg.positions!r}")
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)  # source, target and output: one matrix
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.block_size, C)
        else:
            self.register_buffer("pe", sinusoidal_positions(cfg.block_size, C), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        # Dropout where the paper puts it (section 5.4): on each sublayer's output and on the
        # embedded input; not on the attention weights (which keeps the fused CPU kernel).
        self.blocks = nn.ModuleList(  # the encoder
            Block(C, cfg.n_head, cfg.dropout, causal=False, norm=cfg.norm, attn_dropout=0.0)
            for _ in range(cfg.n_layer)
        )
        self.decoder = nn.ModuleList(
            DecoderBlock(C, cfg.n_head, cfg.dropout, norm=cfg.norm, attn_dropout=0.0)
            for _ in range(cfg.n_decoder_layer)
        )
        # Post-norm blocks end normalised; pre-norm leaves each residual stream raw.
        self.ln_enc = nn.LayerNorm(C, bias=False) if cfg.norm == "pre" else nn.Identity()
        self.ln_dec = nn.LayerNorm(C, bias=False) if cfg.norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.copy_attention:  # one attention head from the decoder's output over the encoder's
            self.copy_q = nn.Linear(C, C, bias=False)
            self.copy_k = nn.Linear(C, C, bias=False)
            self.copy_gate = nn.Linear(C, 1)  # the share of the vocabulary, per position
        self.last_copy: torch.Tensor | None = None  # (B, T, S) with attention_maps(True)
        self.keep_maps = False
        self._init_weights()
        self.lm_head.weight = self.wte.weight

    def _init_weights(self) -> None:
        """N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2 × blocks on the path);
        the token table N(0, C^-1/2), so that embeddings scaled by sqrt(C) have unit size next to
        the unit-size sinusoids (as in the paper's reference implementation)."""
        depth = 2 * (self.cfg.n_layer + self.cfg.n_decoder_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(depth) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        nn.init.normal_(self.wte.weight, mean=0.0, std=self.cfg.n_embd ** -0.5)
        if self.cfg.copy_attention:
            nn.init.zeros_(self.copy_gate.bias)

    def _embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = idx.size(1)
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.cfg.block_size}")
        pos = self.wpe.weight[start:start + T] if self.cfg.positions == "learned" \
            else self.pe[start:start + T]
        return self.drop(self.wte(idx) * math.sqrt(self.cfg.n_embd) + pos)  # (B, T, C)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states (B, S, C) of right-padded sources and their mask (B, S), True = real."""
        x = self._embed(src)
        mask = torch.ones_like(src, dtype=torch.bool)
        if src_lengths is not None:
            mask = torch.arange(src.size(1), device=src.device)[None, :] < src_lengths[:, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_enc(x), mask

    def hidden(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's token states (B, T, C): the backbone a task head reads."""
        return self.encode(idx, lengths)[0]

    def _pointer(self, memory: torch.Tensor, src: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        # (B, S, C) copy keys and the source ids (B, S)
        return (self.copy_k(memory), src) if self.cfg.copy_attention else None

    def _decode(self, tgt: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                memory_mask: torch.Tensor, caches: list[KVCache] | None = None,
                positions: torch.Tensor | None = None,
                pointer: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self._embed(tgt, caches[0].length if caches else 0)  # (B, T, C)
        for i, block in enumerate(self.decoder):
            x = block(x, kv[i], memory_mask, caches[i] if caches else None)
        x = self.ln_dec(x)
        h = x if positions is None else x[positions]  # (N, C): only the positions asked for
        logits = self.lm_head(h)  # (B, T, vocab) or (N, vocab)
        if pointer is None:
            return logits
        return self._mix_copy(x, logits, pointer, memory_mask, positions)

    def _mix_copy(self, x: torch.Tensor, logits: torch.Tensor,
                  pointer: tuple[torch.Tensor, torch.Tensor], memory_mask: torch.Tensor,
                  positions: torch.Tensor | None) -> torch.Tensor:
        """log(g · softmax(logits) + (1 - g) · copy): the copy distribution puts each source
        position's attention weight on that position's token id, g = sigmoid(gate(x)). Log-
        probabilities come out (log_softmax leaves them as they are, so every consumer of
        logits reads them unchanged). A probability is floored at 1e-30 before the log."""
        keys, src = pointer
        att = (self.copy_q(x) @ keys.transpose(1, 2)).float() / math.sqrt(x.size(-1))  # (B, T, S)
        att = att.masked_fill(~memory_mask[:, None, :], float("-inf")).softmax(-1)
        if self.keep_maps:
            self.last_copy = att.detach()
        gate = self.copy_gate(x).float()  # (B, T, 1)
        ids = src[:, None, :].expand(att.shape)  # (B, T, S)
        if positions is not None:
            att, gate, ids = att[positions], gate[positions], ids[positions]  # (N, S), (N, 1)
        gen = torch.sigmoid(gate)
        probs = (logits.float().softmax(-1) * gen).scatter_add(-1, ids, att * (1 - gen))
        return probs.clamp_min(1e-30).log()  # repeated source tokens add up; floor: no -inf

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor | None,
                tgt_in: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, vocab) for every target position at once, from the
        source (B, S) and the target shifted right (B, T), BOS first; with `positions` (B, T)
        bool, logits (N, vocab) of those N positions only (training skips the padding's
        projection onto the vocabulary). Right padding in tgt_in needs no mask: causal
        attention never looks right."""
        memory, mask = self.encode(src, src_lengths)
        kv = [block.cross.memory_kv(memory) for block in self.decoder]
        return self._decode(tgt_in, kv, mask, positions=positions,
                            pointer=self._pointer(memory, src))

    def start(self, src: torch.Tensor, src_lengths: torch.Tensor | None = None) -> State:
        """Encode once and project every decoder block's cross-attention keys and values."""
        memory, mask = self.encode(src, src_lengths)
        kv = [block.cross.memory_kv(memory) for block in self.decoder]
        return State(kv, mask, [KVCache(self.cfg.block_size) for _ in self.decoder],
                     self._pointer(memory, src))

    def step(self, tokens: torch.Tensor, state: State) -> torch.Tensor:
        """Logits (B, vocab) of the next token after feeding `tokens` (B, T) — the new ones, at
        the positions after those already cached — appending them to the caches."""
        return self._decode(tokens, state.kv, state.memory_mask, state.caches,
                            pointer=state.pointer)[:, -1]

    def decode_uncached(self, src: torch.Tensor, src_lengths: torch.Tensor | None,
                        prefix: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, vocab) after `prefix`, recomputing everything (no cache)."""
        return self(src, src_lengths, prefix)[:, -1]

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.cfg.positions == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per target token with a source as long (PaLM appendix B): 6N, plus
        12·C·T for each self-attention layer and for each decoder's cross-attention."""
        c = self.cfg
        return 6 * self.num_params() + 12 * (c.n_layer + 2 * c.n_decoder_layer) * c.block_size * c.n_embd

    def attention_maps(self, keep: bool) -> None:
        self.keep_maps = keep
        for block in self.blocks:
            block.attn.keep_maps = keep
        for block in self.decoder:
            block.attn.keep_maps = keep
            block.cross.keep_maps = keep


# the names the model registry (bigmodel/models/registry.py) builds a family from
Config, Model = Seq2SeqConfig, Seq2Seq
