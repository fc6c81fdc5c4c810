"""DDP on the CPU: `bigmodel pretrain --nproc 2` (two gloo processes under torchrun) follows the
single-process loss curve at the same global batch, rank 0 alone logs and writes, and a run whose
processes are SIGKILLed resumes on both ranks from rank 0's checkpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.test_resume_kill import (
    HANG,
    SCRIPT,
    checkpoint_step,
    env,
    hang_draw,
    pretrain,
    reaped,
    tiny_project,
    wait_until_hung,
)

# Every run here: global batch 8 (4 windows per rank under DDP), 2 micro-steps per step (so
# DDP skips the all-reduce on the first), the train loss logged every 2 steps.
SETTINGS = {"grad_accum": 2, "log_interval": 2}
# Same windows, same weights at the start; only the order of float sums differs (measured:
# at most 1e-6 apart over 30 steps).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def single_curve(tmp_path_factory) -> dict[int, dict[str, float]]:  # noqa: ANN001
    root = tiny_project(tmp_path_factory.mktemp("single"), **SETTINGS)
    done = pretrain(root)
    assert done.returncode == 0, done.stderr
    return curve(root)


def curve(root: Path) -> dict[int, dict[str, float]]:
    with open(root / "reports/plots/pretrain_loss.csv") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v and k != "step"}
                for r in csv.DictReader(f)}


def assert_same_curve(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and max(want) == 30
    for step, row in want.items():
        assert got[step].keys() == row.keys()
        assert got[step] == pytest.approx(row, abs=TOLERANCE), f"step {step}"


def pretrain_runs(root: Path) -> list:  # noqa: ANN001
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    return client.search_runs([exp.experiment_id], "tags.`bigmodel.stage` = 'pretrain'")


def registered_versions(root: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [str(v.version) for v in client.search_model_versions("name='bigmodel-gpt'")]


@pytest.mark.slow
def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path, single_curve):
    root = tiny_project(tmp_path / "ddp", **SETTINGS)
    done = pretrain(root, "--nproc", "2")

    assert done.returncode == 0, done.stderr
    assert_same_curve(curve(root), single_curve)
    # rank 0 alone: one MLflow run, one registered version, one summary line
    assert len(pretrain_runs(root)) == 1 and registered_versions(root) == ["1"]
    assert done.stdout.count("pretrain: done") == 1
    state = json.loads((root / "models/pretrain/checkpoint/state.json").read_text())
    assert (state["step"], state["world_size"]) == (30, 2)


@pytest.mark.slow
def test_both_ranks_resume_after_sigkill_and_stay_on_the_single_process_curve(
        tmp_path, single_curve):
    root = tiny_project(tmp_path / "ddp", **SETTINGS)
    script = tmp_path / "hanging_pretrain.py"
    hang = HANG.format(draw=hang_draw(18, SETTINGS["grad_accum"]))
    script.write_text(SCRIPT.format(patch=hang))
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), "pretrain", "--params", str(root / "params.yaml")],
        cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with reaped(root, torchrun):
        pids = wait_until_hung(root, torchrun, ranks=2)  # both in step 18
        assert checkpoint_step(root) == 15
        for pid in pids:  # both training processes die at once, as on a lost machine
            os.kill(pid, signal.SIGKILL)
        assert torchrun.wait(timeout=60) != 0

    resumed = pretrain(root, "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_curve(curve(root), single_curve)  # steps 1-15 come from the checkpoint
    assert len(pretrain_runs(root)) == 2 and registered_versions(root) == ["1"]
