"""Everything MLflow tracks: runs, params, metrics, artifacts, the registry. It imports no model
or task code (the served pyfunc lives in `serving.py`, above the domain).

A stage is one MLflow run, nested under the pipeline's parent run when the environment names one
(`BIGMODEL_PARENT_RUN_ID`, set by the Prefect flow). The default store is a SQLite file at an
absolute path in the project folder, with artifacts beside it. `tracking.uri` in params.yaml, or
the `BIGMODEL_TRACKING_URI` environment variable, points it elsewhere (a tracking server, say).
`MLFLOW_TRACKING_URI` is deliberately not read: `mlflow.set_tracking_uri` writes it into the
environment of the calling process, so it would leak one project's store into the next.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bigmodel.config import Params
from bigmodel.errors import Terminated, TransientError, unreachable

PARENT_ENV = "BIGMODEL_PARENT_RUN_ID"
FLOW_RUN_ENV = "BIGMODEL_FLOW_RUN_ID"
URI_ENV = "BIGMODEL_TRACKING_URI"
# The experiment's kind for the MLflow UI: model training, not GenAI (see also UI_VIEW).
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


# MLflow's own defaults retry a request for about two minutes (7 retries, backoff factor 2);
# a stage keeps its metrics across an outage instead (StageRun), so it asks only briefly.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri(params: Params) -> str:
    return (os.environ.get(URI_ENV) or params.tracking.uri
            or f"sqlite:///{(params.root / 'mlflow.db').resolve()}")


def configure(params: Params) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    # a new store's set-up lines (creating and upgrading its tables) are not the stage's news
    for logger in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    uri = tracking_uri(params)
    if uri.startswith("http"):  # a server that is down: fail within seconds, not minutes
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            location = None
            if uri.startswith("sqlite:"):  # keep artifacts beside the db, not in the cwd
                location = (params.root / "mlartifacts").resolve().as_uri()
            exp_id = mlflow.create_experiment(name, artifact_location=location,
                                              tags={EXPERIMENT_KIND: MODEL_TRAINING})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND not in exp.tags:
                MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
    except MlflowException as e:
        if unreachable(e):
            raise TransientError(f"MLflow tracking server at {uri} did not answer: "
                                 f"{str(e).splitlines()[0][:200]}") from None
        raise
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def lineage_tags(params: Params, stage: str, keys: list[str]) -> dict[str, str]:
    tags = {
        "bigmodel.stage": stage,
        "bigmodel.params_hash": params.keys_hash(keys) if keys else "",
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
    """Handle given to a stage: log metrics and artifacts into its run.

    Metrics survive a tracking server that stops answering mid-stage: they are kept, with their
    steps and times, and delivered in one batch once it answers again (tried again at most every
    RETRY_S seconds, so training does not wait on it); the stage's end delivers what is left,
    or fails as transient (exit 75: the flow retries it, from its last checkpoint)."""

    run_id: str
    pending: list = field(default_factory=list)  # [(key, value, timestamp ms, step)]
    retry_at: float = 0.0
    outage: bool = False
    RETRY_S = 10.0

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self.pending.extend((k, float(v), now, step or 0) for k, v in values.items())
        self.deliver()

    def deliver(self, final: bool = False) -> None:
        from mlflow.entities import Metric

        if not self.pending or (not final and time.monotonic() < self.retry_at):
            return
        client = MlflowClient()
        try:
            while self.pending:
                batch = self.pending[:1000]  # MLflow's limit for one batch
                client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch])
                del self.pending[:len(batch)]
        except Exception as e:
            if not unreachable(e):
                raise
            if final:
                raise TransientError(f"MLflow tracking server at {mlflow.get_tracking_uri()} did "
                                     f"not answer at the stage's end; {len(self.pending)} metric "
                                     f"values were not delivered") from None
            if not self.outage:
                print(f"tracking: the MLflow server did not answer; training goes on and its "
                      f"metrics are kept until it answers", flush=True)
            self.outage, self.retry_at = True, time.monotonic() + self.RETRY_S
            return
        if self.outage:
            print("tracking: the MLflow server answers again; the metrics kept meanwhile are "
                  "delivered", flush=True)
            self.outage = False

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=subdir)
        else:
            mlflow.log_artifact(str(path), artifact_path=subdir)

    def tags(self, values: dict[str, str]) -> None:
        mlflow.set_tags(values)

    def log_pyfunc(self, entry: Path, artifacts: dict[str, str], registered_name: str,
                   example: object) -> str:
        """Log a "models from code" pyfunc (`entry` builds it) carrying `artifacts` and the
        bigmodel package, register it, and return the new registry version."""
        import bigmodel  # the package travels with the model, so serving needs no install

        import safetensors
        import tokenizers
        import torch

        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(entry),
            artifacts=artifacts,
            code_paths=[str(Path(bigmodel.__file__).parent)],
            input_example=example,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"tokenizers=={tokenizers.__version__}",
                f"safetensors=={safetensors.__version__}",
                f"pandas=={pd.__version__}",
                f"pillow=={_version('pillow')}",
                f"pydantic=={_version('pydantic')}",
                f"pyyaml=={_version('pyyaml')}",
                f"scikit-learn=={_version('scikit-learn')}",
                f"seqeval=={_version('seqeval')}",
            ],
            registered_model_name=registered_name,
        )
        return str(info.registered_model_version)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


@contextmanager
def stage_run(stage: str, params: Params, keys: list[str]) -> Iterator[StageRun]:
    """One MLflow run for one stage instance (`pretrain@bert`), nested under the pipeline run
    when there is one; its params are the values of `keys`, the params DVC hashes for it."""
    configure(params)
    parent = os.environ.get(PARENT_ENV) or None
    from bigmodel import warmstart

    # how its process started: a fork of the flow's warm server, or its own interpreter
    tags = {**lineage_tags(params, stage, keys),
            "bigmodel.process": "warm fork" if warmstart.forked else "new"}
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=mlflow.active_run() is not None, tags=tags,
    ) as run:
        mlflow.log_params(flatten({k: params.value(k) for k in keys}))
        handle = StageRun(run.info.run_id)
        try:
            yield handle
        except (KeyboardInterrupt, Terminated):  # stopped, not failed
            mlflow.end_run("KILLED")
            raise
        handle.deliver(final=True)


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


# MLflow 3.17's UI opens every experiment in its GenAI view (an empty traces "Overview") unless
# the link asks for the model-training view; the experiment tag alone does not switch it.
UI_VIEW = "workflowType=machine_learning"


def experiment_link(params: Params, experiment_id: str) -> str:
    uri = tracking_uri(params)
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?{UI_VIEW}"


def run_link(params: Params, experiment_id: str, run_id: str) -> str:
    return experiment_link(params, experiment_id).replace("?", f"/runs/{run_id}?", 1)


# --- registry: aliases, versions, downloads -------------------------------------------------

def alias_version(params: Params, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the model or the alias does not exist."""
    configure(params)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(params: Params, name: str, alias: str, version: str, tags: dict[str, str]) -> None:
    configure(params)
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def set_tags_on_version(params: Params, name: str, version: str, tags: dict[str, str]) -> None:
    configure(params)
    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def version_tags(params: Params, name: str, version: str) -> dict[str, str]:
    configure(params)
    return dict(MlflowClient().get_model_version(name, version).tags)


