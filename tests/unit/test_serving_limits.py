"""The check every served request passes before the predictor sees it (serving.check_request),
without a server: what it refuses and with which message, what it lets through, the limits
logged with a model, and the filter that refuses the params MLflow itself would drop."""

from __future__ import annotations

import base64
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_params_schema  # what the scoring server runs on params
from mlflow.types.schema import ParamSchema, ParamSpec

from bigmodel import config, serving
from bigmodel.errors import BigModelError
from bigmodel.tasks import clm, image_cls, seq2seq, seq_cls, token_cls
from bigmodel.tasks.image_cls import png_base64

LIMITS = config.Serving(max_rows=3, max_text_chars=20, max_new_tokens=16, max_beam_size=4,
                        max_image_bytes=2_000)
PNG = png_base64(np.arange(64, dtype=np.uint8).reshape(8, 8, 1))


def frame(task, *values) -> pd.DataFrame:  # noqa: ANN001
    return pd.DataFrame({task.SERVING_INPUT: list(values)})


def refused(task, model_input, params=None) -> str:  # noqa: ANN001
    """The message of the 400 a request gets (failing the test if it gets none)."""
    with pytest.raises(MlflowException) as e:
        serving.check_request(task, model_input, params, LIMITS)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert e.value.get_http_status_code() == 400
    assert "\n" not in e.value.message
    return e.value.message


def test_a_good_request_passes_with_the_params_defaults_filled_in_and_cut_to_the_limit():
    values, params = serving.check_request(clm, frame(clm, "def f():", "x" * 20), None, LIMITS)
    assert values == ["def f():", "x" * 20]  # max_text_chars itself is allowed
    # a GPT's own default (48) is over this model's limit: the default is the limit
    assert params == {**clm.GENERATE_DEFAULTS, "max_new_tokens": 16}
    _, params = serving.check_request(clm, ["a"], {"max_new_tokens": np.int64(16),
                                                   "temperature": 0, "top_p": 1}, LIMITS)
    assert params["max_new_tokens"] == 16 and type(params["max_new_tokens"]) is int
    assert params["temperature"] == 0.0 and type(params["temperature"]) is float
    values, params = serving.check_request(seq_cls, frame(seq_cls, "a", "b", "c"), None, LIMITS)
    assert values == ["a", "b", "c"] and params is None  # max_rows itself, and no params
    _, params = serving.check_request(seq2seq, frame(seq2seq, "a"), {"beam_size": 0}, LIMITS)
    assert params == {"beam_size": 0, "max_new_tokens": 0}  # 0: the model's own settings


TEXT_TASKS = [seq_cls, token_cls, clm, seq2seq]


@pytest.mark.parametrize("task", TEXT_TASKS, ids=serving.task_name)
@pytest.mark.parametrize("rows, expected", [
    ([3], "row 0: {col!r} must be a string, got the number 3"),
    ([None], "row 0: {col!r} must be a string, got null"),
    (["a", math.nan], "row 1: {col!r} must be a string, got null"),
    ([["a", "b"]], "row 0: {col!r} must be a string, got a list"),
    ([{"a": 1}], "row 0: {col!r} must be a string, got an object"),
    ([True], "row 0: {col!r} must be a string, got a boolean"),
    ([], "no rows: send 1 to 3 {col!r} values"),
    (list("abcd"), "4 rows: at most 3 a request (serving.max_rows); split the batch"),
    (["x" * 21], "row 0: {col!r} is 21 characters; at most 20 (serving.max_text_chars)"),
], ids=["number", "null", "nan", "nested-list", "object", "boolean", "empty", "too-many-rows",
        "too-long"])
def test_a_bad_row_is_a_400_naming_the_row_and_what_is_valid(task, rows, expected):  # noqa: ANN001
    col = task.SERVING_INPUT
    assert refused(task, pd.DataFrame({col: pd.Series(rows, dtype=object)})) == \
        expected.format(col=col)


@pytest.mark.parametrize("task", TEXT_TASKS, ids=serving.task_name)
def test_a_request_without_the_input_column_names_the_one_to_send(task):  # noqa: ANN001
    col = task.SERVING_INPUT
    assert refused(task, pd.DataFrame({"nope": ["a"]})) == (
        f"no {col!r} column (got: 'nope'); send "
        f'{{"dataframe_split": {{"columns": ["{col}"], "data": [[...], ...]}}}}')
    assert refused(task, 42) == f"expected a table with a {col!r} column, got the number 42"


def test_a_list_of_values_is_checked_like_a_column():
    assert serving.check_request(seq_cls, ["a"], None, LIMITS)[0] == ["a"]
    assert refused(seq_cls, np.array([["a", "b"]], dtype=object)) == \
        "row 0: 'text' must be a string, got a list"


