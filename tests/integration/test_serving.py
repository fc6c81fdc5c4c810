"""`mlflow models serve` on the registered models, over HTTP, each by its `champion` alias: a BERT
classifier (text in → label and probabilities out), a BERT tagger (text in → words, tags and
entity spans out), the GPT (prompt in → completion out) and a seq2seq model (source in → output
out, beam size and length as request params)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from bigmodel import config, serving, tracking
from bigmodel.tasks.clm import TextGenerator
from bigmodel.tasks.seq2seq import Translator
from bigmodel.tasks.token_cls import Tagger
from tests.conftest import stage_env
from tests.servers import free_port, running

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture
def registered(tmp_path, monkeypatch, tiny_bert_classifier_dir, tiny_tagger_dir,  # noqa: ANN001, ANN201
               tiny_gpt_dir, tiny_seq2seq_dir):
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    p = config.validate({"tracking": {"experiment": "serve"}})
    p._root = tmp_path
    for stage, folder, name in (("finetune@bert-cls", tiny_bert_classifier_dir, "serve-clf"),
                                ("finetune@bert-tag", tiny_tagger_dir, "serve-tagger"),
                                ("pretrain@gpt", tiny_gpt_dir, "serve-gpt"),
                                ("pretrain@seq2seq", tiny_seq2seq_dir, "serve-s2s")):
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
def test_served_champion_classifier_tagger_gpt_and_seq2seq_answer_over_http(  # noqa: ANN001
        registered, tmp_path, tiny_gpt_dir, tiny_tagger_dir, tiny_seq2seq_dir):
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

    port, server = serve("models:/serve-s2s@champion", registered, tmp_path / "s2s")
    sources = [["def add(a, b): return a + b"], ["def read(path): return open(path).read()"]]
    with server:
        plain = post(f"http://127.0.0.1:{port}/invocations",
                     {"dataframe_split": {"columns": ["source"], "data": sources}})
        greedy = post(f"http://127.0.0.1:{port}/invocations",
                      {"dataframe_split": {"columns": ["source"], "data": sources},
                       "params": {"beam_size": 1, "max_new_tokens": 3}})
    local = Translator(tiny_seq2seq_dir)
    texts = [row[0] for row in sources]
    # the model's own decoding (beam 3, 0.5 × source + 4 tokens), then request params
    assert [r["output"] for r in plain["predictions"]] == local.translate(texts)
    assert [r["output"] for r in greedy["predictions"]] == local.translate(texts, 1, 3)
