"""A built-in token-classification task: tag the names in real standard-library code.

Each example is one logical line of a stdlib source file (a statement, a `def`/`class`/`if`
header, a decorator), split into words with the stdlib `tokenize` module: names, keywords,
operators and literals, in source order. NEWLINE/NL/INDENT/DEDENT/COMMENT tokens are dropped;
a string literal longer than 24 characters, or spanning lines, is shortened to its opening
quotes, the first 16 characters of its first line, "…" and its closing quotes.

Every NAME word is tagged with what it denotes *at that place*, found from the file's AST with
Python's scoping rules (function, lambda, comprehension and class scopes, `global`/`nonlocal`):

  PARAM    a parameter of the enclosing function or lambda, at its definition or any use,
           including `self`/`cls` (they are parameters in the AST; telling them apart needs a
           naming convention, which the AST does not give) and closures over an outer one's.
  FUNC     a function or method defined in this file: the name after `def`, and uses of a name
           every binding of which, in the scope it resolves to, is a `def`.
  CLASS    the same for `class`.
  MODULE   a name bound by `import x`, `import x.y` (binds x), `import x as y` or `from . import m`
           (a bare relative import names submodules), and the dotted module path of an import
           statement (`import os.path`, `from email.mime import text`) as one multi-word entity:
           `os . path` → B-MODULE I-MODULE I-MODULE; leading dots of a relative import are O.
  BUILTIN  a name of the `builtins` module (of the running Python, without the helpers `site`
           adds: help, exit, quit, copyright, credits, license) that no visible scope binds.
  O        everything else: keywords, operators, literals, attributes, keyword-argument names,
           locals and globals assigned by `=`/`for`/`with`/`except`, names from `from x import y`
           (their kind is not decidable from this file), and a name whose bindings in its scope
           disagree (`try: import json / except ImportError: json = None`).

A parameter stays PARAM when the function reassigns it. A star import (`from x import *`) is
assumed not to rebind builtins (not checked). Tags are IOB2; only the import path is
ever longer than one word.

Why this task: it is real code, free (no download), large (about 100,000 tagged lines from
CPython 3.11's stdlib: every line of every file, no subsampling, about 9 s on one core) and not
trivial. The same word denotes different things in different places (`path` is a parameter in
one function, a module in another, an attribute in a third; `type`, `input`, `file` are
builtins until a parameter shadows them): 85% of entity words carry more than one tag (O
included) somewhere. So a model has to read the context, and a most-frequent-tag-per-word
baseline stays clearly below perfect (entity F1 0.73 on a file-disjoint 80/20 split of the 3.11
stdlib).
"""

from __future__ import annotations

import ast
import builtins
import io
import tokenize
from pathlib import Path

import pandas as pd

from bigmodel.data.code2doc import parse

ENTITY_TYPES = ("PARAM", "FUNC", "CLASS", "MODULE", "BUILTIN")
LABELS = ["O"] + [f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in "BI"]

BUILTINS = frozenset(
    {n for n in dir(builtins) if not n.startswith("_")} | {"__import__", "__build_class__"}
) - {"help", "exit", "quit", "copyright", "credits", "license"}

_DROPPED = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
# Python 3.12+ splits f-strings (3.14: t-strings) into pieces; they are joined back into one word.
_STRING_STARTS = {getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START")
                  if hasattr(tokenize, n)}
_STRING_ENDS = {getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END")
                if hasattr(tokenize, n)}
_MAX_STRING = 24


def stdlib_tagging_examples(root: Path, files: list[Path], max_words: int = 64) -> pd.DataFrame:
    """One row per logical line with at least one entity and at most `max_words` words:
    columns tokens (list[str]), tags (list[str], IOB2) and group (the file, relative to root).
    Files in the order given, lines in file order; files that do not parse are skipped."""
    rows = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            lines = tag_source(source)
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError,
                tokenize.TokenError):
            continue  # a handful of stdlib files are deliberately not valid UTF-8/Python
        group = path.relative_to(root).as_posix()
        rows += [(words, tags, group) for words, tags in lines
                 if len(words) <= max_words and any(t != "O" for t in tags)]
    return pd.DataFrame(rows, columns=["tokens", "tags", "group"])


def tag_source(source: str) -> list[tuple[list[str], list[str]]]:
    """Every logical line of `source` as (words, IOB2 tags), entities or not.
    Raises SyntaxError when the source does not parse."""
    names, imports = _name_kinds(parse(source))
    return _tag_lines(source, names, imports)


# --- What each name denotes: scopes from the AST ------------------------------------------------

class _Scope:
    __slots__ = ("kind", "parent", "bindings", "params", "globals", "nonlocals")

    def __init__(self, kind: str, parent: _Scope | None):
        self.kind = kind  # module | class | function | comprehension
        self.parent = parent
        self.bindings: dict[str, set[str]] = {}  # name → how it is bound: FUNC CLASS MODULE LOCAL
        self.params: set[str] = set()
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()

    def bind(self, name: str, how: str) -> None:
        scope = self
        if name in self.globals:
            while scope.parent is not None:
                scope = scope.parent
        elif name in self.nonlocals:
            return  # rebinding an outer variable: its own bindings say what it is
        scope.bindings.setdefault(name, set()).add(how)


