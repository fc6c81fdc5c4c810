"""Task `token_cls` (tagging): words in → a tag per word and the entity spans they form, for a
finetuned model of any family. Tags are IOB2 strings (`O`, `B-X`, `I-X`).

- Labels for sub-words (the first sub-word of each word carries the word's tag).
- Metrics and baseline: entity-level precision/recall/F1 per type with seqeval, beside the
  most-frequent-tag-per-word baseline a model has to beat.
- `Tagger`: the one inference path shared by evaluate, explain, the gate and serving.
- Explanation: attention maps and attention rollout, and the tags side by side.
- Gate metric: test entity F1, higher is better.
"""

from __future__ import annotations

import html
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from seqeval.metrics import classification_report
from seqeval.scheme import IOB2
from tokenizers import Tokenizer

from bigmodel.data.conll import to_iob2
from bigmodel.models.heads import load_finetuned
from bigmodel.text.tokenizers import encode_words, load as load_tokenizer

IGNORE = -100  # the label cross-entropy skips: special tokens and non-first sub-words


# --- Labels for sub-words -----------------------------------------------------------------------

def align_labels(word_ids: list[int | None], word_tags: list[int]) -> list[int]:
    """One label per sub-word: the first sub-word of each word gets its word's tag id; the other
    sub-words of the word and special/padding tokens (word id None) get IGNORE."""
    labels, seen = [], set()
    for word in word_ids:
        if word is None or word in seen:
            labels.append(IGNORE)
        else:
            if not 0 <= word < len(word_tags):
                raise ValueError(f"word id {word} out of range: {len(word_tags)} word tags")
            seen.add(word)
            labels.append(word_tags[word])
    return labels


# --- Metrics ------------------------------------------------------------------------------------

def entity_scores(actual: list[list[str]], predicted: list[list[str]]) -> dict:
    """Entity-level micro precision/recall/F1 (seqeval, strict IOB2), `per_type` scores with
    support (the number of actual entities), and token accuracy.

    Strict mode counts an entity only when its span and type match exactly and the predicted
    tags form it validly: an I-X that follows O is an error, not the start of an entity as in
    seqeval's default (conlleval) mode, so a model is not credited for tags the IOB2 decoder
    would reject. On valid IOB2 predictions the two modes agree. The actual tags go through
    `to_iob2` first (a no-op on IOB2), so IOB1 gold spans are not silently dropped."""
    if len(actual) != len(predicted):
        raise ValueError(f"{len(actual)} actual sentences but {len(predicted)} predicted")
    for i, (a, p) in enumerate(zip(actual, predicted)):
        if len(a) != len(p):
            raise ValueError(f"sentence {i}: {len(a)} actual tags but {len(p)} predicted")
    tokens = sum(len(a) for a in actual)
    if tokens == 0:
        raise ValueError("no tokens to score")
    gold = [to_iob2(list(a)) for a in actual]
    guess = [list(p) for p in predicted]
    with warnings.catch_warnings():  # numpy warns on the macro average when there are no entities
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(gold, guess, mode="strict", scheme=IOB2, output_dict=True,
                                       zero_division=0)
    micro = report["micro avg"]
    per_type = {
        kind: {"precision": float(r["precision"]), "recall": float(r["recall"]),
               "f1": float(r["f1-score"]), "support": int(r["support"])}
        for kind, r in sorted(report.items()) if not kind.endswith(" avg")
    }
    correct = sum(x == y for a, p in zip(actual, predicted) for x, y in zip(a, p))
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "support": int(micro["support"]),
        "token_accuracy": correct / tokens,
        "per_type": per_type,
    }


# --- Baseline -----------------------------------------------------------------------------------

