"""Scheduled retraining: refresh the data snapshot, rerun what changed, gate the champion.

    refresh `source` → dvc repro (stage by stage; only what the change reaches reruns)
      → champion gate on the same test split (bigmodel.promote; moves the alias only when the
        challenger is better by `promote.margin`) → `dvc push` when a remote is configured
      → a report saying what changed, what was retrained and why the champion moved or stayed.

With unchanged data every stage after `source` is skipped and the report says so. Deployed on a
cron schedule by prefect.yaml; `python -m flows.retrain` runs it once, here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from bigmodel import config, tracking, workspace
from bigmodel.io import read_json
from flows.pipeline import ROOT, StageFailed, execute, finish, gate, run_main, stage_env


@dataclass
class RetrainResult:
    data_changed: bool
    source_digest: str
    retrained: list[str]
    champions: dict[str, str | None]  # registered model -> champion version after the run
    moved: list[str]  # registered models whose champion moved
    pushed: bool
    summary: str = ""
    stages: dict[str, str] = field(default_factory=dict)


def source_digest(params: config.Params) -> str:
    """One digest over every data run's source snapshot ("" before the first snapshot)."""
    digests = []
    for name in sorted(params.data):
        path = params.path("data", name) / "source.json"
        if not path.is_file():
            return ""
        digests.append(f"{name}:{read_json(path).get('digest', '')}")
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def has_remote(root: Path) -> bool:
    out = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=root,
                         env=stage_env(), capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


@task(task_run_name="dvc-push", retries=2, retry_delay_seconds=10)
def dvc_push(root: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=root, env=stage_env(),
                          capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    get_run_logger().info(output)
    if proc.returncode != 0:
        raise StageFailed(f"dvc push failed: {output.splitlines()[-1] if output else 'no output'}")
    return output.splitlines()[-1] if output else "pushed"


@flow(name="bigmodel-retrain")
def retrain(params_file: str = "params.yaml", root: str | None = None,
            overrides: dict[str, Any] | None = None, push: bool = True) -> RetrainResult:
    """Refresh, rerun what changed, gate the champion, push, report."""
    root_path = Path(root) if root else ROOT
    run_name = flow_run.get_name() or "local"
    os.environ[tracking.FLOW_RUN_ENV] = flow_run.get_id() or ""
    with workspace.held(root_path, "retrain"), \
            config.overridden(root_path / params_file, overrides) as params:
        before = source_digest(params)
        with tracking.pipeline_run(params, f"retrain {run_name}",
                                   {"prefect.flow_run": run_name, "bigmodel.flow": "retrain",
                                    "bigmodel.overrides": json.dumps(overrides or {})}):
            run = execute(params, root_path)
            after = source_digest(params)
            retrained = [o.stage for o in run.outcomes
                         if not o.stage.startswith("source@") and o.status in ("ran", "restored")]
            decisions = gate(params) if run.failure is None else None
            pushed, push_note = False, "no DVC remote configured: nothing pushed"
            if run.failure is None and push and has_remote(root_path):
                push_note, pushed = f"dvc push: {dvc_push(str(root_path))}", True
            elif not push:
                push_note = "push disabled for this run"
            changed = before != after
            data_line = (f"- data: changed (source digest `{before[:12] or 'none'}` → "
                         f"`{after[:12]}`)" if changed else
                         f"- data: no change (source digest `{after[:12]}`)")
            if retrained:
                work = f"- retrained: {', '.join(retrained)}"
            elif run.failure is None:
                work = "- retrained: nothing (every stage after `source` was up to date)"
            else:
                work = f"- failed: {run.failure}"
            champ = [f"- {d.line()}" for d in decisions or []]
            preamble = [data_line, work, *champ, f"- {push_note}",
                        *([f"- overrides: `{json.dumps(overrides)}`"] if overrides else [])]
            finish(params, root_path, run, "bigmodel retrain report", preamble, decisions,
                   "retrain")
    if run.failure is not None:
        raise run.failure
    kept = not any(d.moved for d in decisions or [])
    summary = ("no change, champion kept" if not changed and not retrained and kept else
               f"{'data changed' if changed else 'no data change'}; retrained "
               f"{len(retrained)} stages; champion {'kept' if kept else 'moved'}")
    get_run_logger().info(summary)
    return RetrainResult(
        data_changed=changed, source_digest=after, retrained=retrained,
        champions={d.model: d.champion_after for d in decisions or []},
        moved=[d.model for d in decisions or [] if d.moved], pushed=pushed, summary=summary,
        stages={o.stage: o.status for o in run.outcomes},
    )


def main() -> int:
    return run_main(retrain, lambda result: [
        result.summary, f"report: {ROOT / 'reports' / 'retrain_report.md'}"])


if __name__ == "__main__":
    sys.exit(main())
