"""The stages as commands, across data runs: a BERT pretrained on one dataset (a folder of text)
and finetuned as a tagger on another (the CoNLL fixture, its own fixed split), evaluated by
seqeval beside the most-frequent-tag baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bigmodel.data import conll
from bigmodel.models import registry
from tests.conftest import TINY_FINETUNE, TINY_PRETRAIN, stage_env

CONLL = Path(__file__).resolve().parents[1] / "fixtures" / "conll"


def bigmodel(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", *args, "--params",
                           str(root / "params.yaml")], cwd=root, env=stage_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_a_bert_pretrained_on_one_dataset_is_finetuned_as_a_tagger_on_conll_files(tmp_path):
    words = ["river", "market", "council", "report", "season", "bank", "minister", "city"]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "news.txt").write_text("\n\n".join(
        f"The {words[i % 8]} of {['Paris', 'Lagos', 'Oslo', 'Lima'][i % 4]} said on day {i} that "
        f"{['Smith', 'Ito', 'Okafor'][i % 3]} of {['Reuters', 'Fiat', 'UNESCO'][i % 3]} met the "
        f"{words[(i + 3) % 8]} again." for i in range(300)))
    params = {
        "data": {"news": {"source": "files", "files": {"glob": "corpus/*.txt"}},
                 "ner": {"source": "files", "files": {"format": "conll", "splits": {
                     "train": str(CONLL / "train.txt"), "val": str(CONLL / "dev.txt"),
                     "test": str(CONLL / "test.txt")}}}},
        "tokenizer": {"wp": {"kind": "wordpiece", "data": "news", "vocab_size": 400,
                             "min_frequency": 1}},
        "pretrain": {"enc": {"family": "bert", "objective": "mlm", "corpus": "news",
                             "tokenizer": "wp", **TINY_PRETRAIN, "max_steps": 20}},
        "finetune": {"enc-ner": {"base": "enc", "task": "token_cls", "data": "ner",
                                 **TINY_FINETUNE, "epochs": 2}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage, name in [("source", "news"), ("source", "ner"), ("prepare", "news"),
                        ("prepare", "ner"), ("tokenizer", "wp"), ("tokenize", "enc"),
                        ("pretrain", "enc"), ("finetune", "enc-ner")]:
        bigmodel(tmp_path, stage, "--name", name)
    done = bigmodel(tmp_path, "evaluate", "--name", "enc-ner").stdout
    assert "evaluate@enc-ner: done" in done and "most-frequent-tag baseline" in done

    info = registry.read_config(tmp_path / "models/finetune/enc-ner")
    assert (info["family"], info["task"], info["base"]) == ("bert", "token_cls", "enc")
    assert info["labels"][0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG"} <= set(info["labels"])
    metrics = json.loads((tmp_path / "reports/metrics/evaluate/enc-ner.json").read_text())
    test = conll.read_conll(CONLL / "test.txt")
    assert metrics["test"]["support"] == sum(t.startswith("B-") for _, tags in test
                                             for t in conll.to_iob2(tags))
    baseline = metrics["baselines"]["most_frequent_tag"]
    assert 0.5 < baseline["f1"] < 1  # names repeat across the fixture's splits, not all of them
    assert set(metrics["test"]["per_type"]) <= {"PER", "ORG", "LOC", "MISC"}
    lines = (tmp_path / "reports/evaluate/enc-ner/predictions.tsv").read_text().splitlines()
    assert len(lines) == len({tuple(w) for w, _ in test})  # every test sentence, word/actual/predicted
    assert all(len(cell.split("/")) >= 3 for cell in lines[0].split(" "))

    # the tagger's explanation: attention maps and the tags side by side
    bigmodel(tmp_path, "explain", "--name", "enc-ner")
    out = tmp_path / "reports/explain/enc-ner"
    assert (out / "attention_0.png").stat().st_size > 1000 and "<table>" in (out / "tags.html").read_text()