def most_frequent_tag_baseline(train_tokens: list[list[str]], train_tags: list[list[str]],
                               test_tokens: list[list[str]]) -> list[list[str]]:
    """Each test word gets the tag it had most often in train (ties: O first, then the smallest
    tag in sort order); words never seen get O. Each sentence is then repaired to valid IOB2:
    an I-X that does not continue an X entity becomes B-X."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for words, tags in zip(train_tokens, train_tags, strict=True):
        if len(words) != len(tags):
            raise ValueError(f"a train sentence has {len(words)} tokens but {len(tags)} tags")
        for word, tag in zip(words, tags):
            counts[word][tag] += 1
    best = {word: min(c.items(), key=lambda kv: (-kv[1], kv[0] != "O", kv[0]))[0]
            for word, c in counts.items()}
    return [to_iob2([best.get(word, "O") for word in words]) for words in test_tokens]


# --- the predictor ------------------------------------------------------------------------

GATE_METRIC, HIGHER_IS_BETTER = "entity_f1", True
SERVING_INPUT = "text"
WORD = re.compile(r"\w+|[^\w\s]")  # how served text is split into words


def decode_words(logits: np.ndarray, word_ids: list[int | None], n_words: int,
                 labels: list[str]) -> list[str]:
    """Word tags from token logits (T, n_tags): each word takes the tag predicted at its first
    sub-word; a word cut off by max_len gets O; then repaired to valid IOB2 (an I-X that does
    not continue an X entity becomes B-X)."""
    tags = ["O"] * n_words
    seen: set[int] = set()
    for pos, w in enumerate(word_ids[: len(logits)]):
        if w is not None and w not in seen:
            seen.add(w)
            tags[w] = labels[int(logits[pos].argmax())]
    return to_iob2(tags)


def entities(words: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """The spans of valid IOB2 tags: type, first and last word index, text."""
    spans: list[dict[str, Any]] = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (not spans or spans[-1]["end"] != i - 1
                                                             or spans[-1]["type"] != tag[2:])):
            spans.append({"type": tag[2:], "start": i, "end": i})
        elif tag.startswith("I-"):
            spans[-1]["end"] = i
    for s in spans:
        s["text"] = " ".join(words[s["start"] : s["end"] + 1])
    return spans


@dataclass
class Tagger:
    model: nn.Module  # heads.TokenClassifier
    tokenizer: Tokenizer
    labels: list[str]
    max_len: int
    info: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> "Tagger":
        model, info = load_finetuned(directory)
        return cls(model, load_tokenizer(directory / "tokenizer.json"), info["labels"],
                   info["max_len"], info)

    @torch.no_grad()
    def tag(self, sentences: list[list[str]], batch_size: int = 64) -> list[list[str]]:
        out: list[list[str]] = []
        for i in range(0, len(sentences), batch_size):
            chunk = sentences[i : i + batch_size]
            ids, lengths, word_ids = encode_words(self.tokenizer, chunk, self.max_len)
            logits = self.model(torch.from_numpy(ids), torch.from_numpy(lengths)).float().numpy()
            out += [decode_words(logits[j], word_ids[j], len(words), self.labels)
                    for j, words in enumerate(chunk)]
        return out

    def predict_words(self, sentences: list[list[str]]) -> pd.DataFrame:
        """The served answer: `tokens`, `tags` and `entities` per sentence."""
        tags = self.tag(sentences)
        return pd.DataFrame({"tokens": sentences, "tags": tags,
                             "entities": [entities(w, t) for w, t in zip(sentences, tags)]})

    def predict(self, texts: list[str]) -> pd.DataFrame:
        return self.predict_words([WORD.findall(t) for t in texts])


load = Tagger.load


def gate_score(model_dir: Path, test: pd.DataFrame, batch_size: int) -> float:
    tagger = Tagger.load(model_dir)
    predicted = tagger.tag([list(w) for w in test["tokens"]], batch_size)
    return entity_scores([list(t) for t in test["tags"]], predicted)["f1"]


# --- evaluation: the model beside the baseline on the same split ----------------------------

def evaluate(model_dir: Path, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame,
             out: Path, seed: int, batch_size: int) -> tuple[dict[str, Any], str]:
    """Entity-level scores on the test split beside the most-frequent-tag baseline; the
    predictions (one sentence a line: word/actual/predicted) in `out`."""
    tagger = Tagger.load(model_dir)
    words = [list(w) for w in test["tokens"]]
    actual = [list(t) for t in test["tags"]]
    predicted = tagger.tag(words, batch_size)
    scores = entity_scores(actual, predicted)
    baseline = entity_scores(actual, most_frequent_tag_baseline(
        [list(w) for w in train["tokens"]], [list(t) for t in train["tags"]], words))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.tsv", "w") as f:
        for w, a, p in zip(words, actual, predicted):
            f.write(" ".join(f"{x}/{y}/{z}" for x, y, z in zip(w, a, p)) + "\n")
    metrics = {"task": "token_cls", "family": tagger.info["family"], "test": scores,
               "baselines": {"most_frequent_tag": baseline}, "gate": {GATE_METRIC: scores["f1"]}}
    return metrics, (f"test entity F1 {scores['f1']:.3f} (most-frequent-tag baseline "
                     f"{baseline['f1']:.3f}), token accuracy {scores['token_accuracy']:.3f}")


# --- explanation ------------------------------------------------------------------------------

def explain(model_dir: Path, test: pd.DataFrame, out: Path, n_examples: int, max_evals: int,
            max_len: int, seed: int) -> tuple[dict[str, float], str]:
    """Attention maps and rollout for `n_examples` test sentences, and their tags side by side
    (actual, predicted) in tags.html. `max_evals` is a SHAP budget, not used by a tagger."""
    from bigmodel.tasks import attention

    tagger = Tagger.load(model_dir)
    picked = test.sample(min(n_examples, len(test)), random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["<!doctype html><html><head><meta charset='utf-8'><title>tags</title></head><body>"
            "<h1>Tagged test sentences (actual / predicted)</h1>"]
    for i, (words, actual) in enumerate(zip(picked["tokens"], picked["tags"])):
        words, actual = list(words), list(actual)
        predicted = tagger.tag([words])[0]
        ids, lengths, _ = encode_words(tagger.tokenizer, [words], min(max_len, tagger.max_len))
        attention.figure(tagger.model, tagger.model.backbone, tagger.tokenizer, ids, lengths,
                         out / f"attention_{i}.png")
        cells = "".join(f"<td>{html.escape(w)}<br><small>{html.escape(a)}<br>"
                        f"<b style='color:{'green' if a == p else 'red'}'>{html.escape(p)}</b>"
                        f"</small></td>" for w, a, p in zip(words, actual, predicted))
        rows.append(f"<h3>sentence {i}</h3><table><tr>{cells}</tr></table>")
    (out / "tags.html").write_text("\n".join(rows) + "</body></html>")
    return {"n_examples": len(picked)}, f"{len(picked)} sentences: attention maps and tags"