@pytest.mark.parametrize("params, expected", [
    ({"max_new_tokens": 17}, "param max_new_tokens = 17: must be an integer from 1 to 16 "
                             "(serving.max_new_tokens)"),
    ({"max_new_tokens": 0}, "param max_new_tokens = 0: must be an integer from 1 to 16"),
    ({"max_new_tokens": 2.5}, "param max_new_tokens = 2.5: must be an integer"),
    ({"max_new_tokens": "lots"}, "param max_new_tokens = 'lots': must be an integer"),
    ({"max_new_tokens": True}, "param max_new_tokens = True: must be an integer"),
    ({"temperature": -0.1}, "param temperature = -0.1: must be a number >= 0 (0: greedy)"),
    ({"temperature": math.nan}, "param temperature = nan: must be a number >= 0"),
    ({"top_p": 0}, "param top_p = 0.0: must be a number in (0, 1] (1: no nucleus filter)"),
    ({"top_p": 1.5}, "param top_p = 1.5: must be a number in (0, 1]"),
    ({"top_k": -1}, "param top_k = -1: must be an integer >= 0 (0: no top-k filter)"),
    ({"temprature": 0}, "unknown param 'temprature'; this model takes: max_new_tokens, seed, "
                        "temperature, top_k, top_p"),
    ([1], "params must be a JSON object of name: value, got a list"),
], ids=["max-new-tokens-over", "max-new-tokens-zero", "float-for-int", "string", "boolean",
        "negative-temperature", "nan-temperature", "top-p-zero", "top-p-over-one", "top-k-negative",
        "unknown", "not-an-object"])
def test_a_gpt_param_out_of_range_is_a_400_naming_it_and_what_is_valid(params, expected):  # noqa: ANN001
    assert refused(clm, frame(clm, "def f():"), params).startswith(expected)


@pytest.mark.parametrize("task, params, expected", [
    (seq2seq, {"beam_size": 5}, "param beam_size = 5: must be an integer from 0 (the model's own) "
                                "to 4 (serving.max_beam_size)"),
    (seq2seq, {"max_new_tokens": -1}, "param max_new_tokens = -1: must be an integer from 0 "
                                      "(the model's own) to 16 (serving.max_new_tokens)"),
    (seq2seq, {"temperature": 0}, "unknown param 'temperature'; this model takes: beam_size, "
                                  "max_new_tokens"),
    (seq_cls, {"max_new_tokens": 5}, "unknown param 'max_new_tokens'; this model takes no params"),
    (token_cls, {"a": 1, "b": 2}, "unknown params 'a', 'b'; this model takes no params"),
], ids=["beam-over", "negative-length", "seq2seq-unknown", "classifier-any", "tagger-two"])
def test_other_tasks_params_are_checked_against_their_own(task, params, expected):  # noqa: ANN001
    assert refused(task, frame(task, "a"), params) == expected


@pytest.mark.parametrize("task", [clm, seq2seq, seq_cls, token_cls, image_cls],
                         ids=serving.task_name)
def test_every_param_a_task_serves_has_a_rule_and_its_default_passes_it(task):  # noqa: ANN001
    rules = serving.param_rules(task, LIMITS)
    assert set(rules) == set(getattr(task, "SERVING_PARAMS", {}))
    for name, (_, ok, _) in rules.items():
        assert ok(serving.served_defaults(task, LIMITS)[name]), name


def test_an_image_is_base64_of_a_readable_image_within_the_limits(monkeypatch):
    data_url = f"data:image/png;base64,{PNG}"
    values, _ = serving.check_request(image_cls, frame(image_cls, PNG, data_url), None, LIMITS)
    assert values[0] == PNG
    assert refused(image_cls, frame(image_cls, PNG, "not base64!")) == \
        "image 1: not base64 (send PNG / JPEG bytes, base64 encoded)"
    # base64 of text: what tests/integration/test_images.py sends the served ResNet
    assert refused(image_cls, frame(image_cls, "bm90IGFuIGltYWdl")) == \
        "image 0: not a readable image (12 bytes; PNG or JPEG expected)"
    assert refused(image_cls, frame(image_cls, 7)) == \
        "image 0: 'image' must be a base64 PNG / JPEG string, got the number 7"
    big = base64.b64encode(bytes(2_001)).decode()
    assert refused(image_cls, frame(image_cls, big)) == \
        "image 0: 2,001 bytes; at most 2,000 bytes (serving.max_image_bytes)"
    huge = base64.b64encode(bytes(30_000)).decode()  # refused before it is decoded
    assert refused(image_cls, frame(image_cls, huge)).startswith("image 0: about 30,000 bytes;")
    assert len(PNG) > 20  # images are not held to max_text_chars
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # an 8 × 8 image is now a "bomb"
    with pytest.warns(Image.DecompressionBombWarning):
        assert refused(image_cls, frame(image_cls, PNG)) == \
            "image 0: 8 × 8 pixels; at most 50 pixels"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # past twice the limit: Pillow refuses it
    assert refused(image_cls, frame(image_cls, PNG)).startswith(
        "image 0: Image size (64 pixels) exceeds limit of 40 pixels")


class Predictor:
    def __init__(self, error: Exception | None = None):
        self.calls, self.error = [], error

    def predict(self, values, params=None):  # noqa: ANN001, ANN201
        self.calls.append((values, params))
        if self.error:
            raise self.error
        return pd.DataFrame({"completion": ["x"] * len(values)})


