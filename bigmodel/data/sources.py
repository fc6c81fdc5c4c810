"""Where raw text comes from: the Python standard library (default), local files, or the HF hub.

Each source returns a `Corpus`: documents for pretraining and the labelled sets it carries —
`seq_cls` (text, label), `token_cls` (tokens, tags) and `seq2seq` (source, target) pairs. Every row carries a `group`; rows of one
group always land in the same split. A row may also carry the user's own `split` (a split
column, or one glob per split), which `prepare` then keeps as given.
"""

from __future__ import annotations

import ast
import glob as globlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bigmodel.config import FilesSource, HFSource
from bigmodel.data import conll
from bigmodel.data.bytecode import stdlib_bytecode_pairs
from bigmodel.data.code2doc import parse, stdlib_pairs
from bigmodel.data.tagging import stdlib_tagging_examples
from bigmodel.errors import BigModelError

# Folders of the stdlib that hold tests or third-party code, never corpus text.
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# Top-level stdlib module → package family: the finetuning label of its docstrings.
FAMILIES: dict[str, list[str]] = {
    "gui": ["tkinter", "idlelib", "turtle", "turtledemo"],
    "asyncio": ["asyncio"],
    "email": ["email", "mailbox", "imaplib", "smtplib", "poplib", "nntplib", "mimetypes", "quopri"],
    "network": ["http", "urllib", "wsgiref", "xmlrpc", "ftplib", "socketserver", "cgi", "cgitb",
                "socket", "telnetlib", "ssl", "webbrowser", "selectors", "ipaddress"],
    "markup": ["xml", "html"],
    "concurrency": ["multiprocessing", "threading", "concurrent", "subprocess", "queue", "sched",
                    "_threading_local"],
    "debugging": ["unittest", "doctest", "bdb", "pdb", "trace", "profile", "cProfile", "pstats",
                  "timeit", "tracemalloc", "faulthandler"],
    "numeric": ["_pydecimal", "decimal", "statistics", "numbers", "random", "fractions",
                "datetime", "calendar", "_strptime"],
    "files": ["tarfile", "pathlib", "zipfile", "shutil", "tempfile", "bz2", "lzma", "gzip",
              "posixpath", "ntpath", "genericpath", "os", "glob", "fnmatch", "filecmp",
              "fileinput", "_pyio", "zipimport"],
    "text": ["encodings", "codecs", "difflib", "locale", "re", "string", "textwrap", "gettext",
             "stringprep", "_markupbase", "shlex"],
    "packaging": ["distutils", "importlib", "pkgutil", "site", "sysconfig", "ensurepip", "venv",
                  "zipapp", "runpy", "modulefinder"],
    "language": ["inspect", "typing", "ast", "dis", "symtable", "lib2to3", "tokenize", "pydoc",
                 "traceback", "types", "enum", "abc", "_collections_abc", "dataclasses"],
}
MODULE_FAMILY = {m: fam for fam, mods in FAMILIES.items() for m in mods}


# what a user may call each split in a split column
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "dev": "val",
                 "valid": "val", "validation": "val", "test": "test", "testing": "test"}


@dataclass
class Corpus:
    documents: pd.DataFrame  # columns: text, group (+ split when fixed)
    labelled: pd.DataFrame | None  # seq_cls: text, label, group (+ split); None: no labels
    tagged: pd.DataFrame | None = None  # token_cls: tokens, tags, group (+ split)
    pairs: pd.DataFrame | None = None  # seq2seq: source, target, group (+ split)
    description: dict[str, object] = field(default_factory=dict)

    @property
    def fixed_split(self) -> bool:
        return "split" in self.documents.columns


