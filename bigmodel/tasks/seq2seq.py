"""Task `seq2seq`: text in, text out, from an encoder-decoder model.

Decoding encodes each source once and feeds the decoder one token a step with a KV cache
(`greedy`, `beam_search`; `greedy(..., cache=False)` recomputes the whole prefix each step, the
reference the cache is tested against). Beam search is batched over sources × beams, scores a
finished hypothesis by its log-probability over GNMT's length penalty ((5 + |Y|) / 6)^α (Wu et
al., 2016; |Y| counts the EOS, or the last token of an output cut at the limit), keeps the
`beam_size` best finished ones, and stops a source once no live hypothesis can beat the worst of
them (its log-probability can only fall; its penalty is at most that of the longest allowed
output, a × source tokens + b), or at that length. Neither decoder ever emits PAD or BOS.

Evaluation scores the test split with sacreBLEU (BLEU and chrF, with their signatures) beside
two baselines on the same split: the source copied as the output, and the target of the
training pair whose source is nearest by TF-IDF cosine (retrieval). `Translator` is what the
served model runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer

from bigmodel.errors import BigModelError
from bigmodel.models import registry
from bigmodel.models.seq2seq import Seq2Seq
from bigmodel.text import shards
from bigmodel.text.shards import Pairs
from bigmodel.text.tokenizers import load as load_tokenizer, specials
from bigmodel.io import read_parquet

GATE_METRIC, HIGHER_IS_BETTER = "bleu", True
SERVING_INPUT = "source"
# served params: 0 means the model's own decoding settings (its run's beam_size; a × source + b)
SERVING_PARAMS = {"beam_size": 0, "max_new_tokens": 0}
N_EXAMPLES = 5  # test pairs shown in the report (source, reference, model)


def max_lengths(src_lengths: torch.Tensor, a: float, b: int, block_size: int) -> torch.Tensor:
    """The longest output (tokens, EOS included) allowed for each source: a × length + b,
    capped by the positions the decoder has."""
    return torch.clamp((a * src_lengths.double()).long() + b, max=block_size)


@torch.no_grad()
def greedy(model: Seq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, max_len: torch.Tensor,
           cache: bool = True) -> list[list[int]]:
    """The most likely next token at each step until EOS or `max_len` (B,) tokens; outputs
    without BOS and EOS."""
    cfg = model.cfg
    B = src.size(0)
    tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    state = model.start(src, src_lengths) if cache else None
    for t in range(int(max_len.max())):
        if state is not None:
            logits = model.step(tokens[:, -1:], state)
        else:
            logits = model.decode_uncached(src, src_lengths, tokens)
        nxt = never_special(logits, cfg).argmax(-1)
        nxt = torch.where(done, cfg.pad_id, nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= (nxt == cfg.eos_id) | (t + 1 >= max_len)
        if bool(done.all()):
            break
    return [_strip(row[1:].tolist(), cfg.eos_id, cfg.pad_id) for row in tokens]


def never_special(logits: torch.Tensor, cfg: Any) -> torch.Tensor:
    """Float logits with PAD and BOS ruled out: an output is text, then EOS."""
    logits = logits.float().clone()
    logits[:, [cfg.pad_id, cfg.bos_id]] = float("-inf")
    return logits


def _strip(ids: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for i in ids:
        if i in (eos, pad):
            break
        out.append(i)
    return out


def length_penalty(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


def coverage_penalty(coverage: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """GNMT's coverage penalty (Wu et al., 2016): β Σ_i log(min(Σ_j p_ij, 1)) over the real
    source tokens i, p_ij the attention target token j paid to source token i; 0 when every
    source token got a full unit of attention, very negative for an output that ignored most
    of its source."""
    if beta == 0:
        return torch.zeros(coverage.size(0), device=coverage.device)
    covered = coverage.clamp(min=1e-6, max=1.0).log()
    return beta * torch.where(mask, covered, torch.zeros_like(covered)).sum(-1)


@torch.no_grad()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int,
                alpha: float, max_len: torch.Tensor, beta: float = 0.0) -> list[list[int]]:
    """The best of `beam_size` hypotheses per source by log-probability / length penalty
    (+ coverage penalty β, measured on the last decoder block's cross-attention averaged over
    heads); outputs without BOS and EOS. beam_size 1 is greedy decoding."""
    cfg = model.cfg
    B, K, dev = src.size(0), beam_size, src.device
    state = model.start(src.repeat_interleave(K, 0), src_lengths.repeat_interleave(K, 0))
    cross = model.decoder[-1].cross
    keep = cross.keep_maps
    cross.keep_maps = beta > 0
    coverage = torch.zeros(B * K, src.size(1), device=dev)  # attention each source token got
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start as the same empty hypothesis: expand one
    hyps = torch.full((B * K, 1), cfg.bos_id, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    open_ = [True] * B
    limit = max_len.tolist()
    try:
        for t in range(1, int(max_len.max()) + 1):
            logp = never_special(model.step(hyps[:, -1:], state), cfg).log_softmax(-1)  # (B*K, V)
            if beta > 0:  # the attention that produced token t: each child shares its parent's
                coverage = coverage + cross.last_map[:, :, -1].mean(1)  # (B*K, S)
                cp = coverage_penalty(coverage, state.memory_mask, beta).view(B, K).tolist()
            V = logp.size(-1)
            cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
            top, idx = cand.topk(2 * K, dim=1)  # (B, 2K): enough to keep K that do not end
            parent, token = idx // V, idx % V
            # the next beams, built as lists and made tensors once (an indexed write per kept
            # hypothesis was a fifth of the decoding time)
            next_scores = [[float("-inf")] * K for _ in range(B)]
            next_parent = [[0] * K for _ in range(B)]
            next_token = [[cfg.pad_id] * K for _ in range(B)]
            top_l, parent_l, token_l = top.tolist(), parent.tolist(), token.tolist()
            for b in range(B):
                if not open_[b]:
                    continue
                kept = 0
                for j in range(2 * K):
                    score, p, tok = top_l[b][j], parent_l[b][j], token_l[b][j]
                    if score == float("-inf"):
                        break
                    ends = tok == cfg.eos_id or t >= limit[b]
                    if ends:
                        if j < K:  # an ending among the K best is a finished hypothesis
                            body = hyps[b * K + p, 1:].tolist() + ([] if tok == cfg.eos_id else [tok])
                            final = score / length_penalty(t, alpha) + (cp[b][p] if beta > 0 else 0.0)
                            finished[b].append((final, body))
                    elif kept < K:
                        next_scores[b][kept], next_parent[b][kept], next_token[b][kept] = score, p, tok
                        kept += 1
                finished[b] = sorted(finished[b], key=lambda f: -f[0])[:K]
                if t >= limit[b] or kept == 0:
                    open_[b] = False
                elif len(finished[b]) == K:
                    # Done when no live hypothesis can still beat the worst kept one: its
                    # log-prob only falls with more tokens, so its best normalised score is its
                    # score now over the largest penalty it could reach (at the limit; α >= 0),
                    # with a coverage penalty of at best 0.
                    best_live = next_scores[b][0] / length_penalty(limit[b], alpha)
                    if best_live <= finished[b][-1][0]:
                        open_[b] = False
            if not any(open_):
                break
            new_parent = torch.tensor(next_parent, device=dev)
            new_token = torch.tensor(next_token, device=dev)
            new_scores = torch.tensor(next_scores, device=dev)
            index = (torch.arange(B, device=dev)[:, None] * K + new_parent).view(-1)
            state.reorder(index, same_sources=True)
            coverage = coverage[index]
            hyps = torch.cat([hyps[index], new_token.view(-1, 1)], dim=1)
            scores = torch.where(torch.tensor(open_, device=dev)[:, None], new_scores,
                                 torch.full_like(new_scores, float("-inf")))
    finally:
        cross.keep_maps = keep
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


class Translator:
    """A seq2seq model folder → text in, text out (the served model)."""

    def __init__(self, directory: Path, device: str = "cpu"):
        info = registry.read_config(directory)
        if info.get("task") != "seq2seq":
            raise BigModelError(f"{directory}: a {info.get('task')} model, not a seq2seq one")
        self.model = registry.build(info["family"], info["arch"])
        registry.load_weights(self.model, directory)
        self.model.to(device).eval()
        self.tok = load_tokenizer(directory / "tokenizer.json")
        self.decoding = info.get("decoding", {})
        self.device = device

    @classmethod
    def load(cls, directory: Path) -> "Translator":
        return cls(directory)

    def predict(self, texts: list[str], params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The served answer: one `output` per source."""
        p = {**SERVING_PARAMS, **(params or {})}
        beam, new = int(p["beam_size"]), int(p["max_new_tokens"])
        if beam < 0 or new < 0:
            raise BigModelError("beam_size and max_new_tokens must be >= 0 (0: the model's own)")
        return pd.DataFrame({"output": self.translate(texts, beam or None, new or None)})

    def translate(self, texts: list[str], beam_size: int | None = None,
                  max_new_tokens: int | None = None, batch_size: int = 32) -> list[str]:
        if not all(isinstance(t, str) for t in texts):
            raise BigModelError("every input must be a string")
        d = self.decoding
        k = int(beam_size if beam_size is not None else d.get("beam_size", 4))
        if k < 1 or (max_new_tokens is not None and max_new_tokens < 1):
            raise BigModelError("beam_size and max_new_tokens must be at least 1")
        out: list[str] = []
        for i in range(0, len(texts), batch_size):
            src, lengths = encode_sources(self.tok, texts[i:i + batch_size],
                                          self.model.cfg.block_size, self.model.cfg.pad_id)
            src, lengths = src.to(self.device), lengths.to(self.device)
            if max_new_tokens is not None:
                limit = torch.full_like(lengths, min(max_new_tokens, self.model.cfg.block_size))
            else:
                limit = max_lengths(lengths, d.get("max_len_a", 1.2), d.get("max_len_b", 10),
                                    self.model.cfg.block_size)
            ids = beam_search(self.model, src, lengths, k, d.get("length_penalty", 0.6), limit,
                              d.get("coverage_penalty", 0.0))
            out += self.tok.decode_batch(ids, skip_special_tokens=True)
        return out


