"""Stage `prepare`: raw source → clean, deduplicated, leak-free splits as parquet + a manifest.

Outputs (in `paths.prepared`):
    pretrain_{train,val,test}.parquet   text, group        (documents for language modelling)
    labelled_{train,val,test}.parquet   text, label, group (the finetuning task; when labelled)
    manifest.json                       rows, bytes, class balance, sha256 of every file
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import pandas as pd

from bigmodel import tracking
from bigmodel.config import Params, Prepare
from bigmodel.data import sources
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, sha256_file, write_json

SPLITS = ("train", "val", "test")


def run(params: Params) -> str:
    cfg = params.prepare
    with tracking.stage_run("prepare", params, ["seed", "prepare"]) as mlrun:
        corpus = load(params)
        docs = clean(corpus.documents, cfg.min_chars, cfg.max_chars, collapse_spaces=False)
        labelled = None
        if corpus.labelled is not None:
            labelled = clean(corpus.labelled, cfg.label_min_chars, cfg.label_max_chars,
                             collapse_spaces=True)
        where = group_splits(docs, labelled, params.seed, cfg)
        docs = docs.assign(split=docs["group"].map(where))
        if labelled is not None:
            labelled = labelled.assign(split=labelled["group"].map(where))
            labelled = cap_train_per_class(labelled, cfg.max_per_class)
            check_labelled(labelled)
        manifest = write(params, docs, labelled, corpus.description)
        counts = flat_counts(manifest)
        write_json(params.metrics_file("prepare"), counts)
        mlrun.metrics(counts)
        mlrun.artifact(params.path("prepared") / "manifest.json")
    n_lab = 0 if labelled is None else len(labelled)
    return f"{len(docs)} documents, {n_lab} labelled examples"


def load(params: Params) -> sources.Corpus:
    cfg = params.prepare
    if cfg.source == "builtin":
        return sources.load_builtin()
    if cfg.source == "files":
        return sources.load_files(cfg.files, params.root)
    return sources.load_hf(cfg.hf)


def normalise(text: str, collapse_spaces: bool) -> str:
    """NFC, unix newlines, no trailing spaces; prose (docstrings, reviews) also gets one space
    between words, while code keeps its indentation."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    if collapse_spaces:
        return re.sub(r"\s+", " ", text).strip()
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def clean(table: pd.DataFrame, min_chars: int, max_chars: int, collapse_spaces: bool) -> pd.DataFrame:
    """Normalise, drop empty / too short / too long rows, and drop exact duplicates (the first
    copy in group order survives, so the result does not depend on input order)."""
    table = table.assign(text=[normalise(t, collapse_spaces) for t in table["text"]])
    n = table["text"].str.len()
    table = table[(n >= min_chars) & (n <= max_chars)]
    table = table.sort_values(["group", "text"], kind="stable")
    return table.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


def _unit(seed: int, group: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64


def split_of(group: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the group: the same group always lands together."""
    u = _unit(seed, group)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def group_splits(docs: pd.DataFrame, labelled: pd.DataFrame | None, seed: int,
                 cfg: Prepare) -> dict[str, str]:
    """Map every group to one split. Groups without labels split by hash; labelled groups are
    split per class (stratified), so each class gets about its share of val and test examples
    even when a few groups (large source files) hold most of a class."""
    groups = set(docs["group"])
    if labelled is not None:
        groups |= set(labelled["group"])
    where = {g: split_of(g, seed, cfg.val_fraction, cfg.test_fraction) for g in groups}
    if labelled is not None and len(labelled):
        where.update(stratified_group_split(labelled, seed, cfg.val_fraction, cfg.test_fraction))
    return where


def stratified_group_split(labelled: pd.DataFrame, seed: int, val_fraction: float,
                           test_fraction: float) -> dict[str, str]:
    """Greedy, deterministic: within each class (a group's majority label), walk its groups in
    hash order and put a group into test, then val, while at least half of it fits under that
    split's target count; the rest (and any group too big to fit) goes to train."""
    stats = labelled.groupby("group")["label"].agg(n="size", label=lambda s: s.mode().iloc[0])
    where: dict[str, str] = {}
    for _, members in stats.groupby("label"):
        total = int(members["n"].sum())
        targets = {"test": test_fraction * total, "val": val_fraction * total}
        filled = {"test": 0, "val": 0}
        order = sorted(members.index, key=lambda g: _unit(seed, g))
        for group in order:
            n = int(members.at[group, "n"])
            split = next((s for s in ("test", "val") if filled[s] + n / 2 <= targets[s]), "train")
            if split != "train":
                filled[split] += n
            where[group] = split
    return where


def cap_train_per_class(table: pd.DataFrame, cap: int) -> pd.DataFrame:
    """Keep at most `cap` training examples per class (chosen by text hash, so deterministic);
    val and test keep the natural class balance."""
    if cap <= 0:
        return table
    key = table["text"].map(lambda t: hashlib.sha256(t.encode()).hexdigest())
    train = table[table["split"] == "train"].assign(_k=key).sort_values("_k")
    kept = train.groupby("label", sort=False).head(cap).drop(columns="_k")
    rest = table[table["split"] != "train"]
    return pd.concat([kept, rest]).sort_values(["group", "text"], kind="stable").reset_index(drop=True)


def check_labelled(table: pd.DataFrame) -> None:
    for split in SPLITS:
        if not (table["split"] == split).any():
            raise BigModelError(f"prepare: the labelled {split} split is empty "
                                f"({len(table)} labelled rows in all); add data or change fractions")
    classes = table.loc[table["split"] == "train", "label"].nunique()
    if classes < 2:
        raise BigModelError(f"prepare: the labelled train split has {classes} class; need ≥ 2")


def write(params: Params, docs: pd.DataFrame, labelled: pd.DataFrame | None,
          description: dict[str, object]) -> dict[str, object]:
    out = params.path("prepared")
    manifest: dict[str, object] = {"source": description, "seed": params.seed, "files": {}}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        tables = {"pretrain": docs, "labelled": labelled}
        for kind, table in tables.items():
            if table is None:
                continue
            for split in SPLITS:
                part = table[table["split"] == split].drop(columns="split").reset_index(drop=True)
                if kind == "pretrain" and part.empty:
                    raise BigModelError(f"prepare: the pretraining {split} split is empty "
                                        f"({len(table)} documents in all); add data")
                name = f"{kind}_{split}.parquet"
                part.to_parquet(tmp / name, index=False)
                entry: dict[str, object] = {
                    "rows": len(part),
                    "bytes": int(part["text"].str.encode("utf-8").str.len().sum()),
                    "sha256": sha256_file(tmp / name),
                }
                if kind == "labelled":
                    entry["classes"] = part["label"].value_counts().sort_index().to_dict()
                manifest["files"][name] = entry  # type: ignore[index]
        write_json(tmp / "manifest.json", manifest)
    return manifest


def flat_counts(manifest: dict[str, object]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, entry in manifest["files"].items():  # type: ignore[union-attr]
        stem = name.removesuffix(".parquet")
        metrics[f"{stem}_rows"] = entry["rows"]
        metrics[f"{stem}_bytes"] = entry["bytes"]
    return metrics
