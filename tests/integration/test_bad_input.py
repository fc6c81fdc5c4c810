"""The bad-input catalogue: each case is a command a user might type against a project whose
stages have run, after one thing went wrong (a param, a raw file, an upstream output, a
checkpoint, a generation argument). Every case must end with exit code 2 and one line on stderr
naming the file or key, with no traceback, and leave every output byte for byte as it was.

The commands are `bigmodel.cli.main` with the arguments a user types, in this process (a
process each would add seconds of imports to every case); `test_a_bad_input_as_a_process`
checks the same contract on the real executable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from bigmodel import cli
from bigmodel.data.sources import load_builtin
from tests.conftest import make_project, stage_env

FAMILIES = ["asyncio", "email", "files", "numeric"]
ONLY = {"data": ["raw"], "tokenizer": ["bpe"], "pretrain": ["gpt"], "finetune": ["gpt-cls"]}


def run_cli(root: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main([*args, "--params", str(root / "params.yaml")]
                            if "--params" not in args else list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:  # noqa: ANN001
    """A project whose GPT chain has run: prepared data, tokenizer, shards, a pretrained GPT
    with its checkpoint, and a finetuned classifier."""
    root = tmp_path_factory.mktemp("catalogue") / "project"
    labelled = load_builtin().labelled
    rows = labelled[labelled["label"].isin(FAMILIES)].groupby("label").head(40)
    (root / "raw").mkdir(parents=True)
    rows.to_json(root / "raw" / "part.jsonl", orient="records", lines=True)
    make_project(root, {
        "data": {"raw": {"source": "files", "files": {
            "glob": "raw/*.jsonl", "text_column": "text", "label_column": "label",
            "group_column": "group"}}},
        "tokenizer": {"bpe": {"data": "raw", "vocab_size": 400}},
        "pretrain": {"gpt": {"corpus": "raw", "max_steps": 10, "checkpoint_interval": 5,
                             "eval_interval": 5}},
        "finetune": {"gpt-cls": {"data": "raw"}}}, only=ONLY)
    for stage, name in (("prepare", "raw"), ("tokenizer", "bpe"), ("tokenize", "gpt"),
                        ("pretrain", "gpt"), ("finetune", "gpt-cls")):
        code, _, err = run_cli(root, stage, "--name", name)
        assert code == 0, err[-3000:]
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the project but the tracking store (a failed stage may record a
    failed run there)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(("mlflow.db", "mlartifacts/", "cases/")):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    id: str
    args: Callable[[Path], list[str]]  # may plant what the case needs (under cases/ or aside)
    names: str  # what the one line must name: a file, a key, an argument


def raw(folder: str, files: dict[str, bytes | str]) -> Callable[[Path], None]:
    def plant(root: Path) -> None:
        (root / "cases" / folder).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            path = root / "cases" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return plant


def with_raw(folder: str, files: dict[str, bytes | str], glob: str, *extra: str) -> Callable:
    def args(root: Path) -> list[str]:
        raw(folder, files)(root)
        return ["prepare", "--name", "raw", "--set", f"data.raw.files.glob=cases/{folder}/{glob}",
                *extra]
    return args


def images(folder: str, classes: dict[str, int]) -> Callable[[Path], list[str]]:
    def args(root: Path) -> list[str]:
        for label, count in classes.items():
            (root / "cases" / folder / label).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8), 16 * i, dtype=np.uint8)).save(
                    root / "cases" / folder / label / f"{i}.png")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["data"]["pics"] = {"kind": "image", "source": "files",
                                  "files": {"glob": f"cases/{folder}/*/*.png"}}
        params["tokenizer"]["pixels"] = {"kind": "image", "text": "image_cls", "data": "pics"}
        (root / "cases").mkdir(exist_ok=True)
        (root / f"case-{folder}.yaml").write_text(yaml.safe_dump(params))  # paths from root
        return ["prepare", "--name", "pics", "--params", str(root / f"case-{folder}.yaml")]
    return args


def conll_run(folder: str, text: str) -> Callable[[Path], list[str]]:
    """A tagged data run `ner` of one CoNLL file, in a params file of its own."""
    def args(root: Path) -> list[str]:
        raw(folder, {"a.conll": text})(root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["data"]["ner"] = {"source": "files",
                                 "files": {"format": "conll", "glob": f"cases/{folder}/*.conll"}}
        (root / f"case-{folder}.yaml").write_text(yaml.safe_dump(params))  # paths from root
        return ["prepare", "--name", "ner", "--params", str(root / f"case-{folder}.yaml")]
    return args


def params_file(text: str) -> Callable[[Path], list[str]]:
    def args(root: Path) -> list[str]:
        (root / "cases").mkdir(exist_ok=True)
        (root / "cases" / "bad.yaml").write_text(text)
        return ["check", "--params", str(root / "cases" / "bad.yaml")]
    return args


class Broken:
    """Damages one upstream file (or moves a folder aside) for one case; `undo` puts it back."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] = []

    def keep(self, path: Path) -> None:
        backup = path.with_name(path.name + ".case-backup")
        if path.is_dir():
            shutil.copytree(path, backup)
        else:
            shutil.copy2(path, backup)

        def put_back() -> None:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
            backup.rename(path)
        self.undo.append(put_back)

    def write(self, path: Path, content: bytes) -> None:
        self.keep(path)
        path.write_bytes(content)

    def truncate(self, path: Path) -> None:
        self.write(path, path.read_bytes()[: max(1, path.stat().st_size // 3)])

    def remove(self, path: Path) -> None:
        self.keep(path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


BROKEN = Broken()


def broken(how: str, rel: str, then: list[str], content: bytes = b"") -> Callable[[Path], list[str]]:
    def args(root: Path) -> list[str]:
        path = root / rel
        if how == "truncate":
            BROKEN.truncate(path)
        elif how == "remove":
            BROKEN.remove(path)
        else:
            BROKEN.write(path, content)
        return then
    return args


def json_edit(rel: str, change: dict, then: list[str]) -> Callable[[Path], list[str]]:
    def args(root: Path) -> list[str]:
        path = root / rel
        data = json.loads(path.read_text())
        BROKEN.write(path, json.dumps({**data, **change}).encode())
        return then
    return args


def other_vocab_checkpoint(root: Path) -> list[str]:
    """The checkpoint's weights swapped for a model of another vocabulary (same params)."""
    path = root / "models/checkpoints/gpt/model.safetensors"
    weights = load_file(path)
    vocab = json.loads((root / "data/tokens/gpt/meta.json").read_text())["vocab_size"]
    name = next(k for k, v in weights.items() if v.ndim == 2 and v.shape[0] == vocab)
    weights[name] = weights[name][:-7].clone()
    BROKEN.keep(path)
    save_file(weights, path)
    return ["pretrain", "--name", "gpt", "--resume"]


GOOD_ROW = '{"text": "def f(a):\\n    return a + 1\\n", "label": "numeric", "group": "g"}\n'
PRETRAIN = ["pretrain", "--name", "gpt"]
FINETUNE = ["finetune", "--name", "gpt-cls"]

CASES = [
    # params
    Case("param-unknown-key", lambda r: ["check", "--set", "pretrain.gpt.n_layers=2"], "n_layers"),
    Case("param-wrong-type", lambda r: [*PRETRAIN, "--set", "pretrain.gpt.n_layer=two"], "n_layer"),
    Case("param-out-of-range", lambda r: [*PRETRAIN, "--set", "pretrain.gpt.batch_size=0"],
         "batch_size"),
    Case("param-heads-do-not-divide", lambda r: [*PRETRAIN, "--set", "pretrain.gpt.n_embd=33"],
         "n_embd"),
    Case("param-unknown-run", lambda r: ["pretrain", "--name", "nope"], "nope"),
    Case("param-override-without-value", lambda r: ["check", "--set", "pretrain.gpt.n_layer"],
         "pretrain.gpt.n_layer"),
    Case("params-file-missing", lambda r: ["check", "--params", str(r / "missing.yaml")],
         "missing.yaml"),
    Case("params-file-not-yaml", params_file("pretrain: [unclosed\n  gpt: {"), "bad.yaml"),
    Case("params-file-not-a-mapping", params_file("- just\n- a list\n"), "bad.yaml"),
    # raw data
    Case("raw-glob-matches-nothing", lambda r: ["prepare", "--name", "raw", "--set",
                                                "data.raw.files.glob=cases/nowhere/*.jsonl"],
         "cases/nowhere/*.jsonl"),
    Case("raw-txt-not-utf8", with_raw("latin1", {"a.txt": "caf\xe9 au lait\n".encode("latin-1")},
                                      "*.txt"), "a.txt"),
    Case("raw-jsonl-malformed-line", with_raw("badjson", {"a.jsonl": GOOD_ROW + '{"text": "x",\n'},
                                              "*.jsonl"), "a.jsonl"),
    Case("raw-csv-without-text-column", with_raw("csv", {"a.csv": "body,label\nx,y\n"}, "*.csv"),
         "text"),
    Case("raw-tsv-without-text-column", with_raw("tsv", {"a.tsv": "body\tlabel\nx\ty\n"}, "*.tsv"),
         "text"),
    Case("raw-conll-line-with-one-column", conll_run("conll1", "Paris B-LOC\nsaid\n"), "a.conll:2"),
    Case("raw-conll-tag-not-iob", conll_run("conll2", "Paris LOCATION\n"), "LOCATION"),
    Case("raw-label-column-missing", with_raw("nolabel", {"a.jsonl": '{"text": "x", "group": "g"}\n'},
                                              "*.jsonl"), "label"),
    Case("raw-unsupported-format", with_raw("xls", {"a.xlsx": b"PK\x03\x04"}, "*.xlsx"), "a.xlsx"),
    Case("raw-empty-after-filtering", with_raw("empty", {"a.jsonl": '{"text": "", "label": "a", '
                                                                    '"group": "g"}\n' * 20},
                                               "*.jsonl"), "raw"),
    Case("raw-one-class", with_raw("oneclass", {"a.jsonl": "".join(
        json.dumps({"text": f"def f{i}(a):\n    return a * {i}\n", "label": "numeric",
                    "group": f"g{i}"}) + "\n" for i in range(60))}, "*.jsonl"), "class"),
    Case("images-one-class", images("pics1", {"only": 12}), "class"),
    Case("images-no-images", images("pics0", {}), "pics0"),
    # upstream outputs
    Case("tokenizer-missing", broken("remove", "models/tokenizer/bpe", ["tokenize", "--name", "gpt"]),
         "models/tokenizer/bpe"),
    Case("tokenizer-corrupt", broken("truncate", "models/tokenizer/bpe/tokenizer.json",
                                     ["tokenize", "--name", "gpt"]), "tokenizer.json"),
    Case("prepared-missing", broken("remove", "data/raw/prepared", ["tokenizer", "--name", "bpe"]),
         "data/raw/prepared"),
    Case("prepared-corrupt", broken("truncate", "data/raw/prepared/pretrain_train.parquet",
                                    ["tokenizer", "--name", "bpe"]), "pretrain_train.parquet"),
    Case("shards-truncated", broken("truncate", "data/tokens/gpt/train.bin", PRETRAIN), "train.bin"),
    Case("shards-meta-corrupt", broken("write", "data/tokens/gpt/meta.json", PRETRAIN, b"{"),
         "meta.json"),
    Case("shards-from-another-tokenizer", json_edit("data/tokens/gpt/meta.json",
                                                    {"tokenizer_sha256": "0" * 64}, PRETRAIN),
         "another tokenizer"),
    Case("pretrained-model-missing", broken("remove", "models/pretrain/gpt", FINETUNE),
         "models/pretrain/gpt"),
    Case("pretrained-weights-corrupt", broken("truncate", "models/pretrain/gpt/model.safetensors",
                                              FINETUNE), "model.safetensors"),
    Case("pretrained-config-corrupt", broken("write", "models/pretrain/gpt/config.json", FINETUNE,
                                             b"\x00\xff not json"), "config.json"),
    Case("pretrained-with-another-tokenizer", json_edit("models/pretrain/gpt/config.json",
                                                        {"tokenizer_sha256": "1" * 64}, FINETUNE),
         "tokenizer.json"),
    Case("pretrained-model-of-another-family", json_edit("models/pretrain/gpt/config.json",
                                                         {"family": "bert"}, FINETUNE),
         "holds a bert model, but pretrain.gpt is a gpt run"),
    Case("finetuned-model-missing", broken("remove", "models/finetune/gpt-cls",
                                           ["evaluate", "--name", "gpt-cls"]),
         "models/finetune/gpt-cls"),
    # checkpoints
    Case("checkpoint-corrupt", broken("truncate", "models/checkpoints/gpt/trainer.pt",
                                      [*PRETRAIN, "--resume"]), "models/checkpoints/gpt"),
    Case("checkpoint-state-not-json", broken("write", "models/checkpoints/gpt/state.json",
                                             [*PRETRAIN, "--resume"], b"step: ten"), "state.json"),
    Case("checkpoint-of-another-architecture",
         lambda r: [*PRETRAIN, "--resume", "--set", "pretrain.gpt.n_embd=64"],
         "params pretrain.gpt.n_embd changed"),
    Case("checkpoint-of-another-vocabulary", other_vocab_checkpoint, "model.safetensors"),
    # generation and translation arguments
    Case("generate-no-tokens", lambda r: ["generate", "--prompt", "def", "--max-new-tokens", "-5"],
         "max_new_tokens"),
    Case("generate-negative-temperature", lambda r: ["generate", "--prompt", "def",
                                                     "--temperature", "-1"], "temperature"),
    Case("generate-top-p-above-one", lambda r: ["generate", "--prompt", "def", "--top-p", "1.5"],
         "top_p"),
    Case("generate-negative-top-k", lambda r: ["generate", "--prompt", "def", "--top-k", "-3"],
         "top_k"),
    Case("generate-without-a-model", broken("remove", "models/pretrain/gpt",
                                            ["generate", "--prompt", "def"]), "models/pretrain/gpt"),
    Case("translate-without-a-seq2seq-run", lambda r: ["translate", "--source", "x"], "seq2seq"),
]


def test_the_catalogue_is_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(project, case):  # noqa: ANN001
    try:
        args = case.args(project)
        before = snapshot(project)
        code, _, err = run_cli(project, *args)
        after = snapshot(project)
    finally:
        while BROKEN.undo:
            BROKEN.undo.pop()()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.names in lines[0], lines[0]
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], changed


@pytest.mark.slow
def test_a_bad_input_as_a_process(project):  # noqa: ANN001
    before = snapshot(project)
    done = subprocess.run([sys.executable, "-m", "bigmodel.cli", "pretrain", "--name", "gpt",
                           "--params", str(project / "params.yaml"),
                           "--set", "pretrain.gpt.n_embd=33"],
                          cwd=project, env=stage_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = [l for l in done.stderr.splitlines() if l.strip()]
    assert line.startswith("error: ") and "pretrain.gpt: n_embd (33)" in line
    assert snapshot(project) == before
