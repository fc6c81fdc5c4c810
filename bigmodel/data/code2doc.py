"""A built-in sequence-to-sequence task: a standard-library function's code → the summary line
of its docstring (code summarisation, as in CodeSearchNet's code-to-text task).

For every `def` (functions and methods, at any depth) whose docstring has a usable summary:

  source  the function as `ast.unparse` writes it, with its own docstring taken out: decorators,
          signature (annotations and defaults included) and body, comments dropped and
          formatting made canonical, with every run of whitespace collapsed to one space so
          that indentation does not cost tokens; cut to `max_source_chars` at a word boundary;
  target  the docstring's summary: its first paragraph joined into one line, cut after the
          first sentence (". " followed by a capital letter, or the paragraph's end).

A pair is dropped when the summary is shorter than 3 words or longer than `max_target_chars`,
when it does not start with a letter, or when the function's body is its docstring alone
(`...`/`pass` stubs whose code says nothing the name does not).

Why this task: it is real text-to-text data that needs no download (about 14,000 pairs from
CPython 3.11's stdlib, one group per source file so the split is file-disjoint), it is what
code-summarisation models are trained on, and it is measurable with BLEU and chrF: summaries
are short and formulaic ("Return the ...", "Set the ...") but depend on the code, so a model has
to read the signature and body rather than recite one line; copying the source or retrieving
the summary of the most similar training function are the baselines to beat.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def summary(doc: str, max_chars: int) -> str | None:
    """The first sentence of a docstring's first paragraph, on one line; None when unusable."""
    first = doc.strip().split("\n\n", 1)[0]
    line = " ".join(first.split())
    line = SENTENCE_END.split(line, 1)[0]
    if len(line) > max_chars or len(line.split()) < 3 or not line[:1].isalpha():
        return None
    return line


def function_source(node: ast.FunctionDef | ast.AsyncFunctionDef, max_chars: int) -> str | None:
    """The function's code without its docstring, canonical and on one line; None when the
    body is nothing but the docstring (and `pass` / `...`)."""
    body = node.body[1:]  # the docstring is the first statement
    if all(isinstance(s, ast.Pass)
           or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body):
        return None
    stripped = copy.copy(node)  # shallow: the original tree keeps its docstring
    stripped.body = body
    try:
        code = ast.unparse(stripped)
    except (ValueError, RecursionError):
        return None
    code = " ".join(code.split())
    if len(code) > max_chars:
        code = code[:max_chars].rsplit(" ", 1)[0]
    return code


@functools.lru_cache(maxsize=None)
def parse(source: str) -> ast.Module:
    """`ast.parse`, once per text: the built-in corpus reads each stdlib file's tree for its
    documents, its tagged lines and its pairs (`load_builtin` clears the cache). Callers must
    not change the tree."""
    return ast.parse(source)


def functions(root: Path, files: list[Path]
              ) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every `def` of the files (in the order given; in source order within a file) with its
    file relative to `root`; files that do not parse are skipped."""
    for path in files:
        try:
            tree = parse(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            continue
        rel = path.relative_to(root).as_posix()
        found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for node in sorted(found, key=lambda n: (n.lineno, n.col_offset)):
            yield node, rel


def stdlib_pairs(root: Path, files: list[Path], max_source_chars: int = 600,
                 max_target_chars: int = 160) -> pd.DataFrame:
    """Columns source, target, group (the file, relative to `root`)."""
    rows = []
    for node, rel in functions(root, files):
        doc = ast.get_docstring(node, clean=True)
        target = summary(doc, max_target_chars) if doc else None
        source = function_source(node, max_source_chars) if target else None
        if source:
            rows.append((source, target, rel))
    return pd.DataFrame(rows, columns=["source", "target", "group"])
