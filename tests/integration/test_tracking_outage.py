"""A tracking server lost mid-pretraining, for real: `infra/mlflow-server.sh` on a free port,
`bigmodel pretrain` logging to it, the server killed while training runs and started again on the
same store. Training goes on through the outage, the metrics logged meanwhile reach the server
when it is back, and no checkpoint is lost; a server that stays down at the stage's end makes it
exit 75 (transient), and the retry the flow makes (BIGMODEL_RESUME=1) resumes from the last
checkpoint instead of step 0."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.integration.test_resume_kill import env, pretrain_cmd, tiny_project
from tests.servers import free_port, running, stop

# Pauses training at the batch draws of steps PAUSE_AT until the test writes go.<step>: the
# test acts on the server meanwhile (the process itself is never touched).
PAUSE = """
import os
from pathlib import Path
draws, calls = pretrain.WindowSampler.__call__, [0]
stops = {int(s) + 2: int(s) for s in os.environ["PAUSE_AT"].split(",")}  # 2 validation draws
def pausing(self):
    calls[0] += 1
    step = stops.get(calls[0])
    if step:
        Path(f"paused.{step}").write_text("")
        while not Path(f"go.{step}").exists():
            time.sleep(0.05)
    return draws(self)
pretrain.WindowSampler.__call__ = pausing
"""


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None, f"pretraining ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"pretraining did not reach {what} in 120 s"
        time.sleep(0.05)


def server(stack: ExitStack, base: Path, port: int) -> subprocess.Popen:
    server_env = {k: v for k, v in os.environ.items()
                  if k not in ("BIGMODEL_TRACKING_URI", "MLFLOW_TRACKING_URI")}
    server_env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{base / 'store.db'}",
                      MLFLOW_ARTIFACTS_DESTINATION=str(base / "artifacts"))
    return stack.enter_context(running([str(REPO / "infra" / "mlflow-server.sh"), str(port)],
                                       base, server_env, health=f"http://127.0.0.1:{port}/health",
                                       timeout_s=90))


def project(tmp_path: Path, port: int) -> Path:
    root = tiny_project(tmp_path / "project", max_steps=40, log_interval=4, checkpoint_interval=5,
                        eval_interval=20)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"] = {"uri": f"http://127.0.0.1:{port}", "experiment": "outage"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def curve(url: str, key: str) -> list[int]:
    client = MlflowClient(url)
    [run] = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                               filter_string="attributes.run_name = 'pretrain@gpt'")
    return [m.step for m in client.get_metric_history(run.info.run_id, key)], run.info.status


@pytest.mark.slow
def test_training_goes_on_through_a_server_outage_and_delivers_its_metrics_after(tmp_path):
    port = free_port()
    root = project(tmp_path, port)
    with ExitStack() as stack:
        first = server(stack, tmp_path / "server", port)
        proc = subprocess.Popen(pretrain_cmd(root, patch=PAUSE), cwd=root,
                                env={**env(), "PAUSE_AT": "10,30"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(root / "paused.10", proc, "step 10")
            stop(first)  # the server is gone for steps 10 to 30 (two evaluations, 4 checkpoints)
            (root / "go.10").write_text("")
            wait_for(root / "paused.30", proc, "step 30")
            server(stack, tmp_path / "server", port)  # back, on the same store
            (root / "go.30").write_text("")
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-3000:]
        assert "tracking: the MLflow server did not answer; training goes on" in out
        assert "tracking: the MLflow server answers again" in out
        steps, status = curve(f"http://127.0.0.1:{port}", "train_loss")
        assert steps == list(range(4, 41, 4)) and status == "FINISHED"  # none lost in the outage
        assert curve(f"http://127.0.0.1:{port}", "val_loss")[0] == [20, 40]


@pytest.mark.slow
def test_a_server_down_at_the_end_exits_75_and_the_retry_resumes_from_the_last_checkpoint(
        tmp_path):
    port = free_port()
    root = project(tmp_path, port)
    with ExitStack() as stack:
        first = server(stack, tmp_path / "server", port)
        proc = subprocess.Popen(pretrain_cmd(root, patch=PAUSE), cwd=root,
                                env={**env(), "PAUSE_AT": "10"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(root / "paused.10", proc, "step 10")
            stop(first)  # and it stays down
            (root / "go.10").write_text("")
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 75, out[-3000:]
        [line] = [l for l in out.splitlines() if l.startswith("error")]
        assert line.startswith("error (transient): ") and "did not answer" in line
        assert "Traceback" not in out
        ckpt = yaml.safe_load((root / "models/checkpoints/gpt/state.json").read_text())
        assert ckpt["step"] == 40  # every checkpoint was written through the outage

        server(stack, tmp_path / "server", port)
        retry = subprocess.run(pretrain_cmd(root), cwd=root, env={**env(), "BIGMODEL_RESUME": "1"},
                               capture_output=True, text=True, timeout=240)
        assert retry.returncode == 0, retry.stderr[-3000:]
        assert "resuming from the checkpoint at step 40" in retry.stdout
        assert "pretrain@gpt: step 1/" not in retry.stdout  # no step was taken again
