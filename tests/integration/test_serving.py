"""`mlflow models serve` on the registered models, over HTTP: the classifier by its `champion`
alias (text in → label and probabilities out) and the GPT (prompt in → completion out)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from bigmodel import config, tracking
from bigmodel.generate import TextGenerator
from tests.conftest import stage_env
from tests.servers import free_port, running

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture
def registered(tmp_path, monkeypatch, tiny_classifier_dir, tiny_gpt_dir):  # noqa: ANN001, ANN201
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    p = config.validate({"tracking": {"experiment": "serve"}})
    p._root = tmp_path
    with tracking.stage_run("finetune", p, ["finetune"]) as run:
        clf = run.log_classifier(tiny_classifier_dir, "serve-clf", example=["read a file"])
    with tracking.stage_run("pretrain", p, ["pretrain"]) as run:
        gpt = run.log_generator(tiny_gpt_dir, "serve-gpt", example=["def f():"])
    tracking.set_alias(p, "serve-clf", "champion", clf, {})
    tracking.set_alias(p, "serve-gpt", "champion", gpt, {})
    return tracking.tracking_uri(p)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def serve(model_uri: str, store: str, log_dir: Path):  # noqa: ANN201
    port = free_port()
    env = {**stage_env(), "MLFLOW_TRACKING_URI": store}
    cmd = [MLFLOW, "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    return port, running(cmd, log_dir, env, health=f"http://127.0.0.1:{port}/ping", timeout_s=120)


@pytest.mark.slow
def test_served_champion_classifier_and_gpt_answer_over_http(registered, tmp_path,  # noqa: ANN001
                                                             tiny_gpt_dir):
    port, server = serve("models:/serve-clf@champion", registered, tmp_path / "clf")
    with server:
        out = post(f"http://127.0.0.1:{port}/invocations",
                   {"dataframe_split": {"columns": ["text"],
                                        "data": [["open the file"], ["a button on a window"]]}})
    rows = out["predictions"]
    assert len(rows) == 2
    for row in rows:
        assert row["label"] in {"asyncio", "files", "gui"}
        assert abs(row["p_asyncio"] + row["p_files"] + row["p_gui"] - 1) < 1e-5

    port, server = serve("models:/serve-gpt@champion", registered, tmp_path / "gpt")
    with server:
        out = post(f"http://127.0.0.1:{port}/invocations",
                   {"dataframe_split": {"columns": ["prompt"], "data": [["def read(path):"]]},
                    "params": {"max_new_tokens": 6, "temperature": 0.0}})
    completion = out["predictions"][0]["completion"]
    assert isinstance(completion, str) and completion
    # greedy decoding: the served model says exactly what the same weights say locally
    assert completion == TextGenerator.load(tiny_gpt_dir).complete("def read(path):", 6, 0.0)
