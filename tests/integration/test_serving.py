"""`mlflow models serve` on the registered models, over HTTP, each by its `champion` alias: a BERT
classifier (text in → label and probabilities out), a BERT tagger (text in → words, tags and
entity spans out), the GPT (prompt in → completion out) and a seq2seq model (source in → output
out, beam size and length as request params). The four servers start once for the module; bad
requests (wrong columns, types, sizes, params) must be HTTP 4xx with MLflow's JSON error body
naming the problem, and the same server must answer a good request next."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from bigmodel import config, serving, tracking
from bigmodel.tasks.clm import TextGenerator
from bigmodel.tasks.seq2seq import Translator
from bigmodel.tasks.seq_cls import TextClassifier
from bigmodel.tasks.token_cls import Tagger
from bigmodel.text.tokenizers import train_bpe, train_wordpiece
from tests.conftest import save_tiny_model, stage_env
from tests.servers import free_port, running

MLFLOW = str(Path(sys.executable).parent / "mlflow")
# Under the defaults (64 rows, 4,000 characters, 256 tokens): a 400 at 5 rows, 301 characters
# or 17 tokens shows the server enforces the limits logged with the model (its serving.json).
LIMITS = config.Serving(max_rows=4, max_text_chars=300, max_new_tokens=16)
CORPUS = [f"{t}\n# variant {i}\n" for i in range(30) for t in (
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "Open the file, read every line and close it again.",
    "import asyncio\nasync def main():\n    await asyncio.sleep(1)\n")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    """tests/conftest.py's tiny models (random weights), built once for the module's servers
    (its fixtures are built per test)."""
    bpe = train_bpe(iter(CORPUS), vocab_size=300, min_frequency=1)
    wordpiece = train_wordpiece(iter(CORPUS), vocab_size=300, min_frequency=1)
    root = tmp_path_factory.mktemp("models")
    return {
        "clf": sharpened(save_tiny_model(root / "clf", wordpiece, "bert", "seq_cls",
                                         ["asyncio", "files", "gui"], pooling="cls")),
        "tagger": save_tiny_model(root / "tagger", wordpiece, "bert", "token_cls",
                                  ["O", "B-FUNC", "I-FUNC", "B-PARAM", "I-PARAM"]),
        "gpt": save_tiny_model(root / "gpt", bpe),
        "s2s": save_tiny_model(root / "s2s", bpe, "seq2seq", "seq2seq"),
    }


def sharpened(model_dir: Path) -> Path:
    """Every weight matrix 15× its initial size: at init a classifier answers every text with
    about its prior (probabilities 1e-4 apart), so served rows swapped or mixed up would still
    match the local model's; sharpened, two texts' answers differ by several hundredths."""
    from safetensors.torch import load_file, save_file

    file = model_dir / "model.safetensors"
    save_file({k: v * 15 if v.dim() == 2 else v for k, v in load_file(file).items()}, file)
    return model_dir


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):  # noqa: ANN001, ANN201
    """Each model registered as serve-<name> with LIMITS, aliased champion, and served by alias
    for the whole module: name → its /invocations URL."""
    root = tmp_path_factory.mktemp("serve")
    stages = {"clf": "finetune@bert-cls", "tagger": "finetune@bert-tag", "gpt": "pretrain@gpt",
              "s2s": "pretrain@seq2seq"}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(tracking.PARENT_ENV, raising=False)
        mp.delenv(tracking.URI_ENV, raising=False)
        p = config.validate({"tracking": {"experiment": "serve"}})
        p._root = root
        for name, stage in stages.items():
            with tracking.stage_run(stage, p, []) as run:
                version = serving.log_model(run, model_dirs[name], f"serve-{name}",
                                            example=["read a file"], limits=LIMITS)
            tracking.set_alias(p, f"serve-{name}", "champion", version, {})
        store = tracking.tracking_uri(p)
    with ExitStack() as servers:
        urls = {}
        for name in stages:
            port, server = serve(f"models:/serve-{name}@champion", store, root / name)
            servers.enter_context(server)
            urls[name] = f"http://127.0.0.1:{port}/invocations"
        yield urls


def answer(url: str, body: dict | bytes) -> tuple[int, dict]:
    """The HTTP status and the JSON body, whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: dict) -> dict:
    """The JSON answer; an HTTPError for anything but 2xx (tests/integration/test_images.py
    reads the error body from it)."""
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


