"""Shared fixtures. Telemetry and hub access are switched off before any library loads."""

from __future__ import annotations

import os

os.environ.update(
    DO_NOT_TRACK="true",
    MLFLOW_DISABLE_TELEMETRY="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Under pytest-xdist each worker gets a Prefect home of its own (settings, local result storage)
# and one thread for torch (and the stage processes it starts): two workers on two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ["PREFECT_HOME"] = os.path.join(
        os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect"),
        os.environ["PYTEST_XDIST_WORKER"])
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A pipeline small enough for a test: the built-in corpus, tiny models, few steps.
TINY_PRETRAIN = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8,
                 "max_steps": 30, "warmup_steps": 5, "eval_interval": 15, "eval_batches": 2,
                 "log_interval": 5, "checkpoint_interval": 15}
TINY_FINETUNE = {"epochs": 1, "batch_size": 32, "max_len": 32, "warmup_steps": 2}
TINY_RESNET = {"width": 8, "batch_size": 32, "max_steps": 30, "warmup_steps": 5,
               "eval_interval": 15, "log_interval": 5, "checkpoint_interval": 15}
TINY_OVERRIDES = {
    "data": {"stdlib": {"max_per_class": 40, "max_tagged": 300}},
    "tokenizer": {"bpe": {"vocab_size": 512}, "wordpiece": {"vocab_size": 512},
                  "joint": {"vocab_size": 512}},
    "pretrain": {"gpt": TINY_PRETRAIN, "bert": TINY_PRETRAIN, "resnet": TINY_RESNET,
                 "seq2seq": {**TINY_PRETRAIN, "n_decoder_layer": 1, "max_len_b": 4}},
    "finetune": {"gpt-cls": TINY_FINETUNE, "bert-cls": TINY_FINETUNE, "bert-tag": TINY_FINETUNE,
                 "resnet-cls": {"epochs": 2, "warmup_steps": 2}},
    "evaluate": {"eval_tokens": 5000, "eval_batches": 2},
    "explain": {"n_examples": 2, "max_evals": 40, "max_len": 24},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)


# The GPT chain alone (for tests of the flows' mechanics, not of the families).
GPT_ONLY = {"data": ["stdlib"], "tokenizer": ["bpe"], "pretrain": ["gpt"], "finetune": ["gpt-cls"]}


def make_project(root: Path, overrides: dict | None = None, with_flows: bool = False,
                 only: dict[str, list[str]] | None = None) -> Path:
    """A fresh git + DVC project holding this repo's dvc.yaml and code and a tiny params.yaml
    (and, `with_flows`, the Prefect flows and prefect.yaml, for deploying from it). `only`
    keeps just the named runs of a section ({"pretrain": ["gpt"]})."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("bigmodel", "flows") if with_flows else ("bigmodel",):
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    if with_flows:
        shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_OVERRIDES)
    params = merge(params, overrides or {})
    for section, names in (only or {}).items():
        params[section] = {k: v for k, v in params[section].items() if k in names}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/reports/pipeline_report.md\n"
                                     "/.bigmodel/\n/models/checkpoints/\n")
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    dvc(root, "config", "core.check_update", "false")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "tiny project")
    return root


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True, env=stage_env())


def stage_env() -> dict[str, str]:
    """This interpreter's bin folder (bigmodel, dvc) first on PATH; DVC's site cache in tmp."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_SITE_CACHE_DIR"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "bigmodel-dvc-site")
    return env


@pytest.fixture
def tiny_texts() -> list[str]:
    base = [
        "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
        "class Queue:\n    \"\"\"A first-in, first-out queue.\"\"\"\n    def put(self, item): ...\n",
        "Open the file, read every line and close it again — naïve but dependable.",
        "import asyncio\nasync def main():\n    await asyncio.sleep(1)\n",
    ]
    return [f"{t}\n# variant {i}\n" for i in range(30) for t in base]


@pytest.fixture
def tiny_tokenizer(tiny_texts):  # noqa: ANN001, ANN201
    from bigmodel.text.tokenizers import train_bpe

    return train_bpe(iter(tiny_texts), vocab_size=300, min_frequency=1)


@pytest.fixture
def tiny_wordpiece(tiny_texts):  # noqa: ANN001, ANN201
    from bigmodel.text.tokenizers import train_wordpiece

    return train_wordpiece(iter(tiny_texts), vocab_size=300, min_frequency=1)


def save_tiny_model(directory: Path, tok, family: str = "gpt", task: str = "clm",  # noqa: ANN001
                    labels: list[str] | None = None, pooling: str = "mean",
                    arch: dict | None = None) -> Path:
    """A randomly initialised model folder in the layout the pretrain / finetune stages write."""
    import torch

    from bigmodel.models import heads, registry

    torch.manual_seed(0)
    arch = registry.arch_config(family, {"vocab_size": tok.get_vocab_size(), "block_size": 32,
                                         "n_layer": 1, "n_decoder_layer": 1, "n_head": 2,
                                         "n_embd": 16, **(arch or {})})
    model = registry.build(family, arch)
    extra: dict = {}
    if task in ("seq_cls", "token_cls"):
        extra = {"labels": labels, "max_len": 24, "pooling": pooling}
        model = heads.with_head(model, {"task": task, **extra})
    if task == "seq2seq":
        extra = {"decoding": {"beam_size": 3, "length_penalty": 0.6, "max_len_a": 0.5,
                              "max_len_b": 4}}
    registry.save(model, directory, family, task, arch, extra)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture
def tiny_classifier_dir(tmp_path, tiny_tokenizer):  # noqa: ANN001, ANN201
    return save_tiny_model(tmp_path / "classifier", tiny_tokenizer, "gpt", "seq_cls",
                           ["asyncio", "files", "gui"])


@pytest.fixture
def tiny_bert_classifier_dir(tmp_path, tiny_wordpiece):  # noqa: ANN001, ANN201
    return save_tiny_model(tmp_path / "bert-classifier", tiny_wordpiece, "bert", "seq_cls",
                           ["asyncio", "files", "gui"], pooling="cls")


@pytest.fixture
def tiny_tagger_dir(tmp_path, tiny_wordpiece):  # noqa: ANN001, ANN201
    return save_tiny_model(tmp_path / "tagger", tiny_wordpiece, "bert", "token_cls",
                           ["O", "B-FUNC", "I-FUNC", "B-PARAM", "I-PARAM"])


@pytest.fixture
def tiny_gpt_dir(tmp_path, tiny_tokenizer):  # noqa: ANN001, ANN201
    return save_tiny_model(tmp_path / "gpt", tiny_tokenizer)


@pytest.fixture
def tiny_seq2seq_dir(tmp_path, tiny_tokenizer):  # noqa: ANN001, ANN201
    return save_tiny_model(tmp_path / "seq2seq", tiny_tokenizer, "seq2seq", "seq2seq")


@pytest.fixture(scope="session")
def prefect_harness():  # noqa: ANN201
    """A temporary Prefect API (its own database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
