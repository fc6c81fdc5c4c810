"""Security checks over the repository's own files, each shown to catch what it looks for:

- no unpickling load on any load path (pickle and friends, `torch.load` without
  `weights_only=True`, `numpy.load(allow_pickle=True)`, `yaml.load` without a safe loader,
  `eval` / `exec`), found by parsing bigmodel/ and flows/ with `ast`;
- every server the repo starts binds 127.0.0.1 (or a variable that defaults to it): the Makefile,
  infra/*.sh, the compose stack (where a container binds 0.0.0.0, its published ports are bound to
  127.0.0.1), prefect.yaml, the READMEs' commands and the Python code that starts one;
- the compose stack does not start while a secret is still its change-me placeholder;
- no private keys, cloud or hub tokens, or literal passwords in the files git holds.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
PREFLIGHT = INFRA / "preflight.sh"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_absolute() else str(path)


# --- 1. no unpickling loads -------------------------------------------------------------------

# modules whose whole purpose is (un)pickling arbitrary objects
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "jsonpickle"}
# calls that unpickle whatever they are given
UNPICKLING_CALLS = {"joblib.load", "pandas.read_pickle", "mlflow.pytorch.load_model",
                    "mlflow.sklearn.load_model", "yaml.unsafe_load", "yaml.unsafe_load_all",
                    "yaml.full_load", "yaml.full_load_all", "builtins.eval", "builtins.exec",
                    "eval", "exec"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → the dotted name it was imported as (`np` → `numpy`, `load` → `torch.load`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """`file:line: what` for every unpickling load, unsafe YAML load or eval/exec in `source`."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLING_MODULES:
                    flag(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] in PICKLING_MODULES:
                flag(node, f"from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        if name in UNPICKLING_CALLS:
            flag(node, f"{name}(...)")
        elif name in ("torch.load", "torch.serialization.load"):
            if not _is_true(_keyword(node, "weights_only")):
                flag(node, f"{name}(...) without weights_only=True")
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                flag(node, f"{name}(..., allow_pickle={ast.unparse(allow)})")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, aliases) not in SAFE_YAML_LOADERS:
                flag(node, f"{name}(...) without a safe Loader (use yaml.safe_load)")
        elif name in ("importlib.import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in PICKLING_MODULES:
                flag(node, f"{name}({arg.value!r})")
    return found


def test_no_unpickling_or_unsafe_load_on_any_load_path():
    files = python_files("bigmodel", "flows")
    assert len(files) > 30 and REPO / "bigmodel/train/trainer.py" in files
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), rel(path))]
    assert not found, "unsafe loads:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p)\n",
    "import torch\ntorch.load(p, weights_only=False)\n",
    "import torch\ntorch.load(p, map_location='cpu', **kw)\n",
    "from torch import load\nload(p)\n",
    "import torch as T\nT.serialization.load(p)\n",
    "import pickle\n",
    "from cloudpickle import loads\n",
    "import joblib\njoblib.load(p)\n",
    "from joblib import load as jl\njl(p)\n",
    "import numpy as np\nnp.load(p, allow_pickle=True)\n",
    "import numpy\nnumpy.load(p, allow_pickle=flag)\n",
    "import yaml\nyaml.load(text)\n",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
    "import yaml\nyaml.load(text, yaml.FullLoader)\n",
    "import yaml\nyaml.unsafe_load(text)\n",
    "from yaml import full_load\nfull_load(text)\n",
    "eval(line)\n",
    "exec(code, {})\n",
    "import importlib\nimportlib.import_module('pickle')\n",
    "import pandas as pd\npd.read_pickle(p)\n",
])
def test_the_load_scanner_flags(source):
    [hit] = unsafe_loads(source, "planted.py")
    assert hit.startswith(f"planted.py:{len(source.splitlines())}: ")


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(p, weights_only=True, map_location='cpu')\n",
    "from torch import load\nload(p, weights_only=True)\n",
    "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False, mmap_mode='r')\n",
    "import yaml\nyaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\n",
    "from yaml import CSafeLoader, load\nload(t, CSafeLoader)\n",
    "model.eval()\nself.model.eval()\n",  # a method named eval is no eval
    "from safetensors.torch import load_file\nload_file(p)\n",
    "import json\njson.load(f)\n",
])
def test_the_load_scanner_passes(source):
    assert unsafe_loads(source, "fine.py") == []


