"""`mlflow models serve` on the registered models, over HTTP, each by its `champion` alias: a BERT
classifier (text in → label and probabilities out), a BERT tagger (text in → words, tags and
entity spans out) and the GPT (prompt in → completion out)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from bigmodel import config, serving, tracking
from bigmodel.tasks.clm import TextGenerator
from bigmodel.tasks.token_cls import Tagger
from tests.conftest import stage_env
from tests.servers import free_port, running

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture
def registered(tmp_path, monkeypatch, tiny_bert_classifier_dir, tiny_tagger_dir,  # noqa: ANN001, ANN201
               tiny_gpt_dir):
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    p = config.validate({"tracking": {"experiment": "serve"}})
    p._root = tmp_path
    for stage, folder, name in (("finetune@bert-cls", tiny_bert_classifier_dir, "serve-clf"),
                                ("finetune@bert-tag", tiny_tagger_dir, "serve-tagger"),
                                ("pretrain@gpt", tiny_gpt_dir, "serve-gpt")):
        with tracking.stage_run(stage, p, []) as run:
            version = serving.log_model(run, folder, name, example=["read a file"])
        tracking.set_alias(p, name, "champion", version, {})
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
def test_served_champion_classifier_tagger_and_gpt_answer_over_http(  # noqa: ANN001
        registered, tmp_path, tiny_gpt_dir, tiny_tagger_dir):
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

    port, server = serve("models:/serve-tagger@champion", registered, tmp_path / "tagger")
    with server:
        out = post(f"http://127.0.0.1:{port}/invocations",
                   {"dataframe_split": {"columns": ["text"], "data": [["def read(path): pass"]]}})
    [row] = out["predictions"]
    assert row["tokens"] == ["def", "read", "(", "path", ")", ":", "pass"]
    # the served tagger says exactly what the same weights say locally
    assert row["tags"] == Tagger.load(tiny_tagger_dir).tag([row["tokens"]])[0]
    assert all(e["text"] == " ".join(row["tokens"][e["start"]: e["end"] + 1])
               for e in row["entities"])

    port, server = serve("models:/serve-gpt@champion", registered, tmp_path / "gpt")
    with server:
        out = post(f"http://127.0.0.1:{port}/invocations",
                   {"dataframe_split": {"columns": ["prompt"], "data": [["def read(path):"]]},
                    "params": {"max_new_tokens": 6, "temperature": 0.0}})
    completion = out["predictions"][0]["completion"]
    assert isinstance(completion, str) and completion
    # greedy decoding: the served model says exactly what the same weights say locally
    assert completion == TextGenerator.load(tiny_gpt_dir).complete("def read(path):", 6, 0.0)
