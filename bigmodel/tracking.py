"""Everything MLflow: the only module that imports it (besides `pyfunc_entry.py`, the script
MLflow runs to rebuild the logged classifier).

A stage is one MLflow run, nested under the pipeline's parent run when the environment names one
(`BIGMODEL_PARENT_RUN_ID`, set by the Prefect flow). The default store is a SQLite file at an
absolute path in the project folder, with artifacts beside it. `tracking.uri` in params.yaml, or
the `BIGMODEL_TRACKING_URI` environment variable, points it elsewhere (a tracking server, say).
`MLFLOW_TRACKING_URI` is deliberately not read: `mlflow.set_tracking_uri` writes it into the
environment of the calling process, so it would leak one project's store into the next.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bigmodel.config import Params
from bigmodel.errors import TransientError

PARENT_ENV = "BIGMODEL_PARENT_RUN_ID"
FLOW_RUN_ENV = "BIGMODEL_FLOW_RUN_ID"
URI_ENV = "BIGMODEL_TRACKING_URI"


def tracking_uri(params: Params) -> str:
    return (os.environ.get(URI_ENV) or params.tracking.uri
            or f"sqlite:///{(params.root / 'mlflow.db').resolve()}")


def configure(params: Params) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:"):  # keep artifacts beside the db, not in the cwd
                location = (params.root / "mlartifacts").resolve().as_uri()
            exp_id = mlflow.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
    except MlflowException as e:
        if "connect" in str(e).lower() or "max retries" in str(e).lower():
            raise TransientError(f"MLflow tracking server at {uri} did not answer: {e}") from None
        raise
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def lineage_tags(params: Params, stage: str, sections: list[str]) -> dict[str, str]:
    tags = {
        "bigmodel.stage": stage,
        "bigmodel.params_hash": params.section_hash(*sections) if sections else "",
        "bigmodel.prefect_flow_run_id": os.environ.get(FLOW_RUN_ENV, ""),
    }
    commit = git_commit(params.root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


@dataclass
class StageRun:
    """Handle given to a stage: log metrics and artifacts into its run."""

    run_id: str

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=subdir)
        else:
            mlflow.log_artifact(str(path), artifact_path=subdir)

    def tags(self, values: dict[str, str]) -> None:
        mlflow.set_tags(values)

    def log_classifier(self, model_dir: Path, registered_name: str, example: list[str]) -> str:
        """Log the finetuned classifier as a pyfunc (text in, label + probabilities out),
        register it, and return the new registry version."""
        import bigmodel  # the package travels with the model, so serving needs no install

        import safetensors
        import tokenizers
        import torch

        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(Path(bigmodel.__file__).parent)],
            input_example=pd.DataFrame({"text": example}),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"tokenizers=={tokenizers.__version__}",
                f"safetensors=={safetensors.__version__}",
                f"pandas=={pd.__version__}",
                f"pydantic=={_version('pydantic')}",
                f"pyyaml=={_version('pyyaml')}",
            ],
            registered_model_name=registered_name,
        )
        return str(info.registered_model_version)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


@contextmanager
def stage_run(stage: str, params: Params, sections: list[str]) -> Iterator[StageRun]:
    """One MLflow run for one stage, nested under the pipeline run when there is one."""
    configure(params)
    parent = os.environ.get(PARENT_ENV) or None
    dumped = params.model_dump(mode="json")
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=mlflow.active_run() is not None,
        tags=lineage_tags(params, stage, sections),
    ) as run:
        mlflow.log_params(flatten({s: dumped[s] for s in sections}))
        yield StageRun(run.info.run_id)


@contextmanager
def pipeline_run(params: Params, name: str, tags: dict[str, str]) -> Iterator[str]:
    """The parent run of one pipeline execution; stage processes find it via the environment."""
    configure(params)
    with mlflow.start_run(run_name=name, tags={**lineage_tags(params, "pipeline", []), **tags}) as run:
        old = os.environ.get(PARENT_ENV)
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if old is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = old


def log_to_run(run_id: str, path: Path, metrics: dict[str, float] | None = None) -> None:
    client = MlflowClient()
    client.log_artifact(run_id, str(path))
    for k, v in (metrics or {}).items():
        client.log_metric(run_id, k, float(v))


def child_runs(params: Params, parent_run_id: str) -> list[dict[str, Any]]:
    """Stage runs nested under a pipeline run: name, id, status and latest metrics."""
    exp_id = configure(params)
    runs = MlflowClient().search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return [
        {
            "stage": r.data.tags.get("bigmodel.stage", r.info.run_name),
            "run_id": r.info.run_id,
            "experiment_id": exp_id,
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]


def run_link(params: Params, experiment_id: str, run_id: str) -> str:
    uri = tracking_uri(params)
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: a DataFrame with a `text` column (or a list of strings) in; a DataFrame
    with `label` and one `p_<class>` column per class out."""

    # predict and load_context carry no type hints: MLflow would read them as a schema.
    def load_context(self, context):  # noqa: ANN001
        from bigmodel.predict import TextClassifier

        self.clf = TextClassifier.load(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text" if "text" in model_input else model_input.columns[0]]
        else:
            texts = model_input
        texts = [str(t) for t in texts]
        probs = self.clf.predict_proba(texts)
        out = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.clf.labels])
        out.insert(0, "label", [self.clf.labels[i] for i in probs.argmax(1)])
        return out