# --- 2. servers bind 127.0.0.1 ----------------------------------------------------------------

LOCAL = "127.0.0.1"
# program words → the options naming its bind address (host, or host:port for ADDRESS_OPTIONS)
SERVERS = {
    ("mlflow", "server"): ("--host", "-h"),
    ("mlflow", "ui"): ("--host", "-h"),
    ("mlflow", "models", "serve"): ("--host", "-h"),
    ("mlflow", "deployments", "start-server"): ("--host",),
    ("mlflow", "gateway", "start"): ("--host",),
    ("prefect", "server", "start"): ("--host",),
    ("uvicorn",): ("--host",),
    ("gunicorn",): ("--bind", "-b"),
    ("flask", "run"): ("--host", "-h"),
    ("python", "-m", "http.server"): ("--bind", "-b"),
    ("minio", "server"): ("--address",),
}
ADDRESS_OPTIONS = {"--bind", "-b", "--address"}
PROGRAMS = {words[0] for words in SERVERS} | {"prefect", "docker"}
# `prefect worker start --with-healthcheck` serves /health on this (Prefect's default: 0.0.0.0)
WORKER_HOST = "PREFECT_WORKER_WEBSERVER_HOST"
SEPARATORS = {";", "&&", "||", "|", "&"}


def program(token: str) -> str:
    """The program a command word names: `$(BIN)/mlflow`, `"$mlflow_bin"`, `python3.11`."""
    word = re.sub(r"[\"'${}()]", "", token.rsplit("/", 1)[-1]).lower()
    if re.fullmatch(r"python[\d.]*|executable", word):
        return "python"
    for name in PROGRAMS:
        if word == name or word.startswith(f"{name}_"):
            return name
    return word


def host_is_local(value: str, defs: dict[str, str], depth: int = 0) -> bool:
    """127.0.0.1 itself, `${VAR:-127.0.0.1}`, or a variable (`$VAR`, `$(VAR)`) defined as such."""
    value = value.strip("\"'")
    if value == LOCAL:
        return True
    m = re.fullmatch(r"\$\{(\w+):?-(.*)\}", value)
    if m:
        return host_is_local(m.group(2), defs, depth + 1)
    m = re.fullmatch(r"\$(?:\{(\w+)\}|\((\w+)\)|(\w+))", value)
    if m and depth < 5:
        name = next(g for g in m.groups() if g)
        return name in defs and host_is_local(defs[name], defs, depth + 1)
    return False


def option_value(tokens: list[str], options: tuple[str, ...]) -> str | None:
    for i, tok in enumerate(tokens):
        for opt in options:
            if tok == opt and i + 1 < len(tokens):
                return tokens[i + 1]
            if opt.startswith("--") and tok.startswith(f"{opt}="):
                return tok.split("=", 1)[1]
    return None


def servers_in(tokens: list[str], defs: dict[str, str], env: dict[str, str] | None = None
               ) -> list[tuple[str, str | None, bool]]:
    """(server, its bind address or None, whether that is 127.0.0.1) for each server that the
    command words start; `env` is the environment the command runs in, where known."""
    found = []
    segments, current = [], []
    for tok in tokens:
        if tok in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    for seg in segments:
        for i, tok in enumerate(seg):
            rest = seg[i + 1:]
            name = program(tok)
            for words, options in SERVERS.items():
                if name == words[0] and [w.lower() for w in rest[:len(words) - 1]] == list(words[1:]):
                    value = option_value(rest[len(words) - 1:], options)
                    host = value
                    if value is not None and set(options) & ADDRESS_OPTIONS:
                        host = value[:value.rfind(":")] if ":" in value else value
                    found.append((" ".join(words), value,
                                  host is not None and host_is_local(host, defs)))
            if name == "prefect" and rest[:2] == ["worker", "start"] and "--with-healthcheck" in rest:
                host = (env or {}).get(WORKER_HOST)
                found.append(("prefect worker webserver", host,
                              host is not None and host_is_local(str(host), defs)))
            if name == "docker" and rest[:1] == ["run"]:
                for j, arg in enumerate(rest):
                    published = (rest[j + 1] if arg in ("-p", "--publish") and j + 1 < len(rest)
                                 else arg.split("=", 1)[1] if arg.startswith("--publish=")
                                 else None)
                    if published is not None:
                        found.append(("docker run --publish", published,
                                      published.startswith(f"{LOCAL}:")))
    return found


