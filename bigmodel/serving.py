"""The MLflow pyfunc every registered model is served through: it loads a model folder, reads
the task from its config.json, and answers with that task's predictor (bigmodel/tasks/<task>.py):

- `clm` (a GPT): a `prompt` column in → `completion` out; params max_new_tokens, temperature
  (0: greedy), top_k, top_p, seed;
- `seq2seq` (an encoder-decoder): a `source` column in → `output` out; params beam_size and
  max_new_tokens (0: the model's own settings);
- `seq_cls`: a `text` column (or a list of strings) in → `label` and one `p_<class>` column
  per class out;
- `token_cls`: a `text` column in (split into words at spaces and punctuation: a run of letters,
  digits and `_`, or one other character) → `tokens`, `tags` and `entities` (type, first and
  last word, text) out;
- `image_cls`: an `image` column of base64 PNG / JPEG in → `label` and `p_<class>` out.

Every request is checked here (`check_request`) before the predictor sees it, against the
limits logged with the model (serving.json, params.yaml's `serving` section when it was
logged): rows, characters a text, bytes an image, and each param's type and range. A request
that fails is an `MlflowException` with error code INVALID_PARAMETER_VALUE, which MLflow's
scoring server answers as HTTP 400 with a JSON body `{"error_code": ..., "message": ...}`
(mlflow/pyfunc/scoring_server: `invocations` re-raises an MlflowException, its handler answers
`e.get_http_status_code()`); the message names the row or param and what is valid. A bad request
thus never reaches torch, and the server goes on answering.
"""

from __future__ import annotations

import ast
import base64
import binascii
import importlib
import io
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from bigmodel import config, tracking
from bigmodel.errors import BigModelError
from bigmodel.models import registry

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
LIMITS_FILE = "serving.json"  # the logged model's artifact `serving`: its config.Serving


def task_module(model_dir: Path) -> ModuleType:
    return importlib.import_module(f"bigmodel.tasks.{registry.read_config(model_dir)['task']}")


def task_name(task: ModuleType) -> str:
    return task.__name__.rsplit(".", 1)[-1]


def log_model(mlrun: tracking.StageRun, model_dir: Path, registered_name: str,
              example: list[str] | None = None, limits: config.Serving | None = None) -> str:
    """Log a model folder as the pyfunc below and register it; returns the new version. The
    request limits (`params.serving`; none given: the schema's defaults) travel with it as
    serving.json, so the served model enforces them without the params file."""
    task = task_module(model_dir)
    limits = limits or config.Serving()
    if hasattr(task, "SERVING_EXAMPLE"):
        input_example = task.SERVING_EXAMPLE
        if isinstance(input_example, tuple):  # (frame, params): MLflow's params schema and the
            # defaults it fills in for a param a request leaves out, so they must be in range
            input_example = (input_example[0], served_defaults(task, limits))
    else:
        input_example = pd.DataFrame({task.SERVING_INPUT: example or ["def read(path):"]})
    with tempfile.TemporaryDirectory() as d:  # MLflow copies it into the logged model
        limits_file = Path(d) / LIMITS_FILE
        limits_file.write_text(json.dumps(limits.model_dump(), indent=2) + "\n")
        return mlrun.log_pyfunc(ENTRY, {"model_dir": str(model_dir), "serving": str(limits_file)},
                                registered_name, input_example)


def read_limits(path: Path | None) -> config.Serving:
    """A logged model's limits; a model logged before they were (no serving.json): defaults."""
    if path is None:
        return config.Serving()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BigModelError(f"{path}: not readable serving limits ({e})") from None
    return config.validate({"serving": raw}, source=str(path)).serving


# --- the request check ------------------------------------------------------------------------

