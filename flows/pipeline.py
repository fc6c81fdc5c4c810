"""The pipeline flow: run each dvc.yaml stage through DVC, tracked as one MLflow parent run.

One flow run = one MLflow parent run; each stage instance `dvc stage list` names
(`pretrain@bert`, ...) is a Prefect task running `dvc repro --single-item <stage>` (DVC alone
decides whether it is up to date; a stage it skips is reported as skipped) and, when it runs,
an MLflow child run that then gets DVC's hashes of its inputs and outputs (lineage). A stage's
output reaches the flow's log line by line as it runs (progress: step of total, loss,
throughput, ETA), without DVC's git hints. The `source@*` snapshots are always refreshed, so
new data is seen. The stage processes start as forks of one warm process that has imported
torch, MLflow and bigmodel once (bigmodel.warmstart).
Only transient failures (exit code 75, e.g. a tracking server that did not answer) are retried,
with BIGMODEL_RESUME=1: a pretraining stage continues from its last checkpoint.
After the stages, the champion gate (bigmodel.promote) moves the registry's `champion` alias to
a better model. The flow ends with a markdown report: a Prefect artifact,
reports/pipeline_report.md, and an artifact of the parent MLflow run.

    python -m flows.pipeline            # ephemeral Prefect API, embedded MLflow store
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from bigmodel import config, promote, tracking, warmstart, workspace
from bigmodel.cli import EXIT_TRANSIENT
from bigmodel.workspace import RESUME_ENV
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
    """Every stage instance, `foreach` groups expanded, in dvc.yaml order (written in
    dependency order; DVC still enforces the DAG), as `dvc stage list` names them."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only", "--fail"],
                          cwd=root, env=stage_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        last = next((l for l in reversed(proc.stderr.splitlines()) if l.strip()), "no output")
        raise BigModelError(f"dvc stage list: {last}")
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


# Lines the flow's log leaves out: DVC's hints after a stage (how to commit dvc.lock, push,
# turn on autostaging) and the one warning MLflow prints, over two lines, whenever a process
# defines a pyfunc class without type hints (bigmodel.serving's, deliberately: see there)
NOISE = ("To track the changes with git", "git add ", "To enable auto staging",
         "dvc config core.autostage", "Use `dvc push`", "Updating lock file",
         "Add type hints to the `predict` method", "  color_warning(")


def is_hint(line: str) -> bool:
    return not line.strip() or any(h in line for h in NOISE)


def _transient_only(task, task_run, state) -> bool:  # noqa: ANN001
    return isinstance(state.data, TransientStageFailure)


def stage_env() -> dict[str, str]:
    """The stage processes find `bigmodel`/`dvc` beside this interpreter and the parent run id
    in the environment (set by tracking.pipeline_run)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DO_NOT_TRACK", "true")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a stage's progress lines arrive as they are printed
    return env


@task(task_run_name="{stage}", retries=2, retry_delay_seconds=10, retry_condition_fn=_transient_only)
def run_stage(stage: str, root: str, force: bool = False) -> StageOutcome:
    logger = get_run_logger()
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []),
           stage]
    lines = []
    env = stage_env()
    if (task_run.run_count or 1) > 1:  # a retry after a transient failure: continue, not restart
        env[RESUME_ENV] = "1"
        logger.info(f"{stage}: try {task_run.run_count}; a pretraining stage resumes from its "
                    f"last checkpoint")
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            lines.append(line)
            if not is_hint(line):
                logger.info(line)
    seconds = time.perf_counter() - start
    output = "\n".join(lines)
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


@task(task_run_name="lineage-{stage}", cache_policy=NO_CACHE)
def record_lineage(params: config.Params, parent: str, stage: str) -> None:
    """Put DVC's hashes of what a stage read and wrote on its MLflow run."""
    lock_file = params.root / "dvc.lock"
    entry = yaml.safe_load(lock_file.read_text())["stages"].get(stage) if lock_file.is_file() else None
    run_id = tracking.stage_run_id(params, parent, stage)
    if entry and run_id:
        tracking.log_lineage(params, run_id, stage, entry)


@task(task_run_name="champion-gate", cache_policy=NO_CACHE)
def gate(params: config.Params) -> list[promote.Decision]:
    decisions = promote.run(params)
    for d in decisions:
        get_run_logger().info(d.line())
    return decisions


@dataclass
class Execution:
    outcomes: list[StageOutcome]
    parent: str
    failure: Exception | None


def out_of_date(root: Path) -> set[str]:
    """The stages `dvc repro` could run now: those `dvc status` finds changed (code, data,
    params, missing outputs) and every stage downstream of them in `dvc dag`. Any other stage
    would be skipped by DVC, so the flow reports it skipped without starting DVC for it (about
    2.5 s a stage). Without a dvc.lock nothing has run yet: every stage."""
    if not (root / "dvc.lock").is_file():
        return set(stage_names(root))
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root,
                            env=stage_env(), capture_output=True, text=True)
    dag = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot"], cwd=root,
                         env=stage_env(), capture_output=True, text=True)
    if status.returncode != 0 or dag.returncode != 0:
        return set(stage_names(root))  # let each stage's own `dvc repro` decide (and report)
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dag.stdout)
    reached: set[str] = set()
    frontier = set(json.loads(status.stdout or "{}"))
    while frontier:
        reached |= frontier
        frontier = {b for a, b in edges if a in frontier} - reached
    return reached