def shell_commands(text: str) -> list[list[str]]:
    """The command words of each shell line (continuations joined, comments dropped)."""
    commands = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        line = line[2:] if line.startswith("$ ") else line
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: plain words are enough to spot a server
            words = line.split("#", 1)[0].split()
        if words:
            commands.append(words)
    return commands


def shell_servers(text: str, defs: dict[str, str] | None = None,
                  env: dict[str, str] | None = None) -> list[tuple[str, str | None, bool]]:
    return [s for words in shell_commands(text) for s in servers_in(words, defs or {}, env)]


def make_recipes(text: str) -> tuple[str, dict[str, str]]:
    """A Makefile's recipe lines (as shell text) and its variable definitions."""
    defs = {}
    for m in re.finditer(r"^(?:export\s+)?(\w+)\s*(?:\?=|:=|=)\s*([^#\n]*)", text, re.M):
        defs[m.group(1)] = m.group(2).strip()
    recipes = "\n".join(line[1:] for line in re.sub(r"\\\n\t?", " ", text).splitlines()
                        if line.startswith("\t"))
    return recipes, defs


def shell_definitions(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in
            re.finditer(r"^\s*(?:export\s+|local\s+)?(\w+)=(\S+)", text, re.M)}


def fenced_shell_blocks(markdown: str) -> str:
    """The shell code blocks of a markdown text (fences read in order, so the closing fence of a
    yaml or python block is never taken for the opening of a shell one)."""
    blocks, lines, language = [], [], None
    for line in markdown.splitlines():
        fence = re.match(r"^```\s*(\w*)\s*$", line)
        if fence and language is None:
            language, lines = fence.group(1), []
        elif fence:
            if language in ("bash", "sh", "shell", "console", ""):
                blocks.append("\n".join(lines))
            language = None
        elif language is not None:
            lines.append(line)
    return "\n".join(blocks)


def words_of(value: object) -> list[list[str]]:
    """A compose / Dockerfile command (a list or a string) as command words: the list itself,
    and each of its strings that is a shell script (`sh -c "..."`, a `|` block)."""
    if isinstance(value, str):
        return shell_commands(value)
    items = [str(v) for v in value or []]
    return [items] + [w for v in items if re.search(r"\s", v) for w in shell_commands(v)]


def port_parts(spec: str) -> list[str]:
    """`[ip:]host:container` split at its colons, not those inside `${VAR:-default}`."""
    parts, depth, current = [], 0, ""
    for i, ch in enumerate(spec):
        if spec.startswith("${", i):
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if ch == ":" and not depth:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def compose_servers(compose: dict) -> tuple[list[tuple[str, str, str | None, bool]], list[str]]:
    """Each compose service's servers, and what exposes them beyond 127.0.0.1. Inside its
    container a server must bind 0.0.0.0 to be reachable from the others; what reaches the
    host is its published ports, so those must be bound to 127.0.0.1 (and no host network)."""
    found, problems = [], []
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        command = svc.get("command")
        image = str(svc.get("image", "")).split(":")[0].rsplit("/", 1)[-1]
        if (svc.get("entrypoint") is None and isinstance(command, list) and command
                and program(command[0]) not in PROGRAMS and image in PROGRAMS):
            command = [image, *command]  # `minio/minio` runs `minio <command>`
        for words in words_of(svc.get("entrypoint")) + words_of(command):
            for server, host, local in servers_in(words, {}, env):
                found.append((name, server, host, local))
                if server == "prefect worker webserver" and not local:
                    problems.append(f"docker-compose.yml {name}: its healthcheck webserver binds "
                                    f"{host or '0.0.0.0 (the default)'}: set {WORKER_HOST}: {LOCAL}")
        if svc.get("network_mode") == "host":
            problems.append(f"docker-compose.yml {name}: network_mode host bypasses the port bindings")
        for port in svc.get("ports", []):
            parts = port_parts(str(port)) if not isinstance(port, dict) else []
            ip = port.get("host_ip") if isinstance(port, dict) else (
                parts[0] if len(parts) == 3 else None)
            if ip is None or not host_is_local(ip, {}):
                problems.append(f"docker-compose.yml {name}: port {port} is not bound to {LOCAL}")
    return found, problems