def invalid(message: str) -> MlflowException:
    """The error a bad request raises: the scoring server answers it HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# A param's rule: its type (int or float), the test of its value, and what is valid (for the
# error); a bool is neither an int nor a number here, though Python says it is.
Rule = tuple[type, Callable[[Any], bool], str]


def param_rules(task: ModuleType, limits: config.Serving) -> dict[str, Rule]:
    """The params a task's requests may set (its SERVING_PARAMS), each with its rule."""
    top = limits.max_new_tokens
    if task_name(task) == "clm":
        return {
            "max_new_tokens": (int, lambda v: 1 <= v <= top,
                               f"an integer from 1 to {top} (serving.max_new_tokens)"),
            "temperature": (float, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
            "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0: no top-k filter)"),
            "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1: no nucleus filter)"),
            "seed": (int, lambda v: True, "an integer (< 0: a fresh random seed)"),
        }
    if task_name(task) == "seq2seq":
        beam = limits.max_beam_size
        return {
            "beam_size": (int, lambda v: 0 <= v <= beam,
                          f"an integer from 0 (the model's own) to {beam} (serving.max_beam_size)"),
            "max_new_tokens": (int, lambda v: 0 <= v <= top,
                               f"an integer from 0 (the model's own) to {top} "
                               f"(serving.max_new_tokens)"),
        }
    return {}


def served_defaults(task: ModuleType, limits: config.Serving) -> dict[str, Any]:
    """The params a request that sets none gets: the task's defaults, max_new_tokens cut to
    the limit (a GPT's default of 48 would otherwise refuse every request under a limit of 16)."""
    out = dict(getattr(task, "SERVING_PARAMS", {}))
    if "max_new_tokens" in out:
        out["max_new_tokens"] = min(out["max_new_tokens"], limits.max_new_tokens)
    return out


def check_request(task: ModuleType, model_input: Any, params: Any, limits: config.Serving
                  ) -> tuple[list[str], dict[str, Any] | None]:
    """The request's values (texts, or base64 images) and its params with the defaults filled
    in (None for a task without params), or the first problem as an `invalid` error."""
    values = input_values(task, model_input)
    what = f"{task.SERVING_INPUT!r} values"
    if not values:
        raise invalid(f"no rows: send 1 to {limits.max_rows} {what}")
    if len(values) > limits.max_rows:
        raise invalid(f"{len(values)} rows: at most {limits.max_rows} a request "
                      f"(serving.max_rows); split the batch")
    check_value = check_image if task_name(task) == "image_cls" else check_text
    for i, value in enumerate(values):
        check_value(i, value, task.SERVING_INPUT, limits)
    return values, check_params(task, params, limits)


def input_values(task: ModuleType, model_input: Any) -> list[Any]:
    """The input column's values as they came (not yet known to be strings)."""
    name = task.SERVING_INPUT
    if isinstance(model_input, pd.DataFrame):
        if name not in model_input.columns:
            got = ", ".join(repr(str(c)) for c in model_input.columns) or "none"
            raise invalid(f"no {name!r} column (got: {got}); send "
                          f'{{"dataframe_split": {{"columns": ["{name}"], "data": [[...], ...]}}}}')
        column = model_input[name]
        if isinstance(column, pd.DataFrame):
            raise invalid(f"the {name!r} column is given {column.shape[1]} times; send it once")
        return column.tolist()
    if isinstance(model_input, dict) and name in model_input:
        model_input = model_input[name]
    if isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        return list(model_input)
    raise invalid(f"expected a table with a {name!r} column, got {describe(model_input)}")


def check_text(i: int, value: Any, name: str, limits: config.Serving) -> None:
    if not isinstance(value, str):
        raise invalid(f"row {i}: {name!r} must be a string, got {describe(value)}")
    if len(value) > limits.max_text_chars:
        raise invalid(f"row {i}: {name!r} is {len(value):,} characters; at most "
                      f"{limits.max_text_chars:,} (serving.max_text_chars)")


