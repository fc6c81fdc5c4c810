"""prefect.yaml for real: a Prefect server and a process worker on 127.0.0.1, `prefect deploy
--all`, then two `prefect deployment run`s of the pipeline with an override, started together:
the pool runs them one after the other, both complete, and MLflow holds their runs. No mocks, no
in-process harness."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import GPT_ONLY, REPO, make_project, stage_env
from tests.servers import free_port, running

PREFECT = str(Path(sys.executable).parent / "prefect")
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def promised_schedule() -> dict:
    """What the README promises of the scheduled retraining: its deployment, cron, weekday,
    time and timezone (`bigmodel-retrain/retrain` — cron `0 3 * * 1` (Mondays 03:00 UTC))."""
    m = re.search(r"`(?P<flow>[\w-]+)/(?P<deployment>[\w-]+)` — cron `(?P<cron>[^`]+)` "
                  r"\((?P<day>[A-Z][a-z]+)s (?P<hour>\d\d):(?P<minute>\d\d) (?P<tz>[\w/]+)\)",
                  (REPO / "README.md").read_text())
    assert m, "README.md no longer says when the retrain deployment runs"
    return {"flow": m["flow"], "deployment": m["deployment"], "cron": m["cron"],
            "weekday": WEEKDAYS.index(m["day"]), "hour": int(m["hour"]),
            "minute": int(m["minute"]), "timezone": m["tz"]}


def test_retrain_is_scheduled_when_the_readme_says_on_a_flow_that_takes_its_parameters():
    """prefect.yaml as `prefect deploy` reads it (Prefect's own validation and schedule
    building), the run times Prefect's scheduler computes from it, and the flow a worker loads
    from its entrypoint; no server needed."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.flows import Flow, load_flow_from_entrypoint
    from prefect.server.schemas.schedules import CronSchedule
    from rich.console import Console

    promised = promised_schedule()
    log = io.StringIO()
    configs, _ = _load_deploy_configs_and_actions(REPO / "prefect.yaml", console=Console(file=log))
    assert configs, f"Prefect read no deployments from prefect.yaml: {log.getvalue()}"
    [retrain] = [c for c in configs if c["name"] == promised["deployment"]]
    [scheduled] = [_schedule_config_to_deployment_schedule(s) for s in retrain["schedules"]]
    schedule = scheduled["schedule"]
    assert scheduled.get("active", True) is True
    assert (schedule.cron, schedule.timezone) == (promised["cron"], promised["timezone"])

    # the next runs Prefect's scheduler would create: every week, that weekday at that time
    start = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)  # a Sunday
    runs = asyncio.run(CronSchedule(cron=schedule.cron, timezone=schedule.timezone,
                                    day_or=schedule.day_or).get_dates(8, start=start))
    zone = ZoneInfo(promised["timezone"])
    local = [r.astimezone(zone) for r in runs]
    assert len(local) == 8 and start <= runs[0] < start + dt.timedelta(days=7)
    for when in local:
        assert (when.weekday(), when.hour, when.minute, when.second) == (
            promised["weekday"], promised["hour"], promised["minute"], 0), when
    assert all(b - a == dt.timedelta(days=7) for a, b in zip(runs, runs[1:]))

    # the entrypoint is a flow of that name, importable as the worker imports it, and it
    # accepts the deployment's parameters
    path, _, func = retrain["entrypoint"].partition(":")
    assert (REPO / path).is_file()
    flow = load_flow_from_entrypoint(f"{REPO / path}:{func}", use_placeholder_flow=False)
    assert isinstance(flow, Flow) and flow.name == promised["flow"]
    assert set(retrain["parameters"]) <= set(flow.parameters.properties)
    flow.validate_parameters(retrain["parameters"])


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):  # noqa: ANN001, ANN201
    """`prefect server start` with its own home and database; the env that points clients at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in stage_env().items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_UI_ENABLED="false")
    with running([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 home, env, health=f"http://127.0.0.1:{port}/api/health", timeout_s=120):
        yield env


FLOW_RUNS = """
import asyncio, json, sys
from prefect.client.orchestration import get_client