def download_model(params: Params, uri: str, dest: Path) -> Path:
    """Fetch a logged model (e.g. models:/name@champion) into dest; return the folder of its
    bigmodel files (the one holding model.safetensors: weights, config, and the tokenizer or
    image processor)."""
    configure(params)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    found = sorted(p.parent for p in local.rglob("model.safetensors") if "code" not in p.parts)
    if not found:
        raise MlflowException(f"{uri}: no model.safetensors in the logged model")
    return found[0]


# --- lineage: DVC's hashes on the stage runs ------------------------------------------------

def log_lineage(params: Params, run_id: str, stage: str, lock: dict[str, Any]) -> None:
    """Record a stage run's DVC lineage: each data dependency as an MLflow dataset input whose
    digest is DVC's hash, each output's hash as a tag (code deps are covered by the git commit)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    configure(params)
    inputs = []
    for dep in lock.get("deps", []):
        path, digest = dep["path"], _dvc_hash(dep)
        if path.startswith("bigmodel/") or not digest:
            continue
        ds = MetaDataset(LocalArtifactDatasetSource(str((params.root / path).resolve())),
                         name=path, digest=digest)
        inputs.append(DatasetInput(ds._to_mlflow_entity(),
                                   tags=[InputTag("mlflow.data.context", f"dvc dep of {stage}")]))
    client = MlflowClient()
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    client.set_tag(run_id, "bigmodel.dvc_stage", stage)
    for out in lock.get("outs", []):
        client.set_tag(run_id, f"bigmodel.dvc_out.{out['path']}", _dvc_hash(out))


def _dvc_hash(entry: dict[str, Any]) -> str:
    return str(entry.get("md5") or entry.get("etag") or entry.get("checksum") or "")


def stage_run_id(params: Params, parent_run_id: str, stage: str) -> str | None:
    """The newest run of `stage` nested under a pipeline run."""
    runs = [r for r in child_runs(params, parent_run_id) if r["stage"] == stage]
    return runs[0]["run_id"] if runs else None
