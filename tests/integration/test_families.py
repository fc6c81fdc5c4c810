"""The stages as commands, across data runs: a BERT pretrained on one dataset (a folder of text)
and finetuned as a tagger on another (the CoNLL fixture, its own fixed split), evaluated by
seqeval beside the most-frequent-tag baseline. Each command is `bigmodel.cli.main` with the
arguments a user types, in this process (a new process would add seconds of imports to each;
the stages as processes under DVC are the e2e tests')."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel.data import conll
from bigmodel.models import registry
from bigmodel import cli
from tests.conftest import TINY_FINETUNE, TINY_PRETRAIN, stage_env

CONLL = Path(__file__).resolve().parents[1] / "fixtures" / "conll"


def bigmodel(root: Path, *args: str) -> SimpleNamespace:
    if "--nproc" in args:  # torchrun's workers write to the real stdout: a process of its own
        proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", *args, "--params",
                               str(root / "params.yaml")], cwd=root, env=stage_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return SimpleNamespace(stdout=proc.stdout, stderr=proc.stderr)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main([*args, "--params", str(root / "params.yaml")])
    assert code == 0, err.getvalue()[-2000:]
    return SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue())


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
        "tokenizer": {"wp": {"kind": "wordpiece", "data": "news", "text": "pretrain",
                             "vocab_size": 400,
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


PARALLEL = Path(__file__).resolve().parents[1] / "fixtures" / "parallel"


@pytest.mark.slow
def test_a_seq2seq_model_learns_a_small_parallel_text_and_is_scored_by_sacrebleu(tmp_path):
    """The hand-written English → German fixture (20 training pairs), line-aligned files with
    their own split: the model overfits the training pairs; the test split is scored beside
    the baselines; the command line translates with the run's decoding settings."""
    params = {
        "data": {"en-de": {"source": "files", "min_chars": 5, "files": {
            "format": "aligned", "target_suffix": "de",
            "splits": {"train": str(PARALLEL / "train.en"), "val": str(PARALLEL / "dev.en"),
                       "test": str(PARALLEL / "test.en")}}}},
        "tokenizer": {"joint": {"kind": "bpe", "data": "en-de", "text": "seq2seq",
                                "vocab_size": 400, "min_frequency": 1}},
        "pretrain": {"mt": {"family": "seq2seq", "objective": "seq2seq", "corpus": "en-de",
                            "tokenizer": "joint", **TINY_PRETRAIN, "n_decoder_layer": 1,
                            "n_embd": 64, "dropout": 0.0, "label_smoothing": 0.0,
                            "max_steps": 250, "batch_size": 20, "lr": 0.01, "min_lr": 0.001,
                            "beam_size": 3, "eval_interval": 125, "checkpoint_interval": 250}},
        "finetune": {},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage, name in [("source", "en-de"), ("prepare", "en-de"), ("tokenizer", "joint"),
                        ("tokenize", "mt"), ("pretrain", "mt")]:
        bigmodel(tmp_path, stage, "--name", name)
    done = bigmodel(tmp_path, "evaluate-pretrain", "--name", "mt").stdout
    assert "test BLEU" in done and "retrieval" in done
    metrics = json.loads((tmp_path / "reports/metrics/evaluate-pretrain/mt.json").read_text())
    assert metrics["test_pairs"] == 5 and metrics["test"]["beam_size"] == 3
    assert metrics["test"]["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert [e["reference"] for e in metrics["examples"]] == \
        (PARALLEL / "test.de").read_text().splitlines()
    pretrained = json.loads((tmp_path / "reports/metrics/pretrain/mt.json").read_text())
    assert pretrained["train_loss"] < 0.5 and pretrained["target_tokens_per_s"] > 0

    # a training source comes back as its (memorised) target
    train_en = (PARALLEL / "train.en").read_text().splitlines()
    train_de = (PARALLEL / "train.de").read_text().splitlines()
    out = bigmodel(tmp_path, "translate", "--name", "mt", "--source", train_en[0]).stdout
    assert out.strip() == train_de[0]

    # the same trainer under DDP: two gloo processes, rank 0 alone logs, saves and registers
    ddp = bigmodel(tmp_path, "pretrain", "--name", "mt", "--nproc", "2",
                   "--set", "pretrain.mt.max_steps=20")
    assert ddp.stdout.count("pretrain@mt: done") == 1
    state = json.loads((tmp_path / "models/checkpoints/mt/state.json").read_text())
    assert (state["step"], state["world_size"], state["parallel"]) == (20, 2, "ddp")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(str(v.version) for v in client.search_model_versions("name='bigmodel-mt'")) \
        == ["1", "2"]