def python_servers(source: str, filename: str = "<string>") -> list[tuple[str, str, str | None, bool]]:
    """(where, server, address, local) for Python that starts a server: command lists given to
    subprocess (`[PREFECT, "server", "start", "--host", ...]`) and sockets or HTTP servers
    bound in-process."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def word(node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            return str(node.value)
        if isinstance(node, ast.Call) and node.args:  # str(SCRIPT), os.fspath(x)
            return word(node.args[0])
        dotted = _dotted(node, aliases)
        return (dotted or "<expr>").rsplit(".", 1)[-1]

    def address(node: ast.AST | None) -> tuple[str | None, bool]:
        if isinstance(node, ast.Tuple) and node.elts:
            node = node.elts[0]
        if isinstance(node, ast.Constant):
            return str(node.value), node.value == LOCAL
        return (ast.unparse(node) if node is not None else None), False

    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.List, ast.Tuple)):
            words = [word(e) for e in node.elts if not isinstance(e, ast.Starred)]
            found += [(where, server, host, local) for server, host, local in servers_in(words, {})]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        last = node.func.attr if isinstance(node.func, ast.Attribute) else name.rsplit(".", 1)[-1]
        if last in ("HTTPServer", "ThreadingHTTPServer", "TCPServer", "ThreadingTCPServer",
                    "UDPServer", "make_server") and node.args:
            found.append((where, last, *address(node.args[0])))
        elif last == "bind" and node.args and isinstance(node.args[0], ast.Tuple):
            found.append((where, "socket bind", *address(node.args[0])))
        elif name == "uvicorn.run" or (last == "run" and _keyword(node, "host") is not None):
            found.append((where, name, *address(_keyword(node, "host"))))
    return sorted(found, key=lambda f: int(f[0].rsplit(":", 1)[1]))


def bind_sources() -> tuple[dict[str, list], list[str]]:
    """Every server found, by source, and every bind that is not 127.0.0.1."""
    found: dict[str, list] = {}
    problems: list[str] = []

    def note(source: str, servers: list) -> None:
        found.setdefault(source, []).extend(servers)
        for server, host, local in servers:
            if not local:
                problems.append(f"{source}: {server} binds {host or 'its default address'}, "
                                f"not {LOCAL}")

    recipes, defs = make_recipes((REPO / "Makefile").read_text())
    note("Makefile", shell_servers(recipes, defs))
    for script in sorted(INFRA.glob("*.sh")):
        text = script.read_text()
        note(rel(script), shell_servers(text, shell_definitions(text)))
    for doc in ("README.md", "infra/README.md"):
        note(doc, shell_servers(fenced_shell_blocks((REPO / doc).read_text())))

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text())
    note("prefect.yaml", [s for text in strings(prefect_yaml) for s in shell_servers(text)])

    services, compose_problems = compose_servers(yaml.safe_load(COMPOSE.read_text()))
    problems += compose_problems
    for name, server, host, _ in services:
        found.setdefault(f"infra/docker-compose.yml {name}", []).append((server, host, True))

    for path in python_files("bigmodel", "flows", "tests", "benchmarks"):
        if path == Path(__file__).resolve():  # the planted examples above
            continue
        for where, server, host, local in python_servers(path.read_text(), rel(path)):
            found.setdefault(rel(path), []).append((server, host, local))
            if not local:
                problems.append(f"{where}: {server} binds {host or 'its default address'}, "
                                f"not {LOCAL}")
    return found, problems


def test_every_server_binds_127_0_0_1_unless_told_otherwise():
    found, problems = bind_sources()
    assert not problems, "\n".join(problems)
    servers = {(source, server) for source, items in found.items() for server, _, _ in items}
    # the scan sees the servers the repo starts (a parser gone blind would pass everything)
    assert {("Makefile", "mlflow ui"), ("Makefile", "mlflow models serve"),
            ("Makefile", "prefect server start"), ("infra/mlflow-server.sh", "mlflow server"),
            ("infra/docker-compose.yml mlflow", "mlflow server"),
            ("infra/docker-compose.yml prefect-server", "prefect server start"),
            ("infra/docker-compose.yml minio", "minio server"),
            ("infra/docker-compose.yml prefect-worker", "prefect worker webserver"),
            ("infra/docker-compose.yml gpu-worker", "prefect worker webserver"),
            ("tests/servers.py", "socket bind")} <= servers
    # and reads the READMEs' commands (none of which starts a server directly today)
    for doc in ("README.md", "infra/README.md"):
        assert len(shell_commands(fenced_shell_blocks((REPO / doc).read_text()))) > 10, doc


@pytest.mark.parametrize(("command", "local"), [
    ("mlflow server --host 0.0.0.0 --port 5000", False),
    ("$(BIN)/mlflow ui --backend-store-uri sqlite:///x.db --port 5000", False),  # no --host
    ("cd x && .venv/bin/prefect server start --host=0.0.0.0", False),
    ("exec \"$mlflow_bin\" server \\\n    --host 127.0.0.1 \\\n    --port 5000", True),
    ("mlflow models serve -m models:/m@champion -h 127.0.0.1 -p 5001", True),
    ("prefect server start --host ${PREFECT_HOST:-127.0.0.1}", True),
    ("prefect server start --host ${PREFECT_HOST:-0.0.0.0}", False),
    ("python3 -m http.server 8000", False),
    ("python -m http.server -b 127.0.0.1 8000", True),
    ("gunicorn -b :8000 app:app", False),
    ("minio server /data --address 127.0.0.1:9000", True),
    ("prefect worker start --pool p --with-healthcheck", False),
    ("docker run -p 5000:5000 image", False),
    ("docker run -p 127.0.0.1:5000:5000 image", True),
])
def test_the_bind_scanner_reads_a_command(command, local):
    [(_, _, got)] = shell_servers(command)
    assert got is local


def test_the_bind_scanner_resolves_make_and_shell_variables():
    recipes, defs = make_recipes("HOST ?= 0.0.0.0\nSAFE := 127.0.0.1\nx:\n\tmlflow ui --host $(HOST)\n"
                                 "y:\n\tmlflow ui \\\n\t\t--host $(SAFE)\n")
    assert [local for _, _, local in shell_servers(recipes, defs)] == [False, True]
    script = 'host="${BIND:-127.0.0.1}"\nexec mlflow server --host "$host"\n'
    assert shell_servers(script, shell_definitions(script)) == [("mlflow server", "$host", True)]
    assert shell_servers("# mlflow server --host 0.0.0.0\necho 'mlflow server' # a mention") == []


def test_the_bind_scanner_flags_python_servers():
    source = """
