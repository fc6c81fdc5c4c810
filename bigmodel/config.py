"""The schema of params.yaml: load, override (`--set a.b=v`), validate, all before any work."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bigmodel.errors import BigModelError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Paths(Section):
    """Where each stage writes; relative paths are resolved against the params file's folder."""

    source: str = "data/source.json"  # snapshot of the raw source (files, sizes, hashes)
    prepared: str = "data/prepared"
    tokenizer: str = "models/tokenizer"
    tokens: str = "data/tokens"
    pretrain: str = "models/pretrain"
    finetune: str = "models/finetune"
    evaluate: str = "reports/evaluate"
    explain: str = "reports/explain"
    metrics: str = "reports/metrics"  # <stage>.json: what `dvc metrics show` lists
    plots: str = "reports/plots"  # <name>.csv: what `dvc plots show` renders


class Tracking(Section):
    uri: str = ""  # empty: sqlite file mlflow.db in the project folder
    experiment: str = Field("bigmodel", min_length=1)
    registered_model: str = Field("bigmodel-classifier", min_length=1)  # the finetuned classifier
    registered_generator: str = Field("bigmodel-gpt", min_length=1)  # the pretrained GPT


class FilesSource(Section):
    glob: str = ""  # txt / csv / tsv / jsonl files, e.g. "data/raw/*.jsonl"
    text_column: str = "text"
    label_column: str = ""  # empty: no labelled set
    group_column: str = ""  # rows sharing a group stay in one split; empty: split by text


class HFSource(Section):
    name: str = ""  # hub id, or a local folder written by `save_to_disk` / holding data files
    config: str | None = None
    revision: str | None = None
    split: str = "train"
    text_column: str = "text"
    label_column: str = ""
    group_column: str = ""