def _name_kinds(tree: ast.Module) -> tuple[dict, dict]:
    """(line, byte column) of each Name and parameter that is an entity → its B- tag,
    and of each import statement → its node."""
    walker = _ScopeWalker()
    walker.body(tree.body, walker.module)
    tags = dict.fromkeys(walker.params, "B-PARAM")
    for line, col, name, scope in walker.uses:
        kind = _resolve(name, scope, walker.module)
        if kind != "O":
            tags[(line, col)] = f"B-{kind}"
    return tags, walker.imports


def _resolve(name: str, scope: _Scope, module: _Scope) -> str:
    s: _Scope | None = scope
    while s is not None:
        if s.kind == "class" and s is not scope:
            s = s.parent  # a class body's names are invisible to the scopes nested in it
            continue
        if name in s.globals:
            s = module
        if name not in s.nonlocals:
            if name in s.params:
                return "PARAM"
            if name in s.bindings:
                how = s.bindings[name]
                return next(iter(how)) if len(how) == 1 and "LOCAL" not in how else "O"
        s = s.parent
    return "BUILTIN" if name in BUILTINS else "O"


# Nodes without names below them: skipped for speed (a third of all nodes are Load/Store).
_LEAVES = (ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Constant)


class _ScopeWalker:
    """One pass over a module: bindings into scopes, and every Name with the scope it is in."""

    def __init__(self):
        self.module = _Scope("module", None)
        self.uses: list[tuple[int, int, str, _Scope]] = []
        self.params: list[tuple[int, int]] = []
        self.imports: dict[tuple[int, int], ast.Import | ast.ImportFrom] = {}
        self.special = {
            ast.Name: self.name, ast.FunctionDef: self.function,
            ast.AsyncFunctionDef: self.function, ast.Lambda: self.function,
            ast.ClassDef: self.class_, ast.ListComp: self.comprehension,
            ast.SetComp: self.comprehension, ast.GeneratorExp: self.comprehension,
            ast.DictComp: self.comprehension, ast.NamedExpr: self.named_expr,
            ast.Import: self.import_, ast.ImportFrom: self.import_, ast.Global: self.declare,
            ast.Nonlocal: self.declare, ast.ExceptHandler: self.bind_name,
            ast.MatchAs: self.bind_name, ast.MatchStar: self.bind_name,
            ast.MatchMapping: self.bind_name,
        }

    def visit(self, node: ast.AST, scope: _Scope) -> None:
        special = self.special.get(type(node))
        if special is not None:
            special(node, scope)
        else:
            self.children(node, scope)

    def children(self, node: ast.AST, scope: _Scope) -> None:
        for field in node._fields:
            value = getattr(node, field, None)
            if type(value) is list:
                for item in value:
                    if isinstance(item, ast.AST) and not isinstance(item, _LEAVES):
                        self.visit(item, scope)
            elif isinstance(value, ast.AST) and not isinstance(value, _LEAVES):
                self.visit(value, scope)

    def body(self, nodes: list, scope: _Scope) -> None:
        for node in nodes:
            self.visit(node, scope)

    def name(self, node: ast.Name, scope: _Scope) -> None:
        if type(node.ctx) is not ast.Load:
            scope.bind(node.id, "LOCAL")
        self.uses.append((node.lineno, node.col_offset, node.id, scope))

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
                 scope: _Scope) -> None:
        args = node.args
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs,
                 *filter(None, (args.vararg, args.kwarg))]
        if not isinstance(node, ast.Lambda):  # decorators, annotations, defaults: outer scope
            scope.bind(node.name, "FUNC")
            self.body(node.decorator_list, scope)
            self.body([a.annotation for a in every if a.annotation], scope)
            if node.returns:
                self.visit(node.returns, scope)
        self.body([*args.defaults, *filter(None, args.kw_defaults)], scope)
        inner = _Scope("function", scope)
        for a in every:
            inner.params.add(a.arg)
            self.params.append((a.lineno, a.col_offset))
        self.body([node.body] if isinstance(node, ast.Lambda) else node.body, inner)

    def class_(self, node: ast.ClassDef, scope: _Scope) -> None:
        scope.bind(node.name, "CLASS")
        self.body([*node.decorator_list, *node.bases, *(k.value for k in node.keywords)], scope)
        self.body(node.body, _Scope("class", scope))

    def comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp,
                      scope: _Scope) -> None:
        inner = _Scope("comprehension", scope)
        for i, gen in enumerate(node.generators):
            self.visit(gen.iter, scope if i == 0 else inner)  # the first runs in the outer scope
            self.visit(gen.target, inner)
            self.body(gen.ifs, inner)
        self.body([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt], inner)

    def named_expr(self, node: ast.NamedExpr, scope: _Scope) -> None:
        target = scope  # `:=` binds in the nearest scope that is not a comprehension
        while target.kind == "comprehension":
            target = target.parent
        self.visit(node.target, target)
        self.visit(node.value, scope)

    def import_(self, node: ast.Import | ast.ImportFrom, scope: _Scope) -> None:
        self.imports[(node.lineno, node.col_offset)] = node
        how = "MODULE" if isinstance(node, ast.Import) or node.module is None else "LOCAL"
        for alias in node.names:
            if alias.name != "*":
                bound = alias.asname or alias.name
                scope.bind(bound.split(".")[0] if isinstance(node, ast.Import) else bound, how)

    def declare(self, node: ast.Global | ast.Nonlocal, scope: _Scope) -> None:
        (scope.globals if isinstance(node, ast.Global) else scope.nonlocals).update(node.names)

    def bind_name(self, node: ast.ExceptHandler | ast.MatchAs | ast.MatchStar | ast.MatchMapping,
                  scope: _Scope) -> None:
        bound = node.rest if isinstance(node, ast.MatchMapping) else node.name
        if bound:  # except E as e, case P as x, case [*rest], case {**rest}
            scope.bind(bound, "LOCAL")
        self.children(node, scope)