def check_image(i: int, value: Any, name: str, limits: config.Serving) -> None:
    """A base64 PNG / JPEG (a data: URL too) within the size limit, whose header Pillow reads.
    The pixels are decoded once, by the predictor; a file cut short past its header is its
    error (a BigModelError, answered 400 as well)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise invalid(f"image {i}: {name!r} must be a base64 PNG / JPEG string, got "
                      f"{describe(value)}")
    text = value.split(",", 1)[-1]
    too_big = f"at most {limits.max_image_bytes:,} bytes (serving.max_image_bytes)"
    if len(text) // 4 * 3 > limits.max_image_bytes + 3:  # before decoding it
        raise invalid(f"image {i}: about {len(text) // 4 * 3:,} bytes; {too_big}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"image {i}: not base64 (send PNG / JPEG bytes, base64 encoded)") from None
    if len(data) > limits.max_image_bytes:
        raise invalid(f"image {i}: {len(data):,} bytes; {too_big}")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header, not the pixels
            width, height = img.size
    except Image.DecompressionBombError as e:  # pixels past twice Pillow's limit
        raise invalid(f"image {i}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise invalid(f"image {i}: not a readable image ({len(data)} bytes; PNG or JPEG "
                      f"expected)") from None
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        # a small file can unpack to gigabytes of pixels (a decompression bomb)
        raise invalid(f"image {i}: {width} × {height} pixels; at most "
                      f"{Image.MAX_IMAGE_PIXELS:,} pixels")


def check_params(task: ModuleType, params: Any, limits: config.Serving) -> dict[str, Any] | None:
    rules = param_rules(task, limits)
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise invalid(f"params must be a JSON object of name: value, got {describe(params)}")
    unknown = [k for k in params if k not in rules]
    if unknown:
        raise unknown_params(unknown, list(rules))
    out = {**served_defaults(task, limits), **params}
    for name, (kind, ok, valid) in rules.items():
        value = out[name]
        if isinstance(value, (bool, np.bool_)) or not isinstance(
                value, (int, np.integer) if kind is int else (int, float, np.integer, np.floating)):
            raise invalid(f"param {name} = {value!r}: must be {valid}")
        value = kind(value)
        if not ok(value):  # NaN fails every test
            raise invalid(f"param {name} = {value!r}: must be {valid}")
        out[name] = value
    return out if rules else None


def unknown_params(names: list[str], allowed: list[str]) -> MlflowException:
    takes = f"this model takes: {', '.join(sorted(allowed))}" if allowed else \
        "this model takes no params"
    return invalid(f"unknown param{'s' * (len(names) > 1)} {', '.join(map(repr, names))}; {takes}")


def describe(value: Any) -> str:
    """A request value's JSON kind, for an error."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, (int, float, np.number)):
        return f"the number {value}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- params MLflow drops before the model sees them --------------------------------------------

# MLflow 3.17 (mlflow.models.utils._enforce_params_schema) drops a request param the model's
# signature does not declare, all of them when it declares none, with a warning on this logger,
# before it calls the model: `{"max_new_tokens": 6, "temprature": 0}` would be answered with the
# default temperature and a log line nobody reads. The filter below turns those warnings into
# the 400 above; a filter's exception propagates out of the logging call, so it is raised on the
# request's own thread, inside MLflow's predict, and answered like any other bad request.
MLFLOW_PARAMS_LOGGER = "mlflow.models.utils"
DROPPED = re.compile(r"Unrecognized params (\[.*?\]) are ignored for inference\. "
                     r"Supported params are: (\{.*?\})")
ALL_DROPPED = re.compile(r"does not define a params schema\. Ignoring (?:provided params: "
                         r"(\[.*?\])|invalid params)")


class RefuseDroppedParams(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if m := DROPPED.search(message):
            raise unknown_params(ast.literal_eval(m[1]), list(ast.literal_eval(m[2])))
        if m := ALL_DROPPED.search(message):
            if m[1] is None:
                raise invalid("params must be a JSON object of name: value; this model takes "
                              "no params")
            raise unknown_params(ast.literal_eval(m[1]), [])
        return True


def refuse_dropped_params() -> None:
    """Install the filter on MLflow's logger, once a process (it applies to every pyfunc the
    process loads: a dropped param is a client's mistake whichever model it was sent to). Under
    a logging level above WARNING the warning, and so the refusal, is skipped."""
    logger = logging.getLogger(MLFLOW_PARAMS_LOGGER)
    if not any(isinstance(f, RefuseDroppedParams) for f in logger.filters):
        logger.addFilter(RefuseDroppedParams())


class BigmodelPyfunc(mlflow.pyfunc.PythonModel):
    # predict carries no type hints: MLflow would read them as a schema, and the input differs
    # by task (MLflow warns about it once, when this class is defined)
    def load_context(self, context):  # noqa: ANN001
        model_dir = Path(context.artifacts["model_dir"])
        self.task = task_module(model_dir)
        limits = context.artifacts.get("serving")
        self.limits = read_limits(Path(limits) if limits else None)
        self.predictor = self.task.load(model_dir)
        refuse_dropped_params()

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        values, params = check_request(self.task, model_input, params, self.limits)
        try:
            if params is not None:
                return self.predictor.predict(values, params)
            return self.predictor.predict(values)
        except BigModelError as e:  # a mistake in the request the check above cannot see
            raise invalid(str(e)) from None
