"""Stage `prepare@<data run>`: raw source → clean, deduplicated, leak-free splits as parquet + a
manifest.

Outputs (in `data/<run>/prepared/`):
    pretrain_{train,val,test}.parquet   text, group          (documents for pretraining)
    seq_cls_{train,val,test}.parquet    text, label, group   (when the source has labels)
    token_cls_{train,val,test}.parquet  tokens, tags, group  (when it has tagged sentences)
    seq2seq_{train,val,test}.parquet    source, target, group (when it has pairs)
    image_cls_{train,val,test}.parquet  pixels, label, group, channels (a data run of images)
    manifest.json                       rows, bytes, class / tag balance, sha256 of every file;
                                        for images: their shape, the train split's per-channel
                                        mean and std, and the files that could not be read
A user's fixed split (a split column, one glob per split) is kept as given; otherwise whole
groups (source files) are assigned to splits by a seeded hash, so no file spans two splits.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import pandas as pd

from bigmodel import tracking
from bigmodel.config import SPLIT_NAMES, DataRun, Params
from bigmodel.data import images, sources
from bigmodel.errors import BigModelError
from bigmodel.io import atomic_path, sha256_file, write_json
from bigmodel.stages import param_keys

SPLITS = SPLIT_NAMES


def run(params: Params, name: str) -> str:
    cfg = params.data[name]
    if cfg.kind == "image":
        return run_images(params, name)
    with tracking.stage_run(f"prepare@{name}", params, param_keys(params, "prepare", name)) as mlrun:
        corpus = load(params, name)
        docs = clean(corpus.documents, cfg.min_chars, cfg.max_chars, collapse_spaces=False)
        labelled = tagged = pairs = None
        dropped: dict[str, int] = {}
        if corpus.labelled is not None:
            labelled = clean(corpus.labelled, cfg.label_min_chars, cfg.label_max_chars,
                             collapse_spaces=True)
        if corpus.tagged is not None:
            tagged = clean_tagged(corpus.tagged, cfg.tag_max_words)
        if corpus.pairs is not None:
            pairs, dropped = clean_pairs(corpus.pairs, cfg)
        if not corpus.fixed_split:  # the user's own split is kept as given
            where = group_splits(docs, labelled, tagged, params.seed, cfg, pairs)
            docs = docs.assign(split=docs["group"].map(where))
            if labelled is not None:
                labelled = labelled.assign(split=labelled["group"].map(where))
            if tagged is not None:
                tagged = tagged.assign(split=tagged["group"].map(where))
            if pairs is not None:
                pairs = pairs.assign(split=pairs["group"].map(where))
        if pairs is not None:
            _nonempty_splits(pairs, name, "(source, target) pair")
        if labelled is not None:
            labelled = cap_train(labelled, cfg.max_per_class, by="label")
            check_labelled(labelled, name)
        if tagged is not None:
            tagged = cap_train(tagged, cfg.max_tagged)
            check_tagged(tagged, name)
        manifest = write(params, name, docs, labelled, tagged, corpus.description, pairs, dropped)
        counts = flat_counts(manifest)
        write_json(params.metrics_file("prepare", name), counts)
        mlrun.metrics(counts)
        mlrun.artifact(params.path("data", name) / "prepared" / "manifest.json")
    n_lab = 0 if labelled is None else len(labelled)
    n_tag = 0 if tagged is None else len(tagged)
    n_pairs = 0 if pairs is None else len(pairs)
    return (f"{len(docs)} documents, {n_lab} labelled texts, {n_tag} tagged sentences, "
            f"{n_pairs} pairs")


def run_images(params: Params, name: str) -> str:
    """Decode once, drop exact duplicates, split (the user's fixed split as given, else
    stratified by class from a seeded hash of each image's origin), cap, write."""
    cfg = params.data[name]
    with tracking.stage_run(f"prepare@{name}", params, param_keys(params, "prepare", name)) as mlrun:
        found = images.load(cfg, params.root, f"data.{name}")
        table = images.table(found)
        if "split" not in table:
            where = stratified_group_split(table, params.seed, cfg.val_fraction, cfg.test_fraction)
            table = table.assign(split=table["group"].map(where))
        table = cap_train(table.assign(text=table["group"]), cfg.max_per_class, by="label")
        table = table.drop(columns="text")
        check_labelled(table, name)
        shape = found.pixels.shape[1:]
        out = params.path("data", name) / "prepared"
        train = table[table["split"] == "train"]
        mean, std = images.channel_stats(images.pixels_of(train, shape))
        manifest: dict[str, object] = {
            "source": found.description, "seed": params.seed, "shape": list(shape),
            "train_mean": mean, "train_std": std, "duplicates_dropped": len(found.labels) - len(table),
            "unreadable": {"count": found.n_unreadable, "first": found.unreadable}, "files": {}}
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for split in SPLITS:
                part = table[table["split"] == split].drop(columns="split").reset_index(drop=True)
                file = f"image_cls_{split}.parquet"
                part.to_parquet(tmp / file, index=False)
                manifest["files"][file] = {  # type: ignore[index]
                    "rows": len(part), "bytes": int(part["pixels"].str.len().sum()),
                    "sha256": sha256_file(tmp / file),
                    "classes": part["label"].value_counts().sort_index().to_dict()}
            write_json(tmp / "manifest.json", manifest)
        counts = {**flat_counts(manifest), "unreadable_images": found.n_unreadable}
        write_json(params.metrics_file("prepare", name), counts)
        mlrun.metrics(counts)
        mlrun.artifact(out / "manifest.json")
    unreadable = f"; {found.n_unreadable} unreadable (see manifest.json)" if found.n_unreadable else ""
    return (f"{len(table)} images {shape[0]}×{shape[1]}×{shape[2]} in "
            f"{table['label'].nunique()} classes{unreadable}")


def load(params: Params, name: str) -> sources.Corpus:
    cfg = params.data[name]
    if cfg.source == "builtin":
        return sources.load_builtin(cfg.tag_max_words, cfg.builtin_pairs)
    if cfg.source == "files":
        return sources.load_files(cfg.files, params.root, f"data.{name}.files")
    return sources.load_hf(cfg.hf, f"data.{name}.hf")


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


def clean_tagged(table: pd.DataFrame, max_words: int) -> pd.DataFrame:
    """Drop empty and over-long sentences and exact duplicates (first copy in group order)."""
    n = table["tokens"].map(len)
    table = table[(n > 0) & (n <= max_words)]
    key = table["tokens"].map(" ".join) + "\t" + table["tags"].map(" ".join)
    table = table.assign(_k=key).sort_values(["group", "_k"], kind="stable")
    return table.drop_duplicates(subset="_k", keep="first").drop(columns="_k").reset_index(drop=True)


def clean_pairs(table: pd.DataFrame, cfg: DataRun) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise both sides to one line; drop pairs with an empty side, a side outside
    [pair_min_chars, pair_max_chars], a length ratio over pair_max_ratio, and exact duplicate
    pairs (the first copy in group order survives). Returns the pairs and what each filter
    dropped, for the manifest."""
    table = table.assign(source=[normalise(t, True) for t in table["source"]],
                         target=[normalise(t, True) for t in table["target"]])
    dropped = {"pairs_in": len(table)}
    ns, nt = table["source"].str.len(), table["target"].str.len()
    ok = (ns >= cfg.pair_min_chars) & (nt >= cfg.pair_min_chars)
    ok &= (ns <= cfg.pair_max_chars) & (nt <= cfg.pair_max_chars)
    dropped["pairs_dropped_length"] = int((~ok).sum())
    table, ns, nt = table[ok], ns[ok], nt[ok]
    if cfg.pair_max_ratio:
        ratio = pd.concat([ns, nt], axis=1).max(axis=1) / pd.concat([ns, nt], axis=1).min(axis=1)
        dropped["pairs_dropped_ratio"] = int((ratio > cfg.pair_max_ratio).sum())
        table = table[ratio <= cfg.pair_max_ratio]
    table = table.sort_values(["group", "source", "target"], kind="stable")
    before = len(table)
    table = table.drop_duplicates(subset=["source", "target"], keep="first").reset_index(drop=True)
    dropped["pairs_dropped_duplicate"] = before - len(table)
    return table, dropped


def group_splits(docs: pd.DataFrame, labelled: pd.DataFrame | None, tagged: pd.DataFrame | None,
                 seed: int, cfg: DataRun, pairs: pd.DataFrame | None = None) -> dict[str, str]:
    """Map every group to one split. Groups without labels split by hash; labelled groups are
    split per class (stratified), so each class gets about its share of val and test examples
    even when a few groups (large source files) hold most of a class."""
    groups = set(docs["group"])
    for table in (labelled, tagged, pairs):
        if table is not None:
            groups |= set(table["group"])
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


def cap_train(table: pd.DataFrame, cap: int, by: str | None = None) -> pd.DataFrame:
    """Keep at most `cap` training rows (per class when `by`), chosen by a hash of the row so the
    choice is deterministic; val and test keep their natural balance."""
    if cap <= 0:
        return table
    text = table["text"] if "text" in table else table["tokens"].map(" ".join)
    key = text.map(lambda t: hashlib.sha256(t.encode()).hexdigest())
    train = table[table["split"] == "train"].assign(_k=key).sort_values("_k")
    kept = (train.groupby(by, sort=False).head(cap) if by else train.head(cap)).drop(columns="_k")
    rest = table[table["split"] != "train"]
    order = ["group", "text"] if "text" in table else ["group"]
    return pd.concat([kept, rest]).sort_values(order, kind="stable").reset_index(drop=True)


def check_labelled(table: pd.DataFrame, name: str) -> None:
    _nonempty_splits(table, name, "labelled")
    classes = table.loc[table["split"] == "train", "label"].nunique()
    if classes < 2:
        raise BigModelError(f"prepare@{name}: the labelled train split has {classes} class; "
                            f"need ≥ 2 (check data.{name}'s label column)")


def check_tagged(table: pd.DataFrame, name: str) -> None:
    _nonempty_splits(table, name, "tagged")
    tags = {t for tags in table.loc[table["split"] == "train", "tags"] for t in tags} - {"O"}
    if not tags:
        raise BigModelError(f"prepare@{name}: the tagged train split has no entity tags "
                            f"(every tag is O)")


def _nonempty_splits(table: pd.DataFrame, name: str, what: str) -> None:
    for split in SPLITS:
        if not (table["split"] == split).any():
            raise BigModelError(f"prepare@{name}: the {what} {split} split is empty "
                                f"({len(table)} {what} rows in all); add data or change fractions")


def write(params: Params, name: str, docs: pd.DataFrame, labelled: pd.DataFrame | None,
          tagged: pd.DataFrame | None, description: dict[str, object],
          pairs: pd.DataFrame | None = None, dropped: dict[str, int] | None = None
          ) -> dict[str, object]:
    out = params.path("data", name) / "prepared"
    manifest: dict[str, object] = {"source": description, "seed": params.seed, "files": {}}
    if dropped:
        manifest["pair_filters"] = dropped
    with atomic_path(out) as tmp:
        tmp.mkdir()
        tables = {"pretrain": docs, "seq_cls": labelled, "token_cls": tagged, "seq2seq": pairs}
        for kind, table in tables.items():
            if table is None:
                continue
            for split in SPLITS:
                part = table[table["split"] == split].drop(columns="split").reset_index(drop=True)
                if kind == "pretrain" and part.empty:
                    raise BigModelError(f"prepare@{name}: the pretraining {split} split is empty "
                                        f"({len(table)} documents in all); add data")
                file = f"{kind}_{split}.parquet"
                part.to_parquet(tmp / file, index=False)
                if "text" in part:
                    text = part["text"]
                elif "tokens" in part:
                    text = part["tokens"].map(" ".join)
                else:
                    text = part["source"] + part["target"]
                entry: dict[str, object] = {
                    "rows": len(part),
                    "bytes": int(text.str.encode("utf-8").str.len().sum()),
                    "sha256": sha256_file(tmp / file),
                }
                if kind == "seq_cls":
                    entry["classes"] = part["label"].value_counts().sort_index().to_dict()
                if kind == "token_cls":
                    counts = pd.Series([t for tags in part["tags"] for t in tags if t.startswith("B-")])
                    entry["entities"] = counts.str[2:].value_counts().sort_index().to_dict()
                manifest["files"][file] = entry  # type: ignore[index]
        write_json(tmp / "manifest.json", manifest)
    return manifest


def flat_counts(manifest: dict[str, object]) -> dict[str, float]:
    metrics: dict[str, float] = dict(manifest.get("pair_filters", {}))  # type: ignore[arg-type]
    for name, entry in manifest["files"].items():  # type: ignore[union-attr]
        stem = name.removesuffix(".parquet")
        metrics[f"{stem}_rows"] = entry["rows"]
        metrics[f"{stem}_bytes"] = entry["bytes"]
    return metrics
