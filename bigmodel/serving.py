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
  last word, text) out.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import mlflow
import pandas as pd

from bigmodel import tracking
from bigmodel.models import registry

ENTRY = Path(__file__).with_name("pyfunc_entry.py")


def task_module(model_dir: Path) -> ModuleType:
    return importlib.import_module(f"bigmodel.tasks.{registry.read_config(model_dir)['task']}")


def log_model(mlrun: tracking.StageRun, model_dir: Path, registered_name: str,
              example: list[str] | None = None) -> str:
    """Log a model folder as the pyfunc below and register it; returns the new version."""
    task = task_module(model_dir)
    if hasattr(task, "SERVING_EXAMPLE"):
        input_example = task.SERVING_EXAMPLE
    else:
        input_example = pd.DataFrame({task.SERVING_INPUT: example or ["def read(path):"]})
    return mlrun.log_pyfunc(ENTRY, {"model_dir": str(model_dir)}, registered_name, input_example)


class BigmodelPyfunc(mlflow.pyfunc.PythonModel):
    # predict carries no type hints: MLflow would read them as a schema, and the input differs
    # by task (MLflow warns about it once, when this class is defined)
    def load_context(self, context):  # noqa: ANN001
        model_dir = Path(context.artifacts["model_dir"])
        self.task = task_module(model_dir)
        self.predictor = self.task.load(model_dir)

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        if isinstance(model_input, pd.DataFrame):
            names = (self.task.SERVING_INPUT, "text")
            column = next((c for c in names if c in model_input), model_input.columns[0])
            texts = model_input[column]
        else:
            texts = model_input
        texts = [str(t) for t in texts]
        if params is not None and hasattr(self.task, "SERVING_PARAMS"):
            return self.predictor.predict(texts, params)
        return self.predictor.predict(texts)