async def main(ids):
    async with get_client() as client:
        runs = [await client.read_flow_run(i) for i in ids]
    print(json.dumps([{"state": r.state.type.value, "start": r.start_time.isoformat(),
                       "end": r.end_time.isoformat()} for r in runs]))

asyncio.run(main(sys.argv[1:]))
"""


def flow_runs(env: dict[str, str], cwd: Path, *ids: str) -> list[dict[str, str]]:
    """State, start and end (ISO, UTC) of flow runs, as the Prefect server holds them."""
    proc = subprocess.run([sys.executable, "-c", FLOW_RUNS, *ids], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prefect(env: dict[str, str], cwd: Path, *args: str, timeout: int = 120) -> str:
    proc = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


@pytest.mark.slow
def test_deployment_run_completes_on_a_worker_and_is_tracked(prefect_server, tmp_path):  # noqa: ANN001
    env = prefect_server
    project = make_project(tmp_path / "project", with_flows=True, only=GPT_ONLY)
    prefect(env, project, "work-pool", "create", "bigmodel", "--type", "process")
    prefect(env, project, "work-pool", "set-concurrency-limit", "bigmodel", "1")
    prefect(env, project, "deploy", "--all")

    # the scheduled retraining deployment, as the server holds it, runs when the README says
    promised = promised_schedule()
    retrain = json.loads(prefect(env, project, "deployment", "inspect",
                                 f"{promised['flow']}/{promised['deployment']}", "--output", "json"))
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"])
            for s in retrain["schedules"]] == [(promised["cron"], promised["timezone"], True)]
    assert retrain["work_pool_name"] == "bigmodel"

    # two runs at once: the pool (concurrency limit 1) runs the second after the first
    override = ["--param", 'overrides={"pretrain.gpt.max_steps": 20}']
    with running([PREFECT, "worker", "start", "--pool", "bigmodel", "--limit", "1"],
                 tmp_path / "worker", env, cwd=project):
        queued = prefect(env, project, "deployment", "run", "bigmodel-pipeline/pipeline", *override)
        out = prefect(env, project, "deployment", "run", "bigmodel-pipeline/pipeline", *override,
                      "--watch", "--watch-interval", "3", "--watch-timeout", "600", timeout=660)
    assert "Flow run finished successfully in 'Completed'" in out, out[-2000:]
    flow_run_id, second_id = (re.search(r"UUID:\s*([0-9a-f-]{36})", o).group(1)
                              for o in (queued, out))
    first, second = flow_runs(env, project, flow_run_id, second_id)
    assert first["state"] == second["state"] == "COMPLETED"
    assert first["end"] <= second["start"], (first, second)  # one after the other, not together

    # MLflow (the project's own store) holds the pipeline run of each flow run, stages nested
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["bigmodel.prefect_flow_run_id"]: r for r in runs
               if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {flow_run_id, second_id}
    parent = parents[flow_run_id]
    assert json.loads(parent.data.tags["bigmodel.overrides"]) == {"pretrain.gpt.max_steps": 20}
    stages = {r.data.tags["bigmodel.stage"] for r in runs
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"source@stdlib", "pretrain@gpt", "finetune@gpt-cls", "evaluate@gpt-cls",
            "explain@gpt-cls"} <= stages
    pretrain = json.loads((project / "reports/metrics/pretrain/gpt.json").read_text())
    assert pretrain["steps"] == 20  # the override reached the stage
    assert "max_steps: 30" in (project / "params.yaml").read_text()  # and was put back
    assert not (project / "params.yaml.bigmodel-backup").exists()
    assert os.environ.get("PREFECT_API_URL") != env["PREFECT_API_URL"]
