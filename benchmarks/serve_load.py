"""Served models under load: `mlflow models serve` answering N concurrent clients.

Builds two tiny models with random, seeded weights the way tests/integration/test_serving.py
does (offline: tokenizers trained on a few lines, tests/conftest.py's `save_tiny_model`), a BERT
classifier and a GPT, logs and registers each through `serving.log_model` (so the server runs
the request check and the limits of a real model) in a temporary MLflow store, and serves each
on 127.0.0.1 with tests/servers.py's harness. Then CLIENTS threads, each with its own
connection-per-request urllib client, post good requests back to back for SECONDS: one text for
the classifier, one prompt and 16 greedy tokens for the GPT. It prints, and writes to
benchmarks/serve_load.txt, requests/s and p50 / p99 latency per model, and the error count
(a non-2xx answer or an exception), which must be 0: it exits 1 otherwise.

The clients run on the same machine as the server, so on a small one they take CPU from it:
requests/s is what client and server manage together, not the server's ceiling.

    .venv/bin/python benchmarks/serve_load.py             # 4 clients, 20 s a model
    .venv/bin/python benchmarks/serve_load.py --clients 8 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import save_tiny_model, stage_env  # noqa: E402 (also: telemetry off)
from tests.servers import free_port, running  # noqa: E402

from bigmodel import config, serving, tracking  # noqa: E402
from bigmodel.text.tokenizers import train_bpe, train_wordpiece  # noqa: E402
from machine import commit, cpu_model  # noqa: E402

MLFLOW = str(Path(sys.executable).parent / "mlflow")
OUT = Path(__file__).with_name("serve_load.txt")
CORPUS = [f"{t}\n# variant {i}\n" for i in range(30) for t in (
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "Open the file, read every line and close it again.",
    "import asyncio\nasync def main():\n    await asyncio.sleep(1)\n")]
NEW_TOKENS = 16
REQUESTS = {  # model → (what it is, the request every client sends)
    "classifier": ("BERT seq_cls, 1 text a request",
                   {"dataframe_split": {"columns": ["text"],
                                        "data": [["Return the temporary directory."]]}}),
    "generator": (f"GPT clm, 1 prompt → {NEW_TOKENS} greedy tokens a request",
                  {"dataframe_split": {"columns": ["prompt"], "data": [["def read_config(path):"]]},
                   "params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0}}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--seconds", type=float, default=20.0, help="load time per model")
    ap.add_argument("--out", type=Path, default=OUT, help="where the table is written")
    args = ap.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients must be >= 1 and --seconds > 0")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        store = register_models(Path(tmp))
        lines = header(args)
        print("\n".join(lines), flush=True)
        errors = 0
        for name, (what, body) in REQUESTS.items():
            port = free_port()
            env = {**stage_env(), "MLFLOW_TRACKING_URI": store}
            cmd = [MLFLOW, "models", "serve", "-m", f"models:/load-{name}/1", "--env-manager",
                   "local", "-h", "127.0.0.1", "-p", str(port)]
            with running(cmd, Path(tmp) / name, env, health=f"http://127.0.0.1:{port}/ping",
                         timeout_s=180):
                result = drive(f"http://127.0.0.1:{port}/invocations", body, args.clients,
                               args.seconds)
            errors += result["errors"]
            lines.append(row(name, what, args.clients, result))
            print(lines[-1], flush=True)
    lines += ["", f"Errors (non-2xx answers or exceptions): {errors}. Load average after the "
                  f"runs {os.getloadavg()[0]:.1f}."]
    print(lines[-1])
    args.out.write_text("\n".join(lines) + "\n")
    if errors:
        sys.exit(1)


def register_models(root: Path) -> str:
    """The two tiny models, logged and registered as load-classifier and load-generator in a
    SQLite store under root; returns the store's URI."""
    os.environ.pop(tracking.PARENT_ENV, None)
    os.environ.pop(tracking.URI_ENV, None)
    p = config.validate({"tracking": {"experiment": "serve-load"}})
    p._root = root
    wordpiece = train_wordpiece(iter(CORPUS), vocab_size=300, min_frequency=1)
    bpe = train_bpe(iter(CORPUS), vocab_size=300, min_frequency=1)
    folders = {
        "classifier": save_tiny_model(root / "classifier", wordpiece, "bert", "seq_cls",
                                      ["asyncio", "files", "gui"], pooling="cls"),
        "generator": save_tiny_model(root / "generator", bpe),
    }
    for name, folder in folders.items():
        with tracking.stage_run(f"serve-load@{name}", p, []) as run:
            serving.log_model(run, folder, f"load-{name}", example=["read a file"],
                              limits=p.serving)
    return tracking.tracking_uri(p)


def drive(url: str, body: dict, clients: int, seconds: float) -> dict:
    """`clients` threads posting `body` back to back for `seconds` (after 3 warm-up requests):
    latencies of the good answers, and the count of the others."""
    data = json.dumps(body).encode()

    failures: list[str] = []  # what went wrong, one line each

    def once() -> float | None:
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        try:  # urlopen raises HTTPError for any answer but 2xx
            with urllib.request.urlopen(req, timeout=60) as r:
                json.loads(r.read())["predictions"]  # a 2xx must carry predictions
        except urllib.error.HTTPError as e:
            failures.append(f"HTTP {e.code}: {e.read()[:300]!r}")
            return None
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            failures.append(f"{type(e).__name__}: {e}")
            return None
        return time.perf_counter() - start

    for _ in range(3):
        if once() is None:
            raise SystemExit(f"{url}: the warm-up request failed: {failures[-1]}")
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            s = once()
            if s is not None:
                latencies.append(s)  # list.append is atomic under the GIL

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        print(f"{len(failures)} failed requests; the first: {failures[0]}", file=sys.stderr)
    if len(latencies) < 2:
        raise SystemExit(f"{url}: {len(latencies)} good answers in {wall:.0f} s: nothing to time")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"requests": len(latencies) + len(failures), "errors": len(failures), "wall": wall,
            "rps": len(latencies) / wall, "p50": statistics.median(latencies), "p99": q[98]}


def header(args: argparse.Namespace) -> list[str]:
    import torch

    return [
        f"## Served models under load ({time.strftime('%Y-%m-%d')})", "",
        f"Command: `.venv/bin/python benchmarks/serve_load.py --clients {args.clients} "
        f"--seconds {args.seconds:g}` (on commit {commit()})", "",
        f"Machine: {os.cpu_count()} cores, {cpu_model()}, no GPU used, torch {torch.__version__}, "
        f"Python {platform.python_version()}; load average before the runs "
        f"{os.getloadavg()[0]:.1f}", "",
        "Server: `mlflow models serve --env-manager local` (1 uvicorn worker), tiny random "
        "models (1 layer, 16 wide, vocabulary 300); clients: urllib, one connection a request, "
        "on the same machine.", "",
        "| model | request | clients | seconds | requests | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]


def row(name: str, what: str, clients: int, r: dict) -> str:
    return (f"| {name} | {what} | {clients} | {r['wall']:.1f} | {r['requests']:,} | "
            f"{r['rps']:.1f} | {r['p50'] * 1000:.1f} | {r['p99'] * 1000:.1f} | {r['errors']} |")


if __name__ == "__main__":
    main()
