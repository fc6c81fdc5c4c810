"""A built-in sequence-to-sequence task: compile a standard-library function to CPython bytecode.

For every undecorated `def` (functions and methods, at any depth) that is short enough:

  source  the function as `ast.unparse` writes it, without its docstring, on one line (every
          run of whitespace collapsed to one space; comments are gone with the unparse);
  target  the bytecode the running CPython compiles that code to, as `dis` lists it: one word
          per instruction (`LOAD_FAST`, `BINARY_OP`, ...) followed by its argument as `dis`
          shows it (a name, a constant, an operator), with jump targets and the bookkeeping
          instructions that carry no meaning here (RESUME, CACHE, NOP, COPY_FREE_VARS,
          MAKE_CELL) left out.

A function is kept when its one-line source has at most `max_source_chars` characters and its
bytecode at most `max_target_chars`, so that both fit a small model's block.

Why this task: it is a real translation between two languages — Python and the stack machine
CPython runs — taken from real code (about 6,000 functions of CPython 3.11's stdlib, 5,300
pairs once exact duplicates are dropped, split by source file), with no download. It is
exact, so BLEU and chrF measure it well, and it is not trivial: a model has to turn infix
expressions into postfix stack order, tell locals (LOAD_FAST) from globals (LOAD_GLOBAL) and
attributes (LOAD_ATTR, LOAD_METHOD), and count the arguments of calls. Copying the source (the
names overlap) and retrieving the bytecode of the most similar training function are the
baselines to beat. The bytecode depends on the Python
version (3.12 renamed and merged instructions), as the tagging task's lines do.
`bigmodel/data/code2doc.py` is the other built-in pairs task (code → docstring summary), chosen
with `builtin_pairs: docstring`.
"""

from __future__ import annotations

import ast
import copy
import dis
import types
from pathlib import Path

import pandas as pd

from bigmodel.data.code2doc import functions

SKIPPED = {"RESUME", "CACHE", "NOP", "COPY_FREE_VARS", "MAKE_CELL", "EXTENDED_ARG"}


def instructions(code: types.CodeType) -> str:
    """The bytecode of one code object as words: opname [argument], jump targets left out."""
    words = []
    for ins in dis.get_instructions(code):
        if ins.opname in SKIPPED:
            continue
        words.append(ins.opname)
        if isinstance(ins.argval, types.CodeType):
            # a nested function, lambda or comprehension by its name: its repr holds the
            # object's memory address, which differs from run to run
            words.append(f"<code {ins.argval.co_name}>")
        elif _holds_a_set(ins.argval):
            # a set constant (`x in {"a", "b"}`): its repr follows string hashing, which differs
            # from process to process; its members sorted instead
            words.append(" ".join(_stable_repr(ins.argval).split()))
        elif ins.argrepr and not ins.opname.startswith(("JUMP", "POP_JUMP", "FOR_ITER", "SEND")):
            words.append(" ".join(ins.argrepr.split()))
    return " ".join(words)


def _holds_a_set(value: object) -> bool:
    return isinstance(value, frozenset) or (
        isinstance(value, tuple) and any(_holds_a_set(v) for v in value))


def _stable_repr(value: object) -> str:
    """repr, with the members of every frozenset sorted by their own stable repr."""
    if isinstance(value, frozenset):
        return f"frozenset({{{', '.join(sorted(map(_stable_repr, value)))}}})" if value else "frozenset()"
    if isinstance(value, tuple):
        items = [_stable_repr(v) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    return repr(value)


def function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, max_source_chars: int,
                  max_target_chars: int) -> tuple[str, str] | None:
    """(one-line source without the docstring, its bytecode), or None when it does not fit."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    if not body or node.decorator_list:
        return None
    stripped = copy.copy(node)  # shallow: the original tree keeps its docstring
    stripped.body = body
    try:
        text = ast.unparse(stripped)
        source = " ".join(text.split())
        if len(source) > max_source_chars:
            return None
        module = compile(text, "<stdlib>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError):
        return None  # e.g. `nonlocal` or `return` outside their own enclosing function
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    target = instructions(code)
    if not target or len(target) > max_target_chars:
        return None
    return source, target


def stdlib_bytecode_pairs(root: Path, files: list[Path], max_source_chars: int = 160,
                          max_target_chars: int = 240) -> pd.DataFrame:
    """Columns source, target, group (the file, relative to `root`)."""
    rows = []
    for node, rel in functions(root, files):
        pair = function_pair(node, max_source_chars, max_target_chars)
        if pair:
            rows.append((*pair, rel))
    return pd.DataFrame(rows, columns=["source", "target", "group"])