def pyfunc(task, predictor: Predictor) -> serving.BigmodelPyfunc:  # noqa: ANN001
    model = serving.BigmodelPyfunc()
    model.task, model.limits, model.predictor = task, LIMITS, predictor
    return model


def test_the_pyfunc_checks_before_the_predictor_and_answers_its_user_errors_400():
    good = Predictor()
    out = pyfunc(clm, good).predict(None, frame(clm, "a"), {"max_new_tokens": 3})
    assert out["completion"].tolist() == ["x"]
    assert good.calls == [(["a"], {**clm.GENERATE_DEFAULTS, "max_new_tokens": 3})]
    with pytest.raises(MlflowException, match="at most 3 a request"):
        pyfunc(clm, good).predict(None, frame(clm, *"abcd"), None)
    assert len(good.calls) == 1  # the bad request never reached the model
    failing = Predictor(BigModelError("image 0: not a readable image (9 bytes)"))
    with pytest.raises(MlflowException) as e:
        pyfunc(image_cls, failing).predict(None, frame(image_cls, PNG), None)
    assert e.value.get_http_status_code() == 400
    assert e.value.message == "image 0: not a readable image (9 bytes)"
    with pytest.raises(ZeroDivisionError):  # a bug stays a bug, not a "bad request"
        pyfunc(clm, Predictor(ZeroDivisionError())).predict(None, frame(clm, "a"), None)


@pytest.fixture
def refusing():  # noqa: ANN201
    logger = logging.getLogger(serving.MLFLOW_PARAMS_LOGGER)
    before = list(logger.filters)
    serving.refuse_dropped_params()
    serving.refuse_dropped_params()  # once a process, however many models load
    assert sum(isinstance(f, serving.RefuseDroppedParams) for f in logger.filters) == 1
    yield
    logger.filters[:] = before


def test_params_mlflow_would_drop_are_refused_naming_them(refusing):  # noqa: ANN001
    """MLflow's own params check (what the scoring server runs before the model) drops unknown
    params with a warning; the filter makes that warning the 400."""
    schema = ParamSchema([ParamSpec("max_new_tokens", "long", 48), ParamSpec("seed", "long", -1)])
    assert _enforce_params_schema({"seed": 3}, schema) == {"max_new_tokens": 48, "seed": 3}
    assert _enforce_params_schema(None, None) is None  # no params for a model without any
    with pytest.raises(MlflowException) as e:
        _enforce_params_schema({"seed": 3, "temprature": 0}, schema)
    assert e.value.get_http_status_code() == 400
    assert e.value.message == "unknown param 'temprature'; this model takes: max_new_tokens, seed"
    with pytest.raises(MlflowException, match="unknown param 'top_k'; this model takes no params"):
        _enforce_params_schema({"top_k": 3}, None)
    with pytest.raises(MlflowException, match="params must be a JSON object"):
        _enforce_params_schema([1], None)
    logging.getLogger(serving.MLFLOW_PARAMS_LOGGER).warning("something else")  # passes


def test_limits_travel_with_the_logged_model_as_serving_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"family": "gpt", "task": "clm", "arch": {}}))
    logged = {}

    class Run:
        def log_pyfunc(self, entry, artifacts, name, example):  # noqa: ANN001, ANN202
            logged.update(artifacts=artifacts, example=example,
                          limits=json.loads(Path(artifacts["serving"]).read_text()))
            return "1"

    assert serving.log_model(Run(), tmp_path, "m", limits=LIMITS) == "1"
    assert logged["artifacts"]["model_dir"] == str(tmp_path)
    assert logged["limits"] == LIMITS.model_dump()
    assert serving.read_limits(None) == config.Serving()  # a model logged before serving.json
    # the example's params are the served defaults MLflow fills in: within the limits
    assert logged["example"][1]["max_new_tokens"] == 16
    serving.log_model(Run(), tmp_path, "m")
    assert logged["limits"] == config.Serving().model_dump() == {
        "max_rows": 64, "max_text_chars": 4000, "max_new_tokens": 256, "max_beam_size": 8,
        "max_image_bytes": 1_000_000}


def test_limits_are_validated_like_the_rest_of_the_params(tmp_path):
    path = tmp_path / "serving.json"
    path.write_text(json.dumps({**LIMITS.model_dump(), "max_rows": 7}))
    assert serving.read_limits(path).max_rows == 7
    path.write_text(json.dumps({"max_rows": 0}))
    with pytest.raises(BigModelError, match=r"serving.json: serving.max_rows = 0: Input should be "
                                            r"greater than or equal to 1$"):
        serving.read_limits(path)
    params = tmp_path / "params.yaml"
    params.write_text("serving:\n  max_new_tokens: -5\n")
    with pytest.raises(BigModelError, match="serving.max_new_tokens = -5: Input should be greater"):
        config.load(params)
    params.write_text("serving:\n  max_row: 5\n")
    with pytest.raises(BigModelError, match="unknown key 'serving.max_row' .*max_rows"):
        config.load(params)
