"""Why a seq2seq model writes what it writes, for N test sources.

For each source the model's own output (its decoding settings) is fixed, then explained two ways:

- **Alignment maps**: teacher-forcing that output, the decoder's attention over the source
  (source tokens × output tokens): each decoder block's cross-attention (mean of heads) and,
  with `copy_attention`, the copy attention and the share of each output token that was copied.
  `alignment_accuracy` scores the last map where the answer is known: for output tokens that
  occur in the source (whitespace aside), how often its strongest source position holds that
  same token.
- **SHAP** (shap's Partition explainer over a Text masker, as for text-to-text models): the
  explained function maps a source with some tokens removed to the log-probability of each
  output token under teacher forcing, so every output token gets one attribution per source
  token. Checked by additivity (base + Σ values = f(source)) and by deletion: removing the
  source tokens with the largest total attribution should lower the output's log-probability
  more than removing as many at random.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bigmodel.tasks.attention import heatmaps, token_labels  # sets matplotlib's Agg backend

DELETE_FRACTION = 0.2  # of a source's tokens, removed for the deletion check


def explain(translator: Any, test: pd.DataFrame, out: Path, n_examples: int, max_evals: int,
            max_len: int, seed: int) -> tuple[dict[str, float], str]:
    """Alignment maps and SHAP values for `n_examples` test sources (cut to max_len tokens)."""
    picked = test.sample(min(n_examples, len(test)), random_state=seed)
    sources = [cut(translator.tok, s, max_len) for s in picked["source"]]
    # teacher-forced after a BOS: an output of block_size tokens is explained without its last
    limit = translator.model.cfg.block_size - 1
    outputs = [ids_of(translator, o)[:limit] for o in translator.translate(sources)]
    out.mkdir(parents=True, exist_ok=True)
    hits = total = 0
    for i, (source, target) in enumerate(zip(sources, outputs)):
        maps, src_ids = alignment(translator, source, target)
        h, n = alignment_hits(maps[-1][1], src_ids, target, translator.tok)
        hits, total = hits + h, total + n
        figure(translator, src_ids, target, maps, out / f"alignment_{i}.png")
    values = shap_values(translator, sources, outputs, max_evals, seed)
    write_html(values, sources, picked["target"].tolist(), translator, outputs, out / "shap.html")
    metrics = {"n_examples": len(sources),
               "alignment_accuracy": hits / total if total else float("nan"),
               "alignment_tokens": total,
               "additivity_max_error": additivity_error(translator, values, sources, outputs),
               **deletion_scores(translator, values, sources, outputs, seed)}
    summary = (f"{len(sources)} examples; alignment on copied tokens {metrics['alignment_accuracy']:.2f}; "
               f"deleting top-SHAP source tokens drops log p(output) by "
               f"{metrics['deletion_drop_shap']:.2f} vs {metrics['deletion_drop_random']:.2f} at random")
    return metrics, summary


def cut(tok: Any, text: str, max_len: int) -> str:
    """The longest prefix of `text` whose tokens (end of sequence included) fit in max_len."""
    enc = tok.encode(text)
    if len(enc.ids) <= max_len:
        return text
    return text[: enc.offsets[max_len - 2][1]] if max_len > 1 else ""


def ids_of(translator: Any, text: str) -> list[int]:
    """A decoded output as the ids the model emitted (byte-level BPE re-encodes exactly),
    without the end-of-sequence token the tokenizer appends."""
    return translator.tok.encode(text).ids[:-1]


@torch.no_grad()
def log_probs(translator: Any, sources: list[str], target: list[int]) -> np.ndarray:
    """(n, len(target) + 1): log p of each target token and then EOS, teacher-forced, for
    every source (the function SHAP explains)."""
    from bigmodel.tasks.seq2seq import encode_sources

    m = translator.model
    cfg = m.cfg
    seq = [*target, cfg.eos_id]
    rows = []
    for i in range(0, len(sources), 64):
        src, lengths = encode_sources(translator.tok, sources[i:i + 64], cfg.block_size, cfg.pad_id)
        tgt_in = torch.tensor([[cfg.bos_id, *seq[:-1]]]).expand(len(src), -1)
        logp = m(src, lengths, tgt_in).float().log_softmax(-1)  # (b, T, vocab)
        rows.append(logp[:, torch.arange(len(seq)), torch.tensor(seq)].numpy())
    return np.concatenate(rows)


@torch.no_grad()
def alignment(translator: Any, source: str, target: list[int]
              ) -> tuple[list[tuple[str, np.ndarray]], list[int]]:
    """[(title, (T, S) map)] teacher-forcing `target` + EOS; and the source ids."""
    from bigmodel.tasks.seq2seq import encode_sources

    m = translator.model
    cfg = m.cfg
    src, lengths = encode_sources(translator.tok, [source], cfg.block_size, cfg.pad_id)
    tgt_in = torch.tensor([[cfg.bos_id, *target]])
    m.attention_maps(True)
    try:
        m(src, lengths, tgt_in)
        maps = [(f"decoder block {i}: cross-attention", b.cross.last_map[0].mean(0).float().numpy())
                for i, b in enumerate(m.decoder)]
        if m.last_copy is not None:
            maps.append(("copy attention", m.last_copy[0].float().numpy()))
    finally:
        m.attention_maps(False)
        m.last_copy = None
    return maps, src[0].tolist()


def alignment_hits(att: np.ndarray, src_ids: list[int], target: list[int], tok: Any
                   ) -> tuple[int, int]:
    """(hits, tokens): output tokens found in the source (whitespace aside) whose strongest
    source position in `att` (T, S) holds the same id. Row t of the teacher-forced map
    predicts target[t]."""
    src = np.asarray(src_ids)
    hits = n = 0
    for t, token in enumerate(target):
        if token in src_ids and tok.decode([token]).strip():
            n += 1
            hits += int(src[int(att[t].argmax())] == token)
    return hits, n


def figure(translator: Any, src_ids: list[int], target: list[int],
           maps: list[tuple[str, np.ndarray]], path: Path) -> None:
    cfg = translator.model.cfg
    xs = token_labels(translator.tok, np.asarray(src_ids))
    ys = token_labels(translator.tok, np.asarray([*target, cfg.eos_id]))
    heatmaps(maps, xs, ys, "source token", "output token",
             (0.16 * len(xs) * len(maps) + 3, 0.16 * len(ys) + 2.5), path, aspect="auto")


def shap_values(translator: Any, sources: list[str], outputs: list[list[int]], max_evals: int,
                seed: int) -> list[Any]:
    """One shap Explanation per source: (source tokens, output tokens + EOS)."""
    from bigmodel.tasks.seq_cls import ShapTokenizer, import_shap

    shap = import_shap()

    masker = shap.maskers.Text(ShapTokenizer(translator.tok), mask_token="",
                               collapse_mask_token=False)
    values = []
    for source, target in zip(sources, outputs):
        names = token_labels(translator.tok, np.asarray([*target, translator.model.cfg.eos_id]))
        explainer = shap.Explainer(
            lambda xs, target=target: log_probs(translator, [str(x) for x in xs], target),
            masker, output_names=names, algorithm="partition", seed=seed)
        values.append(explainer([source], max_evals=max_evals, batch_size=64, silent=True)[0])
    return values


def additivity_error(translator: Any, values: list[Any], sources: list[str],
                     outputs: list[list[int]]) -> float:
    err = 0.0
    for v, source, target in zip(values, sources, outputs):
        full = log_probs(translator, [source], target)[0]
        err = max(err, float(np.abs(v.base_values + v.values.sum(0) - full).max()))
    return err


def deletion_scores(translator: Any, values: list[Any], sources: list[str],
                    outputs: list[list[int]], seed: int) -> dict[str, float]:
    """Mean drop in the output's total log-probability when the top 20% of source tokens by
    total SHAP value are removed, against as many removed at random."""
    rng = np.random.default_rng(seed)
    by_shap, at_random = [], []
    for v, source, target in zip(values, sources, outputs):
        segments = list(v.data)
        real = np.array([j for j, s in enumerate(segments) if s])  # not the (empty) specials
        k = max(1, int(round(DELETE_FRACTION * len(real))))
        top = set(real[np.argsort(-v.values[real].sum(1))[:k]].tolist())
        rand = set(rng.choice(real, size=k, replace=False).tolist())
        texts = [source, *("".join(s for j, s in enumerate(segments) if j not in drop)
                           for drop in (top, rand))]
        total = log_probs(translator, texts, target).sum(1)
        by_shap.append(total[0] - total[1])
        at_random.append(total[0] - total[2])
    return {"deletion_drop_shap": float(np.mean(by_shap)),
            "deletion_drop_random": float(np.mean(at_random))}


def write_html(values: list[Any], sources: list[str], references: list[str], translator: Any,
               outputs: list[list[int]], path: Path) -> None:
    from bigmodel.tasks.seq_cls import import_shap

    shap = import_shap()

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>SHAP explanations</title>"
             "</head><body><h1>SHAP: source tokens → log-probability of each output token</h1>"
             "<p>Click an output token to colour the source by its attributions.</p>"]
    for i, (v, source, reference) in enumerate(zip(values, sources, references)):
        output = translator.tok.decode(outputs[i])
        parts.append(f"<h3>example {i}</h3><p>source: <code>{html.escape(source)}</code><br>"
                     f"reference: <code>{html.escape(reference)}</code><br>"
                     f"model: <code>{html.escape(output)}</code></p>")
        parts.append(shap.plots.text(v, display=False))
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
