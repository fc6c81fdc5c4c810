"""Where raw text comes from: the Python standard library (default), local files, or the HF hub.

Each source returns a `Corpus`: documents for pretraining and (optionally) labelled examples for
finetuning. Every row carries a `group`; rows of one group always land in the same split.
"""

from __future__ import annotations

import ast
import glob as globlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bigmodel.config import FilesSource, HFSource
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


@dataclass
class Corpus:
    documents: pd.DataFrame  # columns: text, group
    labelled: pd.DataFrame | None  # columns: text, label, group (None: the source has no labels)
    description: dict[str, object] = field(default_factory=dict)


def builtin_files() -> tuple[Path, list[Path]]:
    """The stdlib folder of this Python and its source files outside test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP
    )
    if not files:
        raise BigModelError(f"no Python sources found in the standard library at {root}")
    return root, files


def matching_files(spec: FilesSource, root: Path) -> list[Path]:
    pattern = spec.glob if Path(spec.glob).is_absolute() else str(root / spec.glob)
    paths = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise BigModelError(f"prepare.files.glob: no files match {spec.glob!r}")
    return paths


def load_builtin() -> Corpus:
    """The standard library of this Python: source files (documents) and their docstrings,
    labelled with the package family of the module they come from."""
    root, files = builtin_files()
    docs, examples = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
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
    return Corpus(
        documents=pd.DataFrame(docs, columns=["text", "group"]),
        labelled=pd.DataFrame(examples, columns=["text", "label", "group"]),
        description={"source": "builtin", "stdlib": str(root), "files": len(docs)},
    )


def load_files(spec: FilesSource, root: Path) -> Corpus:
    """txt (one document per blank-line-separated paragraph), csv, tsv or jsonl files."""
    paths = matching_files(spec, root)
    frames = [_read_file(p, spec) for p in paths]
    table = pd.concat(frames, ignore_index=True)
    return _from_table(table, spec.label_column, {"source": "files", "files": len(paths)})


def load_hf(spec: HFSource) -> Corpus:
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
                        f"prepare.hf.split: {spec.split!r} not in {spec.name} (has {sorted(ds)})"
                    )
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(spec.name, spec.config, revision=spec.revision,
                                       split=spec.split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise BigModelError(f"prepare.hf: cannot load {spec.name!r}: {e}".splitlines()[0]) from None
    table = ds.to_pandas()
    missing = [c for c in (spec.text_column, spec.label_column, spec.group_column)
               if c and c not in table.columns]
    if missing:
        raise BigModelError(f"prepare.hf: column {missing[0]!r} not in {spec.name} "
                            f"(columns: {', '.join(map(str, table.columns))})")
    table = _standardise(table, spec.text_column, spec.label_column, spec.group_column)
    desc = {"source": "hf", "name": spec.name, "config": spec.config, "revision": spec.revision,
            "split": spec.split, "fingerprint": getattr(ds, "_fingerprint", "")}
    return _from_table(table, spec.label_column, desc)


def _read_file(path: Path, spec: FilesSource) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        paragraphs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        return pd.DataFrame({"text": paragraphs, "label": None, "group": None})
    try:
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str,
                                keep_default_na=False, quoting=3 if suffix == ".tsv" else 0)
        elif suffix in (".jsonl", ".json"):
            table = pd.read_json(path, lines=True, dtype=False)
        else:
            raise BigModelError(f"{path}: unsupported file type {suffix!r} (txt, csv, tsv, jsonl)")
    except (ValueError, pd.errors.ParserError) as e:
        raise BigModelError(f"{path}: cannot parse: {str(e).splitlines()[0]}") from None
    for key, col in (("text_column", spec.text_column), ("label_column", spec.label_column),
                     ("group_column", spec.group_column)):
        if col and col not in table.columns:
            raise BigModelError(f"{path}: prepare.files.{key} {col!r} is not a column "
                                f"(columns: {', '.join(map(str, table.columns))})")
    return _standardise(table, spec.text_column, spec.label_column, spec.group_column)


def _standardise(table: pd.DataFrame, text: str, label: str, group: str) -> pd.DataFrame:
    out = pd.DataFrame({"text": table[text].astype(str)})
    out["label"] = table[label].astype(str) if label else None
    out["group"] = table[group].astype(str) if group else None
    return out


def _from_table(table: pd.DataFrame, label_column: str, desc: dict[str, object]) -> Corpus:
    # Without a group column each row is its own group; exact dedupe keeps copies out of two splits.
    table = table.assign(group=table["group"].fillna(table["text"]))
    labelled = None
    if label_column:
        labelled = table.dropna(subset=["label"])[["text", "label", "group"]]
    desc["rows"] = len(table)
    return Corpus(documents=table[["text", "group"]], labelled=labelled, description=desc)