import socket, subprocess
from http.server import HTTPServer
subprocess.Popen([PREFECT, "server", "start", "--host", "0.0.0.0"])
subprocess.Popen([MLFLOW, "models", "serve", "-m", uri, "-h", "127.0.0.1"])
HTTPServer(("", 8000), Handler)
socket.socket().bind(("0.0.0.0", 0))
socket.socket().bind(("127.0.0.1", 0))
"""
    got = [(where, server, local) for where, server, _, local in python_servers(source, "p.py")]
    assert got == [("p.py:4", "prefect server start", False), ("p.py:5", "mlflow models serve", True),
                   ("p.py:6", "HTTPServer", False), ("p.py:7", "socket bind", False),
                   ("p.py:8", "socket bind", True)]


def test_the_bind_scanner_flags_compose_exposure():
    compose = {"services": {
        "open": {"command": ["mlflow", "server", "--host", "0.0.0.0"], "ports": ["5000:5000"]},
        "hostnet": {"command": "prefect server start --host 0.0.0.0", "network_mode": "host"},
        "worker": {"command": ["prefect", "worker", "start", "--with-healthcheck"]},
        "fine": {"entrypoint": ["/bin/sh", "-ec"], "command": ["exec mlflow server --host 0.0.0.0"],
                 "ports": ["127.0.0.1:${PORT:-5000}:5000", "${BIND:-127.0.0.1}:9001:9001",
                           {"target": 9000, "host_ip": LOCAL}]},
        "open-default": {"command": "minio server /data", "ports": ["${IP:-0.0.0.0}:9000:9000"]},
        "fine-worker": {"command": ["prefect", "worker", "start", "--with-healthcheck"],
                        "environment": {WORKER_HOST: LOCAL}},
    }}
    found, problems = compose_servers(compose)
    assert {name for name, *_ in found} == {"open", "hostnet", "worker", "fine", "open-default",
                                            "fine-worker"}
    assert [p.split(":")[0] for p in problems] == [
        "docker-compose.yml open", "docker-compose.yml hostnet", "docker-compose.yml worker",
        "docker-compose.yml open-default"]
    assert port_parts("127.0.0.1:${P:-5000}:5000") == ["127.0.0.1", "${P:-5000}", "5000"]


def dockerfile_env(text: str) -> dict[str, str]:
    env = {}
    for instruction in re.findall(r"^ENV\s+(.*?)(?<!\\)$", re.sub(r"\\\n", " ", text), re.M):
        env.update(re.findall(r"(\w+)=(\S+)", instruction))
    return env


def test_worker_images_bind_their_health_webserver_to_127_0_0_1():
    for dockerfile in (INFRA / "Dockerfile", INFRA / "Dockerfile.cpu"):
        text = dockerfile.read_text()
        cmds = re.findall(r"^(?:CMD|ENTRYPOINT)\s+(.*)$", text, re.M)
        env = dockerfile_env(text)
        servers = [s for cmd in cmds for words in words_of(json.loads(cmd))
                   for s in servers_in(words, {}, env)]
        assert servers, f"{dockerfile.name}: no worker command found"
        assert all(local for _, _, local in servers), f"{dockerfile.name}: {servers}"


# --- 3. no start with placeholder secrets ------------------------------------------------------

def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v for k, v in pairs}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?message}` against an env file."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        got = env.get(name, "")
        if op == ":-":
            return got or arg
        if op == ":?" and not got:
            raise KeyError(f"{name}: {arg}")
        return got
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, str(value))


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


@pytest.fixture(scope="module")
def preflight(services) -> dict:  # noqa: ANN001
    assert "preflight" in services, "docker-compose.yml has no preflight service"
    return services["preflight"]


def preflight_run(preflight: dict, values: dict[str, str], shell: str = "bash"
                  ) -> subprocess.CompletedProcess:
    """infra/preflight.sh as the compose service runs it: its arguments, its environment
    (the service's `environment`, interpolated from `values` as compose would)."""
    command = preflight["command"]
    assert command[:2] == ["sh", "/preflight.sh"], command
    env = {k: interpolate(v, values) for k, v in preflight["environment"].items()}
    env = {k: v for k, v in env.items() if v != ""}  # compose sets empty; the script sees none
    return subprocess.run([shutil.which(shell) or shell, str(PREFLIGHT), *command[2:]],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                          timeout=30)


def test_preflight_runs_the_repo_script_on_every_placeholder_secret(preflight):  # noqa: ANN001
    assert f"./{PREFLIGHT.name}:/preflight.sh:ro" in preflight["volumes"]
    assert (COMPOSE.parent / PREFLIGHT.name).resolve() == PREFLIGHT and PREFLIGHT.is_file()
    assert preflight.get("restart") == "no" and not preflight.get("depends_on")
    assert "profiles" not in preflight
    placeholders = {k for k, v in env_file(ENV_EXAMPLE).items() if "change-me" in v}
    assert len(placeholders) >= 5
    checked = set(preflight["command"][2:])
    assert placeholders <= checked, f"not checked by preflight: {sorted(placeholders - checked)}"
    assert checked <= set(preflight["environment"]), "checked but not passed in"


def test_every_other_service_waits_for_preflight_to_succeed(services):  # noqa: ANN001
    others = [name for name in services if name != "preflight"]
    assert len(others) >= 7
    for name in others:
        deps = services[name].get("depends_on") or {}
        assert isinstance(deps, dict) and "preflight" in deps, f"{name} does not wait for preflight"
        assert deps["preflight"] == {"condition": "service_completed_successfully"}, name


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_preflight_refuses_the_example_env_naming_each_placeholder(preflight, shell):  # noqa: ANN001
    example = env_file(ENV_EXAMPLE)
    done = preflight_run(preflight, example, shell)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    named = {name for line in lines for name in re.findall(r"\b[A-Z][A-Z0-9_]+\b", line)
             if name in example}
    assert named == set(preflight["command"][2:]) and len(lines) == len(named)
    assert all("placeholder" in line for line in lines)
    assert not any(v in done.stderr for k, v in example.items() if "change-me" in v)  # no values


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_preflight_passes_real_values_and_names_what_is_left(preflight, shell):  # noqa: ANN001
    example = env_file(ENV_EXAMPLE)
    real = {k: v.replace("change-me", "s3cr3t-Value") for k, v in example.items()}
    done = preflight_run(preflight, real, shell)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""

    one_left = {**real, "MINIO_ROOT_PASSWORD": example["MINIO_ROOT_PASSWORD"]}
    del one_left["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    done = preflight_run(preflight, one_left, shell)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2
    assert "MINIO_ROOT_PASSWORD" in lines[0] and "placeholder" in lines[0]
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in lines[1] and "not set" in lines[1]


# --- 4. no secrets in the repository ----------------------------------------------------------

SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
}
# `password: x`, `POSTGRES_PASSWORD=x`, `"secret_key": "x"`, `--password=x` (not the name
# inside a `${VAR:?message}` reference)
PASSWORD_ASSIGNMENT = re.compile(
    r"(?i)(?<![\w{$])(?P<key>[\w.-]*(?:password|passwd|secret_key|secret_access_key|auth_string"
    r"|api_key)[\w-]*)[\"']?(?P<op>\s*[:=]\s*)(?P<value>[^\s,;)}\]]+)")
# what a documented placeholder looks like: change-me values, `...` (anywhere: `admin:...`),
# <angle brackets>, an upper-case name standing for a value (PASSWORD), or a reference to where
# the value comes from (`$VAR`, `${VAR}`, `{{ template }}`, `%(name)s`)
PLACEHOLDER = re.compile(r"(?i).*change-?me.*|.*\.\.\..*|<[^>]*>|\*+|x{3,}|pw|pass|password|"
                         r"(?-i:[A-Z][A-Z0-9_]*)|\$.*|%\(.*|\{\{.*")
COMMENT = re.compile(r"^\s*(?:#|//|<!--)")
# a password inside a URL: scheme://user:password@host
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:(?P<value>[^\s/@'\"]+)@")


def _literal(value: str, python: bool) -> str | None:
    """The literal a password is given, or None when it is not one (an expression in Python
    code, an empty string, a placeholder, a variable)."""
    if python:
        m = re.match(r"[rbuf]*([\"'])(.*?)\1", value)
        if not m:
            return None  # os.environ[...], a parameter, a function call
        value = m.group(2)
    value = value.strip("\"'`")
    if not value or value in ("true", "false", "null", "None") or PLACEHOLDER.fullmatch(value):
        return None
    return value


def secrets_in(text: str, where: str = "<string>") -> list[str]:
    """`where:line: kind` for each credential-looking string in `text`."""
    python = where.endswith(".py")
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for kind, pattern in SECRET_PATTERNS.items():
            if pattern.search(line):
                found.append(f"{where}:{n}: {kind}")
        for m in PASSWORD_ASSIGNMENT.finditer(line):
            if COMMENT.match(line) and m.group("op") != "=":  # prose: "password: at least 8"
                continue
            if _literal(m.group("value"), python) is not None:
                found.append(f"{where}:{n}: literal {m.group('key')}")
        for m in URL_PASSWORD.finditer(line):
            if _literal(m.group("value"), False) is not None:
                found.append(f"{where}:{n}: password in a URL")
    return found


def repo_files() -> list[Path]:
    """What git holds or would add (tracked, plus untracked files it does not ignore)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()
    return [REPO / p for p in sorted(set(out.split("\0"))) if p and (REPO / p).is_file()]


def test_no_secrets_in_the_files_git_holds():
    files = repo_files()
    assert len(files) > 100 and ENV_EXAMPLE in files and COMPOSE in files
    found = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        found += secrets_in(data.decode("utf-8", errors="replace"), rel(path))
    assert not found, "credentials in the repository:\n" + "\n".join(found)


# the planted secrets are put together at run time, so this file holds none itself
PLANTED = [
    ("-----BEGIN RSA " + "PRIVATE KEY-----", "private key"),
    ("-----BEGIN OPENSSH " + "PRIVATE KEY-----", "private key"),
    ("-----BEGIN " + "PRIVATE KEY-----", "private key"),
    ("aws_access_key_id = " + "AKIA" + "IOSFODNN7EXAMPLE", "AWS access key"),
    ("token: gh" + "p_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "GitHub token"),
    ("HF_TOKEN=h" + "f_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "Hugging Face token"),
    ("password: " + "hunter2", "literal password"),
    ("POSTGRES_PASSWORD=" + "s3cr3t-postgres", "literal POSTGRES_PASSWORD"),
    ("  MLFLOW_TRACKING_PASSWORD: " + "Tr0ub4dor", "literal MLFLOW_TRACKING_PASSWORD"),
    ('{"secret_key": "' + 'k3y-material"}', "literal secret_key"),
    ("postgresql://mlflow:" + "Wh4tever@127.0.0.1:5432/mlflow", "password in a URL"),
]


@pytest.mark.parametrize(("line", "kind"), PLANTED)
def test_the_secret_scanner_catches_a_planted_secret(line, kind):
    [hit] = secrets_in(f"# config\n{line}\n", "planted.yml")
    assert hit == f"planted.yml:2: {kind}"


def test_the_secret_scanner_catches_a_literal_password_in_python():
    source = "connect(password=" + "'hunter2'" + ")\npassword = " + '"s3cr3t"' + "\n"
    assert secrets_in(source, "x.py") == ["x.py:1: literal password", "x.py:2: literal password"]


@pytest.mark.parametrize("line", [
    "POSTGRES_PASSWORD=change-me-postgres",
    "PREFECT_API_AUTH_STRING=admin:change-me-prefect",
    "  POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in infra/.env}",
    "export MLFLOW_TRACKING_PASSWORD=...",
    "--from-literal=MLFLOW_TRACKING_PASSWORD='...'",
    "postgresql://mlflow:PASSWORD@127.0.0.1:5432/mlflow",
    "postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/mlflow",
    "MLFLOW_AUTH_ADMIN_PASSWORD: ${MLFLOW_TRACKING_PASSWORD}",
    "mc alias set local http://minio:9000 \"$${MINIO_ROOT_USER}\" \"$${MINIO_ROOT_PASSWORD}\"",
    "# user:password for the Prefect API",
    "AKIA" + "short",
])
def test_the_secret_scanner_passes_documented_placeholders(line):
    assert secrets_in(line, "doc.md") == []


def test_the_secret_scanner_passes_python_that_reads_a_password():
    assert secrets_in('password = os.environ["MLFLOW_TRACKING_PASSWORD"]\nconnect(password=pw)\n'
                      'masker(mask_token="")\n', "x.py") == []