def rows(column: str, *values: object) -> dict:
    return {"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}


@pytest.mark.slow
def test_served_champion_classifier_tagger_gpt_and_seq2seq_answer_over_http(served, model_dirs):  # noqa: ANN001
    texts = ["open the file", "a button on a window"]
    out = post(served["clf"], rows("text", *texts))
    served_rows = out["predictions"]
    # the served classifier says exactly what the same weights say locally, text by text
    local = TextClassifier.load(model_dirs["clf"]).predict(texts)
    assert [r["label"] for r in served_rows] == local["label"].tolist()
    for row, (_, want) in zip(served_rows, local.iterrows()):
        assert set(row) == {"label", "p_asyncio", "p_files", "p_gui"}
        assert row == pytest.approx(want.to_dict(), abs=1e-5)
    probs = local[["p_asyncio", "p_files", "p_gui"]].to_numpy()
    # the texts' answers differ by far more than the tolerance above, so a mix-up would show
    assert abs(probs[0] - probs[1]).max() > 10 * 1e-5

    out = post(served["tagger"], rows("text", "def read(path): pass"))
    [row] = out["predictions"]
    assert row["tokens"] == ["def", "read", "(", "path", ")", ":", "pass"]
    # the served tagger says exactly what the same weights say locally
    assert row["tags"] == Tagger.load(model_dirs["tagger"]).tag([row["tokens"]])[0]
    assert all(e["text"] == " ".join(row["tokens"][e["start"]: e["end"] + 1])
               for e in row["entities"])

    out = post(served["gpt"], {**rows("prompt", "def read(path):"),
                               "params": {"max_new_tokens": 6, "temperature": 0.0}})
    completion = out["predictions"][0]["completion"]
    assert isinstance(completion, str) and completion
    # greedy decoding: the served model says exactly what the same weights say locally
    assert completion == TextGenerator.load(model_dirs["gpt"]).complete("def read(path):", 6, 0.0)

    sources = ["def add(a, b): return a + b", "def read(path): return open(path).read()"]
    plain = post(served["s2s"], rows("source", *sources))
    greedy = post(served["s2s"], {**rows("source", *sources),
                                  "params": {"beam_size": 1, "max_new_tokens": 3}})
    local = Translator(model_dirs["s2s"])
    # the model's own decoding (beam 3, 0.5 × source + 4 tokens), then request params
    assert [r["output"] for r in plain["predictions"]] == local.translate(sources)
    assert [r["output"] for r in greedy["predictions"]] == local.translate(sources, 1, 3)


GOOD = {"clf": rows("text", "open the file"), "tagger": rows("text", "def f(x): pass"),
        "gpt": {**rows("prompt", "def f():"), "params": {"max_new_tokens": 2}},
        "s2s": {**rows("source", "def f(): pass"), "params": {"max_new_tokens": 2}}}
PROMPT = rows("prompt", "def f():")


@pytest.mark.slow
@pytest.mark.parametrize("model, body, says", [
    ("clf", rows("txt", "open the file"), "Model is missing inputs ['text']"),  # MLflow's check
    ("clf", rows("text", 3), "row 0: 'text' must be a string, got the number 3"),
    ("clf", rows("text", "ok", None), "row 1: 'text' must be a string, got null"),
    ("tagger", rows("text", ["def", "f"]), "row 0: 'text' must be a string, got a list"),
    ("clf", rows("text"), "no rows: send 1 to 4 'text' values"),
    ("clf", rows("text", *"abcde"), "5 rows: at most 4 a request (serving.max_rows)"),
    ("tagger", rows("text", "x" * 301), "row 0: 'text' is 301 characters; at most 300 "
                                         "(serving.max_text_chars)"),
    ("clf", {**rows("text", "a"), "params": {"top_k": 3}},
     "unknown param 'top_k'; this model takes no params"),
    ("gpt", {**PROMPT, "params": {"max_new_tokens": 17}},
     "param max_new_tokens = 17: must be an integer from 1 to 16 (serving.max_new_tokens)"),
    ("gpt", {**PROMPT, "params": {"max_new_tokens": 0}},
     "param max_new_tokens = 0: must be an integer from 1 to 16"),
    ("gpt", {**PROMPT, "params": {"max_new_tokens": "lots"}},  # MLflow's own type check
     "Can not safely convert `<class 'str'>` to `DataType.long`"),
    ("gpt", {**PROMPT, "params": {"temperature": -1}},
     "param temperature = -1.0: must be a number >= 0 (0: greedy)"),
    ("gpt", {**PROMPT, "params": {"top_p": 0}}, "param top_p = 0.0: must be a number in (0, 1]"),
    ("gpt", {**PROMPT, "params": {"top_p": 1.5}}, "param top_p = 1.5: must be a number in (0, 1]"),
    ("gpt", {**PROMPT, "params": {"temprature": 0}},  # MLflow alone would drop it, answer 200
     "unknown param 'temprature'; this model takes: max_new_tokens, seed, temperature, top_k, "
     "top_p"),
    ("s2s", {**rows("source", "def f(): pass"), "params": {"beam_size": 9}},
     "param beam_size = 9: must be an integer from 0 (the model's own) to 8 "
     "(serving.max_beam_size)"),
    ("gpt", b'{"dataframe_split": {"columns": ["prompt"], "data": [["a"]]', "valid JSON"),
], ids=["missing-column", "number", "null", "nested-list", "empty", "too-many-rows", "too-long",
        "classifier-param", "max-new-tokens-over", "max-new-tokens-zero", "param-type",
        "negative-temperature", "top-p-zero", "top-p-over-one", "unknown-param", "beam-over",
        "not-json"])
def test_a_bad_request_is_a_400_naming_the_problem_and_the_server_answers_on(  # noqa: ANN001
        served, model, body, says):
    status, out = answer(served[model], body)
    assert 400 <= status < 500, out
    assert says in out["message"], out["message"]
    assert out["error_code"] in {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
    status, out = answer(served[model], GOOD[model])
    assert status == 200 and len(out["predictions"]) == 1, out