# --- Words and tags: the token stream -----------------------------------------------------------

def _tag_lines(source: str, names: dict[tuple[int, int], str],
               imports: dict[tuple[int, int], ast.Import | ast.ImportFrom]) -> list:
    lines = io.StringIO(source).readlines()
    byte_columns = not source.isascii()  # the AST counts columns in UTF-8 bytes, tokenize in chars
    out: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    after_keyword = None  # B-FUNC after `def`, B-CLASS after `class`
    statement: _ImportTagger | None = None
    string_depth, string_start = 0, (0, 0)
    for kind, text, start, end, _ in tokenize.generate_tokens(io.StringIO(source).readline):
        if kind == tokenize.NEWLINE or kind == tokenize.ENDMARKER:
            if words:
                out.append((words, tags))
            words, tags, statement = [], [], None
            continue
        if kind in _STRING_STARTS:
            string_depth += 1
            string_start = start if string_depth == 1 else string_start
            continue
        if string_depth:
            if kind in _STRING_ENDS:
                string_depth -= 1
                if not string_depth:
                    words.append(_shorten(_between(lines, string_start, end)))
                    tags.append("O")
            continue
        if kind in _DROPPED or (kind == tokenize.ERRORTOKEN and text.isspace()):
            continue
        tag = "O"
        if kind == tokenize.NAME:
            if byte_columns:
                row, col = start
                start = (row, len(lines[row - 1][:col].encode("utf-8")))
            if statement is None and start in imports:
                statement = _ImportTagger(imports[start])
            if statement is not None:
                tag = statement.feed(text, True)
            elif after_keyword:
                tag, after_keyword = after_keyword, None
            elif text == "def" or text == "class":
                after_keyword = "B-FUNC" if text == "def" else "B-CLASS"
            else:
                tag = names.get(start, "O")
        elif statement is not None:
            tag = statement.feed(text, False)
            if text == ";":
                statement = None
        elif kind == tokenize.STRING:
            text = _shorten(text)
        words.append(text)
        tags.append(tag)
    return out


class _ImportTagger:
    """Tags the words of one import statement, fed in order: dotted module paths and the
    names they bind (MODULE, or O for `from x import y`)."""

    def __init__(self, node: ast.Import | ast.ImportFrom):
        self.is_from = isinstance(node, ast.ImportFrom)
        self.bound = "O" if self.is_from and node.module is not None else "B-MODULE"
        self.state = "start"  # then: path (dot path)* [as alias], or from-path import names

    def feed(self, text: str, is_name: bool) -> str:
        state = self.state
        if state == "start":  # the keyword `import` / `from`
            self.state = "from" if self.is_from else "path_start"
            return "O"
        if state in ("from", "path_start"):
            if is_name and text == "import":
                self.state = "names"
            elif is_name:
                self.state = "path"
                return "B-MODULE"
            return "O"  # the dots of a relative import
        if state == "path":
            if text == ".":
                self.state = "dot"
                return "I-MODULE"
            self.state = {"as": "alias", "import": "names", ",": "path_start"}.get(text, "path")
            return "O"
        if state == "dot":
            self.state = "path"
            return "I-MODULE"
        if state == "alias":
            self.state = "names" if self.is_from else "path"
            return self.bound if self.is_from else "B-MODULE"
        # names after `from x import`: ( a as b , c )
        if is_name and text == "as":
            self.state = "alias"
            return "O"
        return self.bound if is_name else "O"


def _between(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]


def _shorten(literal: str) -> str:
    """A long or multi-line string literal → opening quotes, its start, "…", closing quotes."""
    if len(literal) <= _MAX_STRING and "\n" not in literal:
        return literal
    q = next(i for i, ch in enumerate(literal) if ch in "'\"")
    quote = literal[q:q + 3] if literal[q:q + 3] in ('"""', "'''") else literal[q]
    body = literal[q + len(quote):len(literal) - len(quote)]
    return f"{literal[:q]}{quote}{body.split(chr(10), 1)[0][:16]}…{quote}"