def execute(params: config.Params, root: Path, refresh_source: bool = True) -> Execution:
    """Every dvc.yaml stage in order (the `source` snapshots first, forced, so a data change is
    seen), each that ran getting its DVC lineage on its MLflow run. Once the snapshots are
    fresh, only the stages DVC finds out of date (and those downstream of them) go through
    `dvc repro`; the rest are reported skipped. Call inside a pipeline_run."""
    with warmstart.serving():  # the stages start as forks of a warm process
        return _execute(params, root, refresh_source)


def _execute(params: config.Params, root: Path, refresh_source: bool) -> Execution:
    parent = os.environ[tracking.PARENT_ENV]
    outcomes: list[StageOutcome] = []
    failure: Exception | None = None
    pending: set[str] | None = None
    for stage in stage_names(root):
        if failure is not None:
            outcomes.append(StageOutcome(stage, "not run", 0.0))
            continue
        if stage.split("@")[0] != "source":
            if pending is None:
                pending = out_of_date(root)
            if stage not in pending:
                outcomes.append(StageOutcome(stage, "skipped", 0.0))
                continue
        try:
            outcome = run_stage(stage, str(root),
                                force=refresh_source and stage.split("@")[0] == "source")
        except (StageFailed, TransientStageFailure) as e:
            outcomes.append(StageOutcome(stage, "failed", 0.0, str(e)))
            failure = e
            continue
        outcomes.append(outcome)
        if outcome.status == "ran":
            record_lineage(params, parent, stage)
    return Execution(outcomes, parent, failure)


def finish(params: config.Params, root: Path, run: Execution, title: str, preamble: list[str],
           decisions: list[promote.Decision] | None, key: str) -> str:
    """Write the report (file, MLflow parent run, Prefect artifact) and the run's counters."""
    report = render_report(params, run.outcomes, run.parent,
                           tracking.child_runs(params, run.parent), metrics_of(params),
                           title=title, preamble=preamble, decisions=decisions)
    path = root / "reports" / f"{key}_report.md"
    write_text(path, report)
    tracking.log_to_run(run.parent, path, {
        "stages_ran": sum(o.status == "ran" for o in run.outcomes),
        "stages_skipped": sum(o.status == "skipped" for o in run.outcomes),
        "champions_moved": sum(d.moved for d in decisions or []),
    })
    create_markdown_artifact(report, key=f"bigmodel-{key}-report", description=title)
    return report


@flow(name="bigmodel-pipeline")
def pipeline(params_file: str = "params.yaml", root: str | None = None,
             overrides: dict[str, Any] | None = None, promote_models: bool = True,
             ) -> list[StageOutcome]:
    """Run every dvc.yaml stage under one MLflow parent run, gate the champions, report.

    `overrides` ({"pretrain.gpt.max_steps": 200}) are written into the params file for this run
    only, so DVC records what the stages really used; the file is put back afterwards."""
    root_path = Path(root) if root else ROOT
    run_name = flow_run.get_name() or "local"
    os.environ[tracking.FLOW_RUN_ENV] = flow_run.get_id() or ""
    # a bad params file or override fails here, before any work
    with workspace.held(root_path, "pipeline"), \
            config.overridden(root_path / params_file, overrides) as params:
        with tracking.pipeline_run(params, f"pipeline {run_name}",
                                   {"prefect.flow_run": run_name,
                                    "bigmodel.overrides": json.dumps(overrides or {})}):
            run = execute(params, root_path)
            decisions = gate(params) if promote_models and run.failure is None else None
            preamble = [f"- overrides: `{json.dumps(overrides)}`"] if overrides else []
            finish(params, root_path, run, "bigmodel pipeline report", preamble, decisions,
                   "pipeline")
    if run.failure is not None:
        raise run.failure
    return run.outcomes


def metrics_of(params: config.Params) -> dict[str, dict[str, dict]]:
    """Each stage instance's metrics file (present whether it ran now or earlier), by stage
    kind and run: {"evaluate": {"bert-cls": {...}}, ...}."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(params.path("metrics").glob("*/*.json")):
        out.setdefault(path.parent.name, {})[path.stem] = read_json(path)
    return out


def run_main(run: Callable[[], Any], describe: Callable[[Any], list[str]],
             params_file: Path = ROOT / "params.yaml") -> int:
    """A flow as a command: user errors exit 2 and failed stages 1, each with one line. The
    params file and the workspace lock are checked first, so a bad file or a run already going
    stops before Prefect starts (and logs a trace)."""
    try:
        config.refuse_leftover_backup(params_file)
        config.load(params_file)
        with workspace.held(params_file.parent, "check"):  # a run already going: one line, now
            pass
        result = run()
    except BigModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageFailed, TransientStageFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(describe(result)))
    return 0


def main() -> int:
    return run_main(pipeline, lambda outcomes: [
        "  ".join(f"{o.stage}: {o.status}" for o in outcomes),
        f"report: {ROOT / 'reports' / 'pipeline_report.md'}",
    ])


if __name__ == "__main__":
    sys.exit(main())
