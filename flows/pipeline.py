"""The pipeline flow: run each dvc.yaml stage through DVC, tracked as one MLflow parent run.

One flow run = one MLflow parent run; each stage is a Prefect task running
`dvc repro --single-item <stage>` (DVC alone decides whether it is up to date; a stage it skips is
reported as skipped) and, when it runs, an MLflow child run. Only transient failures (exit code
75, e.g. a tracking server that did not answer) are retried. The flow ends with a markdown report:
a Prefect artifact, reports/pipeline_report.md, and an artifact of the parent MLflow run.

    python -m flows.pipeline            # ephemeral Prefect API, embedded MLflow store
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from bigmodel import config, tracking
from bigmodel.cli import EXIT_TRANSIENT
from bigmodel.errors import BigModelError
from bigmodel.io import read_json, write_text
from flows.report import render_report

ROOT = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A stage exited non-zero for a reason retrying will not fix."""


class TransientStageFailure(RuntimeError):
    """A stage exited with code 75: worth another try."""


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped" | "restored" (from DVC's run cache) | "failed" | "not run"
    seconds: float
    detail: str = ""


def stage_names(root: Path) -> list[str]:
    """Stages in dvc.yaml order (written in dependency order; DVC still enforces the DAG)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def _transient_only(task, task_run, state) -> bool:  # noqa: ANN001
    return isinstance(state.data, TransientStageFailure)


def stage_env() -> dict[str, str]:
    """The stage processes find `bigmodel`/`dvc` beside this interpreter and the parent run id
    in the environment (set by tracking.pipeline_run)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient_only)
def run_stage(stage: str, root: str) -> StageOutcome:
    logger = get_run_logger()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root, env=stage_env(), capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    for line in output.strip().splitlines():
        logger.info(line)
    if proc.returncode != 0:
        last = next((l for l in reversed(output.splitlines()) if l.strip()), "no output")
        if f"exited with {EXIT_TRANSIENT}" in output:
            raise TransientStageFailure(f"stage {stage}: {last}")
        raise StageFailed(f"stage {stage} failed: {last}")
    if f"Running stage '{stage}'" in output:
        return StageOutcome(stage, "ran", seconds)
    if "didn't change, skipping" in output:
        return StageOutcome(stage, "skipped", seconds)
    if "is cached - skipping run" in output:  # outputs of an earlier identical run, checked out
        return StageOutcome(stage, "restored", seconds)
    raise StageFailed(f"stage {stage}: could not tell from DVC's output whether it ran")


@flow(name="bigmodel-pipeline")
def pipeline(params_file: str = "params.yaml", root: str | None = None) -> list[StageOutcome]:
    """Run every dvc.yaml stage in order under one MLflow parent run, then write the report."""
    root_path = Path(root) if root else ROOT
    params = config.load(root_path / params_file)  # a bad params file fails here, before any work
    run_name = flow_run.get_name() or "local"
    os.environ[tracking.FLOW_RUN_ENV] = flow_run.get_id() or ""
    outcomes: list[StageOutcome] = []
    failure: Exception | None = None
    with tracking.pipeline_run(params, f"pipeline {run_name}", {"prefect.flow_run": run_name}) as parent:
        for stage in stage_names(root_path):
            if failure is not None:
                outcomes.append(StageOutcome(stage, "not run", 0.0))
                continue
            try:
                outcomes.append(run_stage(stage, str(root_path)))
            except (StageFailed, TransientStageFailure) as e:
                outcomes.append(StageOutcome(stage, "failed", 0.0, str(e)))
                failure = e
        report = render_report(params, outcomes, parent, tracking.child_runs(params, parent),
                               metrics_of(params))
        path = root_path / "reports" / "pipeline_report.md"
        write_text(path, report)
        tracking.log_to_run(parent, path, {
            "stages_ran": sum(o.status == "ran" for o in outcomes),
            "stages_skipped": sum(o.status == "skipped" for o in outcomes),
        })
    create_markdown_artifact(report, key="bigmodel-report", description="bigmodel pipeline report")
    if failure is not None:
        raise failure
    return outcomes


def metrics_of(params: config.Params) -> dict[str, dict]:
    """Each stage's metrics file (present whether the stage ran now or earlier)."""
    out = {}
    for path in sorted(params.path("metrics").glob("*.json")):
        out[path.stem] = read_json(path)
    return out


def main() -> int:
    try:
        outcomes = pipeline()
    except BigModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageFailed, TransientStageFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("  ".join(f"{o.stage}: {o.status}" for o in outcomes))
    print(f"report: {ROOT / 'reports' / 'pipeline_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