def builtin_files() -> tuple[Path, list[Path]]:
    """The stdlib folder of this Python and its source files outside test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP
    )
    if not files:
        raise BigModelError(f"no Python sources found in the standard library at {root}")
    return root, files


def matching_files(spec: FilesSource, root: Path, key: str = "files") -> list[Path]:
    """Every file the spec names (all splits' globs when the split is fixed)."""
    return [p for _, paths in split_files(spec, root, key) for p in paths]


def split_files(spec: FilesSource, root: Path, key: str = "files"
                ) -> list[tuple[str | None, list[Path]]]:
    """(split, files) per glob: one entry with split None for `glob`, one per split for
    `splits`. A glob that matches nothing is an error naming it."""
    globs = [(None, spec.glob)] if spec.glob else [(s, spec.splits[s]) for s in ("train", "val", "test")]
    out = []
    for split, pattern in globs:
        full = pattern if Path(pattern).is_absolute() else str(root / pattern)
        paths = sorted(Path(p) for p in globlib.glob(full, recursive=True) if Path(p).is_file())
        if not paths:
            where = f"{key}.glob" if split is None else f"{key}.splits.{split}"
            raise BigModelError(f"{where}: no files match {pattern!r}")
        out.append((split, paths))
    return out


def load_builtin(max_words: int = 48, pairs: str = "bytecode") -> Corpus:
    """The standard library of this Python: source files (documents); their docstrings,
    labelled with the package family of the module they come from (seq_cls); lines of code
    whose names are tagged by what they denote (token_cls, bigmodel/data/tagging.py); and
    functions paired with their bytecode (seq2seq, bigmodel/data/bytecode.py) or with their
    docstring's summary line (`pairs="docstring"`, bigmodel/data/code2doc.py)."""
    root, files = builtin_files()
    docs, examples = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            tree = parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a handful of stdlib files are deliberately not valid UTF-8/Python
        docs.append((source, rel))
        family = MODULE_FAMILY.get(rel.split("/")[0].removesuffix(".py"))
        if family is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    examples.append((doc, family, rel))
    try:
        return Corpus(
            documents=pd.DataFrame(docs, columns=["text", "group"]),
            labelled=pd.DataFrame(examples, columns=["text", "label", "group"]),
            tagged=stdlib_tagging_examples(root, files, max_words=max_words),
            pairs=(stdlib_bytecode_pairs if pairs == "bytecode" else stdlib_pairs)(root, files),
            description={"source": "builtin", "stdlib": str(root), "files": len(docs)},
        )
    finally:
        parse.cache_clear()  # each file's tree, shared by the tasks above


def load_files(spec: FilesSource, root: Path, key: str = "files") -> Corpus:
    """txt (one document per blank-line-separated paragraph), csv, tsv or jsonl files; or
    CoNLL files (`format: conll`). With `splits`, each file's rows keep the split it is
    listed under; with `split_column`, each row keeps the split it names."""
    groups = split_files(spec, root, key)
    n_files = sum(len(paths) for _, paths in groups)
    desc: dict[str, object] = {"source": "files", "files": n_files}
    if spec.format == "conll":
        return _conll_corpus(groups, desc)
    if spec.format == "aligned":
        return _aligned_corpus(groups, spec.target_suffix, desc)
    frames = []
    for split, paths in groups:
        for p in paths:
            table = _read_file(p, spec, key)
            if split is not None:
                table["split"] = split
            frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    if "split" in table.columns and table["split"].isna().any():
        raise BigModelError(f"{key}.split_column: only some files have it; every file needs it "
                            f"(or none)")
    if spec.source_column:
        return _pairs_corpus(table, desc)
    return _from_table(table, spec.label_column, desc)


def _pairs_corpus(table: pd.DataFrame, desc: dict[str, object]) -> Corpus:
    """A table of (source, target) rows; without a group column each pair is its own group."""
    pairs = table.assign(group=table["group"].fillna(table["source"] + "\t" + table["target"]))
    desc["rows"] = len(pairs)
    return Corpus(documents=_pair_documents(pairs), labelled=None, pairs=pairs, description=desc)


def _aligned_corpus(groups: list[tuple[str | None, list[Path]]], target_suffix: str,
                    desc: dict[str, object]) -> Corpus:
    """Line-aligned parallel files: line i of `x.src` and line i of `x.<target_suffix>` are
    one pair; empty lines on either side are kept in place (the filters drop them)."""
    rows = []
    for split, paths in groups:
        for p in paths:
            target = p.with_suffix(f".{target_suffix}")
            if target == p:
                raise BigModelError(f"{p}: files.target_suffix {target_suffix!r} is this file's own "
                                    f"suffix; the glob must match the source side only")
            if not target.is_file():
                raise BigModelError(f"{p}: no target file {target.name} beside it "
                                    f"(files.target_suffix {target_suffix!r})")
            src, tgt = _lines(p), _lines(target)
            if len(src) != len(tgt):
                raise BigModelError(f"{p} has {len(src)} lines but {target.name} has {len(tgt)}: "
                                    f"aligned files need one target line per source line")
            rows += [{"source": a, "target": b, "group": f"{p.name}:{i}", "split": split}
                     for i, (a, b) in enumerate(zip(src, tgt))]
    pairs = pd.DataFrame(rows, columns=["source", "target", "group", "split"])
    if groups[0][0] is None:
        pairs = pairs.drop(columns="split")
    desc["rows"] = len(pairs)
    return Corpus(documents=_pair_documents(pairs), labelled=None, pairs=pairs, description=desc)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BigModelError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def _pair_documents(pairs: pd.DataFrame) -> pd.DataFrame:
    """Both sides of every pair, each a pretraining document (in the pair's group and split)."""
    keep = [c for c in ("group", "split") if c in pairs]
    return pd.concat([pairs[["source", *keep]].rename(columns={"source": "text"}),
                      pairs[["target", *keep]].rename(columns={"target": "text"})],
                     ignore_index=True)


def _conll_corpus(groups: list[tuple[str | None, list[Path]]], desc: dict[str, object]) -> Corpus:
    rows = []
    for split, paths in groups:
        for p in paths:
            for i, (tokens, tags) in enumerate(conll.read_conll(p)):
                rows.append({"tokens": tokens, "tags": conll.to_iob2(tags),
                             "group": f"{p.name}:{i}", "split": split})
    tagged = pd.DataFrame(rows, columns=["tokens", "tags", "group", "split"])
    if groups[0][0] is None:
        tagged = tagged.drop(columns="split")
    documents = tagged.assign(text=tagged["tokens"].map(" ".join)).drop(columns=["tokens", "tags"])
    desc["rows"] = len(tagged)
    return Corpus(documents=documents, labelled=None, tagged=tagged, description=desc)


def load_hf(spec: HFSource, key: str = "hf") -> Corpus:
    """A Hugging Face dataset: a hub id (needs network) or a local folder, either written by
    `Dataset.save_to_disk` or holding data files the way a hub repository does."""
    import datasets

    local = Path(spec.name)
    try:
        if local.is_dir() and any((local / f).exists() for f in ("dataset_info.json", "state.json",
                                                                  "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise BigModelError(
                        f"{key}.split: {spec.split!r} not in {spec.name} (has {sorted(ds)})"
                    )
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(spec.name, spec.config, revision=spec.revision,
                                       split=spec.split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise BigModelError(f"{key}: cannot load {spec.name!r}: {e}".splitlines()[0]) from None
    table = ds.to_pandas()
    desc = {"source": "hf", "name": spec.name, "config": spec.config, "revision": spec.revision,
            "split": spec.split, "fingerprint": getattr(ds, "_fingerprint", "")}
    if spec.source_column:
        pairs = pd.DataFrame({"source": _hf_column(table, spec.source_column, spec.name, key),
                              "target": _hf_column(table, spec.target_column, spec.name, key)})
        pairs["group"] = (_hf_column(table, spec.group_column, spec.name, key)
                          if spec.group_column else None)
        return _pairs_corpus(pairs, desc)
    missing = [c for c in (spec.text_column, spec.label_column, spec.group_column)
               if c and c not in table.columns]
    if missing:
        raise BigModelError(f"{key}: column {missing[0]!r} not in {spec.name} "
                            f"(columns: {', '.join(map(str, table.columns))})")
    table = _standardise(table, spec.text_column, spec.label_column, spec.group_column)
    return _from_table(table, spec.label_column, desc)


def _hf_column(table: pd.DataFrame, name: str, dataset: str, key: str) -> pd.Series:
    """A column as strings; `a.b` is key b of dict column a (`translation.en`)."""
    if name in table.columns:
        return table[name].astype(str)
    base, _, field_ = name.partition(".")
    if field_ and base in table.columns:
        values = table[base]
        if not all(isinstance(v, dict) and field_ in v for v in values):
            have = sorted(values.iloc[0]) if len(values) and isinstance(values.iloc[0], dict) else []
            raise BigModelError(f"{key}: column {base!r} of {dataset} has no key {field_!r} in "
                                f"every row (keys: {', '.join(have) or 'none'})")
        return values.map(lambda v: str(v[field_]))
    raise BigModelError(f"{key}: column {name!r} not in {dataset} "
                        f"(columns: {', '.join(map(str, table.columns))})")


def _read_file(path: Path, spec: FilesSource, key: str = "files") -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise BigModelError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        return pd.DataFrame({"text": paragraphs, "label": None, "group": None})
    try:
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                keep_default_na=False, quoting=3 if suffix == ".tsv" else 0)
        elif suffix in (".jsonl", ".json"):
            table = pd.read_json(path, lines=True, dtype=False)
        else:
            raise BigModelError(f"{path}: unsupported file type {suffix!r} (txt, csv, tsv, jsonl)")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise BigModelError(f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    text_column = "" if spec.source_column else spec.text_column  # a pairs table needs no text
    for field_, col in (("text_column", text_column), ("label_column", spec.label_column),
                        ("group_column", spec.group_column), ("split_column", spec.split_column),
                        ("source_column", spec.source_column), ("target_column", spec.target_column)):
        if col and col not in table.columns:
            raise BigModelError(f"{path}: {key}.{field_} {col!r} is not a column "
                                f"(columns: {', '.join(map(str, table.columns))})")
    if spec.source_column:
        out = pd.DataFrame({"source": table[spec.source_column].astype(str),
                            "target": table[spec.target_column].astype(str)})
        out["group"] = table[spec.group_column].astype(str) if spec.group_column else None
    else:
        out = _standardise(table, spec.text_column, spec.label_column, spec.group_column)
    if spec.split_column:
        named = table[spec.split_column].astype(str).str.strip().str.lower()
        bad = sorted(set(named) - set(SPLIT_ALIASES))
        if bad:
            raise BigModelError(f"{path}: {key}.split_column {spec.split_column!r} has "
                                f"{bad[0]!r}; valid: train, val (or dev, validation), test")
        out["split"] = named.map(SPLIT_ALIASES)
    return out


def _standardise(table: pd.DataFrame, text: str, label: str, group: str) -> pd.DataFrame:
    out = pd.DataFrame({"text": table[text].astype(str)})
    out["label"] = table[label].astype(str) if label else None
    out["group"] = table[group].astype(str) if group else None
    return out


def _from_table(table: pd.DataFrame, label_column: str, desc: dict[str, object]) -> Corpus:
    # Without a group column each row is its own group; exact dedupe keeps copies out of two splits.
    table = table.assign(group=table["group"].fillna(table["text"]))
    keep = ["text", "group", *(["split"] if "split" in table.columns else [])]
    labelled = None
    if label_column:
        labelled = table.dropna(subset=["label"])[["text", "label", *keep[1:]]]
    desc["rows"] = len(table)
    return Corpus(documents=table[keep], labelled=labelled, description=desc)
