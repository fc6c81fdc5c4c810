"""One module per stage kind, each with `run(params, name) -> summary`; dvc.yaml expands every
kind over its runs (`pretrain@bert`).

`param_keys` reads a stage instance's `params` list from dvc.yaml itself, so what a stage logs to
MLflow as params is exactly what DVC hashes for it: one list, not two.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

from bigmodel.config import Params

# stage kind → (module, the params section whose runs it is expanded over)
KINDS = {
    "source": ("bigmodel.stages.source", "data"),
    "prepare": ("bigmodel.stages.prepare", "data"),
    "tokenizer": ("bigmodel.stages.tokenizer", "tokenizer"),
    "tokenize": ("bigmodel.stages.tokenize", "pretrain"),
    "pretrain": ("bigmodel.stages.pretrain", "pretrain"),
    "evaluate-pretrain": ("bigmodel.stages.evaluate_pretrain", "pretrain"),
    "finetune": ("bigmodel.stages.finetune", "finetune"),
    "evaluate": ("bigmodel.stages.evaluate", "finetune"),
    "explain": ("bigmodel.stages.explain", "finetune"),
}
PACKAGE_DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"
_VAR = re.compile(r"\$\{\s*(key|item\.[A-Za-z0-9_.-]+)\s*\}")


def param_keys(params: Params, kind: str, name: str) -> list[str]:
    """The params keys dvc.yaml lists for stage `kind@name` (`${key}`, `${item.x}` filled in)."""
    section = KINDS[kind][1]
    item = params.value(f"{section}.{name}")
    dvc_yaml = _dvc_yaml(params)
    if not dvc_yaml.is_file():  # an installed package outside a project: the run's own keys
        return ["seed", f"{section}.{name}"]
    keys = []
    for entry in _stage_params(str(dvc_yaml), kind):
        if isinstance(entry, dict):  # {params file: [keys]}: other files are not ours
            continue

        def fill(m: re.Match) -> str:
            ref = m.group(1)
            return name if ref == "key" else str(_lookup(item, ref.removeprefix("item.")))

        keys.append(_VAR.sub(fill, str(entry)))
    return keys


def _dvc_yaml(params: Params) -> Path:
    """The project's dvc.yaml; outside a project (a params file alone), the package's own."""
    own = params.root / "dvc.yaml"
    return own if own.is_file() else PACKAGE_DVC_YAML


@lru_cache(maxsize=8)
def _stage_params(dvc_yaml: str, kind: str) -> tuple:
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    body = stages[kind].get("do", stages[kind])
    return tuple(body.get("params", []))


def _lookup(item: dict, dotted: str) -> object:
    node: object = item
    for part in dotted.split("."):
        node = node[part]  # type: ignore[index]
    return node