def encode_sources(tok: Tokenizer, texts: list[str], block_size: int, pad: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded source ids as training saw them (the text, <|endoftext|>, cut to block)."""
    ids = [e.ids[:block_size] for e in tok.encode_batch(texts)]
    return pad_rows(ids, pad)


def pad_rows(rows: list[list[int]] | list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    return out, torch.tensor([max(len(r), 1) for r in rows])


def decode_split(tok: Tokenizer, pairs: Pairs) -> tuple[list[str], list[str]]:
    """The (source, target) texts of a tokenized split: byte-level BPE decodes exactly."""
    eos = specials(tok).eot
    srcs = [[i for i in pairs.source(j).tolist() if i != eos] for j in range(len(pairs))]
    tgts = [[i for i in pairs.target(j).tolist() if i != eos] for j in range(len(pairs))]
    return tok.decode_batch(srcs), tok.decode_batch(tgts)


def translate_split(model: Seq2Seq, pairs: Pairs, beam_size: int, alpha: float, a: float, b: int,
                    batch_size: int, beta: float = 0.0) -> list[list[int]]:
    """Model outputs (ids) for every pair of a split, sources batched by length."""
    cfg = model.cfg
    order = np.argsort(pairs.src_lengths, kind="stable")
    out: list[list[int]] = [[] for _ in range(len(pairs))]
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        src, lengths = pad_rows([pairs.source(j)[:cfg.block_size] for j in rows], cfg.pad_id)
        limit = max_lengths(lengths, a, b, cfg.block_size)
        if beam_size == 1:
            ids = greedy(model, src, lengths, limit)
        else:
            ids = beam_search(model, src, lengths, beam_size, alpha, limit, beta)
        for j, seq in zip(rows, ids):
            out[j] = seq
    return out


def scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """sacreBLEU corpus BLEU and chrF, with the signatures that make them reproducible."""
    import sacrebleu

    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def retrieval_baseline(train_sources: list[str], train_targets: list[str],
                       test_sources: list[str]) -> list[str]:
    """The target of the training pair whose source is most similar (TF-IDF, cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    train = vec.fit_transform(train_sources)
    test = vec.transform(test_sources)
    best = np.asarray((test @ train.T).argmax(axis=1)).ravel()
    return [train_targets[i] for i in best]


def evaluate_pretrained(params: Any, name: str) -> tuple[dict[str, Any], str]:
    """`evaluate` on the run's test pairs (the evaluate-pretrain stage)."""
    tokens = params.path("tokens", name)
    return evaluate(params.path("pretrain", name), shards.load_pairs(tokens, "test"),
                    shards.load_pairs(tokens, "train"), params.evaluate.batch_size)


def explain_pretrained(params: Any, name: str, out: Path) -> tuple[dict[str, float], str]:
    """Alignment maps and SHAP attributions of the model's outputs for test sources
    (bigmodel/tasks/seq2seq_explain.py; the evaluate-pretrain stage's explanation)."""
    from bigmodel.tasks import seq2seq_explain

    test = params.path("data", params.pretrain[name].corpus) / "prepared" / "seq2seq_test.parquet"
    cfg = params.explain
    return seq2seq_explain.explain(Translator(params.path("pretrain", name)),
                                   read_parquet(test), out, cfg.n_examples, cfg.max_evals,
                                   cfg.max_len, params.seed)


GATE_MARGIN = "margin_bleu"  # the promote key: the BLEU gain a challenger needs


def gate_scorer(params: Any, name: str) -> Any:
    """Scores a model folder of pretrain run `name` for the champion gate: BLEU on its corpus's
    raw test pairs, each model reading them with its own tokenizer and decoding settings."""
    test = params.path("data", params.pretrain[name].corpus) / "prepared" / "seq2seq_test.parquet"
    if not test.is_file():
        raise BigModelError(f"{test}: not found (run the prepare stage first)")
    table = read_parquet(test)
    sources, references = table["source"].tolist(), table["target"].tolist()

    def score(model_dir: Path) -> float:
        outputs = Translator(model_dir).translate(sources, batch_size=params.evaluate.batch_size)
        return scores(outputs, references)["bleu"]

    return score


def saved_config(spec: Any) -> dict[str, Any]:
    """What a trained model's config.json keeps of its run: the decoding settings it is served
    and evaluated with."""
    return {"decoding": {k: getattr(spec, k) for k in
                         ("beam_size", "length_penalty", "coverage_penalty", "max_len_a",
                          "max_len_b")}}


def evaluate(model_dir: Path, test: Pairs, train: Pairs, batch_size: int) -> tuple[dict[str, Any], str]:
    info = registry.read_config(model_dir)
    model = registry.build(info["family"], info["arch"])
    registry.load_weights(model, model_dir)
    model.eval()
    tok = load_tokenizer(model_dir / "tokenizer.json")
    d = info["decoding"]
    sources, references = decode_split(tok, test)
    train_sources, train_targets = decode_split(tok, train)
    results: dict[str, Any] = {}
    outputs: dict[str, list[str]] = {}
    for name, k in (("greedy", 1), ("beam", d["beam_size"])):
        ids = translate_split(model, test, k, d["length_penalty"], d["max_len_a"], d["max_len_b"],
                              batch_size, d.get("coverage_penalty", 0.0))
        outputs[name] = tok.decode_batch(ids, skip_special_tokens=True)
        results[name] = scores(outputs[name], references)
    baselines = {"copy_source": scores(sources, references),
                 "retrieval": scores(retrieval_baseline(train_sources, train_targets, sources),
                                     references)}
    best = results["beam"]
    metrics = {
        "task": "seq2seq", "family": info["family"], "test_pairs": len(test),
        "test": {"bleu": best["bleu"], "chrf": best["chrf"], "beam_size": d["beam_size"],
                 "greedy_bleu": results["greedy"]["bleu"], "greedy_chrf": results["greedy"]["chrf"],
                 "bleu_signature": best["bleu_signature"],
                 "chrf_signature": best["chrf_signature"]},
        "baselines": {k: {"bleu": v["bleu"], "chrf": v["chrf"]} for k, v in baselines.items()},
        "examples": [{"source": sources[i], "reference": references[i],
                      "model": outputs["beam"][i]} for i in range(min(N_EXAMPLES, len(test)))],
        "gate": {GATE_METRIC: best["bleu"]},
    }
    return metrics, (f"test BLEU {best['bleu']:.2f} (greedy {results['greedy']['bleu']:.2f}, "
                     f"retrieval {baselines['retrieval']['bleu']:.2f}, copy "
                     f"{baselines['copy_source']['bleu']:.2f}), chrF {best['chrf']:.2f}")


load = Translator.load
SERVING_EXAMPLE = (pd.DataFrame({"source": ["def add(a, b): return a + b"]}), dict(SERVING_PARAMS))
