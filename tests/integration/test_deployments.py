"""prefect.yaml for real: a Prefect server and a process worker on 127.0.0.1, `prefect deploy
--all`, then `prefect deployment run` of the pipeline with an override; the flow run completes
and MLflow holds its runs. No mocks, no in-process harness."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import GPT_ONLY, make_project, stage_env
from tests.servers import free_port, running

PREFECT = str(Path(sys.executable).parent / "prefect")


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

    # the scheduled retraining deployment carries its cron
    retrain = json.loads(prefect(env, project, "deployment", "inspect", "bigmodel-retrain/retrain",
                                 "--output", "json"))
    crons = [s["schedule"]["cron"] for s in retrain["schedules"]]
    assert crons == [yaml.safe_load((project / "prefect.yaml").read_text())
                     ["deployments"][1]["schedules"][0]["cron"]]
    assert retrain["work_pool_name"] == "bigmodel"

    with running([PREFECT, "worker", "start", "--pool", "bigmodel", "--limit", "1"],
                 tmp_path / "worker", env, cwd=project):
        out = prefect(env, project, "deployment", "run", "bigmodel-pipeline/pipeline",
                      "--param", 'overrides={"pretrain.gpt.max_steps": 20}',
                      "--watch", "--watch-interval", "3", "--watch-timeout", "600", timeout=660)
    assert "Flow run finished successfully in 'Completed'" in out, out[-2000:]
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

    # MLflow (the project's own store) holds the pipeline run of that flow run, stages nested
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert parents[0].data.tags["bigmodel.prefect_flow_run_id"] == flow_run_id
    assert json.loads(parents[0].data.tags["bigmodel.overrides"]) == {"pretrain.gpt.max_steps": 20}
    stages = {r.data.tags["bigmodel.stage"] for r in runs if r is not parents[0]}
    assert {"source@stdlib", "pretrain@gpt", "finetune@gpt-cls", "evaluate@gpt-cls",
            "explain@gpt-cls"} <= stages
    pretrain = json.loads((project / "reports/metrics/pretrain/gpt.json").read_text())
    assert pretrain["steps"] == 20  # the override reached the stage
    assert "max_steps: 30" in (project / "params.yaml").read_text()  # and was put back
    assert not (project / "params.yaml.bigmodel-backup").exists()
    assert os.environ.get("PREFECT_API_URL") != env["PREFECT_API_URL"]