class Prepare(Section):
    source: Literal["builtin", "files", "hf"] = "builtin"
    files: FilesSource = FilesSource()
    hf: HFSource = HFSource()
    min_chars: int = Field(32, ge=1)
    max_chars: int = Field(20_000, ge=1)
    label_min_chars: int = Field(20, ge=1)
    label_max_chars: int = Field(1_000, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    max_per_class: int = Field(0, ge=0)  # cap labelled examples per class (0: no cap)

    @model_validator(mode="after")
    def _check(self) -> "Prepare":
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        if self.label_min_chars > self.label_max_chars:
            raise ValueError("label_min_chars must not exceed label_max_chars")
        if self.source == "files" and not self.files.glob:
            raise ValueError("source 'files' needs prepare.files.glob")
        if self.source == "hf" and not self.hf.name:
            raise ValueError("source 'hf' needs prepare.hf.name")
        return self


class TokenizerParams(Section):
    kind: Literal["bpe", "char"] = "bpe"  # char: one token per character (vocab from the data)
    vocab_size: int = Field(4096, ge=260, le=1 << 20)  # bpe only
    min_frequency: int = Field(2, ge=1)


class Tokenize(Section):
    batch_size: int = Field(1024, ge=1)  # documents per encode_batch call


class Optim(Section):
    """What every training stage shares: optimiser, schedule, device."""

    lr: float = Field(1e-3, gt=0, le=1)
    min_lr: float = Field(1e-4, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    grad_accum: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False


class Pretrain(Optim):
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    block_size: int = Field(128, ge=8)
    max_steps: int = Field(1000, ge=1)
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    log_interval: int = Field(10, ge=1)
    checkpoint_interval: int = Field(250, ge=1)
    # Under torchrun: ddp (a full replica per process) or fsdp (parameters, gradients and
    # optimizer state sharded over the processes, for a model that does not fit one device).
    # One process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _heads_divide(self) -> "Pretrain":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class Finetune(Optim):
    epochs: int = Field(3, ge=1)
    pooling: Literal["mean", "last"] = "mean"  # how token states become one vector
    max_len: int = Field(128, ge=4)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.01, ge=0)


class Evaluate(Section):
    eval_tokens: int = Field(200_000, ge=0)  # LM tokens scored per split (0: all)
    batch_size: int = Field(32, ge=1)


class Explain(Section):
    n_examples: int = Field(8, ge=1, le=200)
    max_evals: int = Field(300, ge=10)
    max_len: int = Field(64, ge=4)


class Promote(Section):
    """The champion gate run by the flows after the stages (not a DVC stage: it moves aliases)."""

    alias: str = Field("champion", min_length=1)
    metric: Literal["macro_f1", "accuracy"] = "macro_f1"  # classifier, test split, higher wins
    margin: float = Field(0.01, ge=0, le=1)  # needed gain in that metric to move the alias
    margin_bpb: float = Field(0.01, ge=0)  # GPT: needed drop in test bits per byte
    lm_eval_bytes: int = Field(200_000, ge=1_000)  # test text the GPTs are scored on


class Params(Section):
    seed: int = 1337
    paths: Paths = Paths()
    tracking: Tracking = Tracking()
    prepare: Prepare = Prepare()
    tokenizer: TokenizerParams = TokenizerParams()
    tokenize: Tokenize = Tokenize()
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    explain: Explain = Explain()
    promote: Promote = Promote()

    _root: Path = Path(".")

    @property
    def root(self) -> Path:
        return self._root

    def path(self, name: str) -> Path:
        """Absolute path of a `paths` entry."""
        p = Path(getattr(self.paths, name))
        return p if p.is_absolute() else (self._root / p).resolve()

    def metrics_file(self, stage: str) -> Path:
        return self.path("metrics") / f"{stage}.json"

    def plot_file(self, name: str) -> Path:
        return self.path("plots") / f"{name}.csv"

    def section_hash(self, *sections: str) -> str:
        data = {s: self.model_dump(mode="json")[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; any problem is a BigModelError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise BigModelError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise BigModelError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise BigModelError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    params = validate(raw, source=str(path))
    params._root = path.resolve().parent
    return params


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` (value parsed as YAML) to the raw params dict."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise BigModelError(f"--set {item!r}: expected section.key=value")
    _set(raw, key.strip(), yaml.safe_load(value) if value.strip() else "", f"--set {item!r}")


def _set(raw: dict[str, Any], key: str, value: Any, what: str) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise BigModelError(f"{what}: {part!r} is not a section")
    node[leaf] = value


def backup_of(path: Path) -> Path:
    return path.with_name(path.name + ".bigmodel-backup")


@contextmanager
def overridden(path: str | Path, overrides: Mapping[str, Any] | None) -> Iterator[Params]:
    """The params file with `overrides` ({"pretrain.max_steps": 200}; string values parsed as
    YAML, like --set) written into it for the duration, so that DVC records exactly the values
    the stages used. The original text is kept beside it and put back afterwards, even on
    failure; a backup left by a killed run stops the next one instead of being overwritten."""
    path = Path(path)
    backup = backup_of(path)
    if backup.exists():
        raise BigModelError(f"{backup} exists: an earlier run with overrides was interrupted; "
                            f"put it back with `mv {backup} {path}` (or delete it) first")
    params = load(path)
    if not overrides:
        yield params
        return
    raw = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        if not isinstance(key, str) or not key.strip():
            raise BigModelError(f"override {key!r}: expected a 'section.key' name")
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else ""
        _set(raw, key.strip(), value, f"override {key!r}")
    params = validate(raw, source=f"{path} with overrides")
    params._root = path.resolve().parent
    original = path.read_text()
    backup.write_text(original)
    try:
        path.write_text("# written by a run with overrides; the original is put back after it\n"
                        + yaml.safe_dump(raw, sort_keys=False))
        yield params
    finally:
        path.write_text(original)
        backup.unlink()


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise BigModelError(f"{source}: {_describe(e.errors()[0])}") from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(loc[:-1]))
        return f"unknown key '{key}' (allowed here: {allowed})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        return f"{key} = {err['input']!r}: {msg}"
    if "input" in err and not isinstance(err["input"], dict):
        return f"{key} = {err['input']!r}: {msg}"
    return f"{key}: {msg}"


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)
