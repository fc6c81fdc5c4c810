"""bigmodel against a real MLflow tracking server started by infra/mlflow-server.sh on
127.0.0.1: runs, metrics and artifacts go over HTTP, and the MLflow UI (headless Chromium) lists
the pipeline's runs. No mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest

from bigmodel import config, tracking
from tests.servers import free_port, running

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "mlflow-server.sh"
SCREENSHOT = REPO / "reports" / "test-artifacts" / "mlflow_ui_runs.png"
START_TIMEOUT_S = 60
PIPELINE, STAGE = "pipeline srv", "prepare@stdlib"


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN001, ANN201
    """infra/mlflow-server.sh on a free port, its store and artifacts in a temporary folder."""
    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("BIGMODEL_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{base / 's.db'}",
               MLFLOW_ARTIFACTS_DESTINATION=str(base / "art"))
    with running([str(SCRIPT), str(port)], base, env, health=f"http://127.0.0.1:{port}/health",
                 timeout_s=START_TIMEOUT_S) as proc:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "dir": base, "pid": proc.pid}


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory):  # noqa: ANN001, ANN201
    """One pipeline run with one stage run, logged by bigmodel's tracking module over HTTP."""
    project = tmp_path_factory.mktemp("project")
    note = project / "note.txt"
    note.write_text("three rows\n")
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("BIGMODEL_TRACKING_URI", raising=False)
        mp.delenv("BIGMODEL_PARENT_RUN_ID", raising=False)
        p = config.validate({"tracking": {"experiment": "srv", "uri": server["url"]}})
        p._root = project
        try:
            with tracking.pipeline_run(p, PIPELINE, {}) as parent:
                with tracking.stage_run(STAGE, p, ["data.stdlib"]) as run:
                    run.metrics({"rows": 3.0})
                    run.artifact(note)
        finally:  # mlflow.set_tracking_uri exported the server's URL into this process
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return {"parent": parent, "child": run.run_id, "project": project}


@pytest.mark.slow
def test_bigmodel_logs_nested_runs_metrics_and_artifacts_to_the_server(server, logged):  # noqa: ANN001
    client = mlflow.MlflowClient(server["url"])
    exp = client.get_experiment_by_name("srv")
    assert exp is not None
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {logged["parent"], logged["child"]}
    parent, child = runs[logged["parent"]], runs[logged["child"]]
    assert parent.info.run_name == PIPELINE and child.info.run_name == STAGE
    assert child.data.tags["mlflow.parentRunId"] == logged["parent"]
    assert child.data.tags["bigmodel.stage"] == STAGE
    assert child.data.metrics == {"rows": 3.0}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}

    # the artifact went through the server's artifact proxy into its destination folder
    assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert [a.path for a in client.list_artifacts(logged["child"])] == ["note.txt"]
    stored = list((server["dir"] / "art").rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "three rows\n"

    # the script exec'd the server: the process we started is mlflow itself, so signals reach it
    cmdline = Path(f"/proc/{server['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"server" in cmdline and any(arg.endswith(b"mlflow") for arg in cmdline), cmdline
    assert b"127.0.0.1" in cmdline and b"--workers" in cmdline

    # nothing was written to the project's default SQLite store: it all went over HTTP
    assert not (logged["project"] / "mlflow.db").exists()
    assert not (logged["project"] / "mlartifacts").exists()


@pytest.mark.parametrize("port", ["abc", "5000x", "70000"])
def test_script_refuses_a_port_that_is_not_an_integer_with_exit_2(port, tmp_path):  # noqa: ANN001
    proc = subprocess.run([str(SCRIPT), port], cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "port" in proc.stderr and port in proc.stderr
    assert not list(tmp_path.iterdir())


# --- the MLflow UI in headless Chromium -------------------------------------------------------

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    why = "headless Chromium not found: apt-get install -y chromium"
    if os.environ.get("BIGMODEL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why} (BIGMODEL_REQUIRE_BROWSER=1)")
    pytest.skip(why)


def run_chromium(browser: str, url: str, *args: str, budget_ms: int = 15000) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
             "--window-size=1400,900", *args, url],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_missing_browser_skips_or_fails_as_ci_asks(monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("BIGMODEL_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        chromium()
    monkeypatch.setenv("BIGMODEL_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        chromium()


@pytest.mark.slow
def test_mlflow_ui_lists_the_pipeline_runs(server, logged):  # noqa: ANN001
    browser = chromium()
    exp_id = mlflow.MlflowClient(server["url"]).get_experiment_by_name("srv").experiment_id
    # `#/experiments/<id>` opens the experiment's overview (traces); the runs table is at
    # `/runs`. Sorted by start time it nests the stage runs under a collapsed pipeline row, so
    # sort by name to list them all.
    url = (f"{server['url']}/#/experiments/{exp_id}/runs"
           "?orderByKey=attributes.run_name&orderByAsc=true")
    dom = ""
    for budget_ms in (15000, 30000, 60000):  # a slow machine may need more virtual time
        dom = run_chromium(browser, url, "--dump-dom", budget_ms=budget_ms)
        if f">{PIPELINE}<" in dom and f">{STAGE}<" in dom:
            break
    assert f">{PIPELINE}<" in dom, f"the UI did not list {PIPELINE!r}; DOM starts:\n{dom[:2000]}"
    assert f">{STAGE}<" in dom, f"the UI did not list {STAGE!r}"
    assert f"#/experiments/{exp_id}/runs/{logged['parent']}" in dom
    assert f"#/experiments/{exp_id}/runs/{logged['child']}" in dom

    shot = server["dir"] / "mlflow_ui_runs.png"
    run_chromium(browser, url, f"--screenshot={shot}", budget_ms=budget_ms)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, "the screenshot looks blank"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


@pytest.mark.slow
def test_the_experiment_opens_on_its_training_runs_not_the_genai_overview(server, logged):  # noqa: ANN001
    """bigmodel tags its experiment as model training (`mlflow.experimentKind`), and the links it
    hands out (report card, `make mlflow-ui`) ask for the model-training view: they land on the
    runs table, not on the empty GenAI "Overview" a bare experiment link opens."""
    browser = chromium()
    exp = mlflow.MlflowClient(server["url"]).get_experiment_by_name("srv")
    assert exp.tags[tracking.EXPERIMENT_KIND] == tracking.MODEL_TRAINING
    p = config.validate({"tracking": {"experiment": "srv", "uri": server["url"]}})
    url = tracking.experiment_link(p, exp.experiment_id)
    dom = ""
    for budget_ms in (15000, 30000, 60000):
        dom = run_chromium(browser, url, "--dump-dom", budget_ms=budget_ms)
        if f">{PIPELINE}<" in dom:
            break
    assert f">{PIPELINE}<" in dom, f"the experiment did not open on its runs; DOM starts:\n{dom[:2000]}"
    assert f"#/experiments/{exp.experiment_id}/runs/{logged['parent']}" in dom
