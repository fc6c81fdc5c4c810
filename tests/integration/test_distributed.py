"""Several processes on the CPU: `bigmodel pretrain --nproc 2` (two gloo processes under
torchrun), with DDP replicas or FSDP shards, follows the single-process loss curve at the same
global batch, rank 0 alone logs and writes, and a run whose processes are SIGKILLed resumes from
rank 0's checkpoint: on both ranks, or (a full state dict gathered from FSDP shards) in one
process."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

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
# fp32: bf16 master weights train in one process only (a torchrun run falls back to fp32)
SETTINGS = {"grad_accum": 2, "log_interval": 2, "precision": "fp32"}
# Same windows, same weights at the start; only the order of float sums differs (measured:
# at most 1e-6 apart over 30 steps).
TOLERANCE = 1e-4


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Each rank notes how many parameter values it holds when training starts.
COUNT = """
import os
from bigmodel.train import trainer
fit = trainer.Trainer.fit
def counting(self, *args, **kwargs):
    held = sum(trainer.local(p).numel() for p in self.model.parameters())
    with open(f"held.{os.environ.get('RANK', '0')}", "w") as f:
        f.write(str(held))
    return fit(self, *args, **kwargs)
trainer.Trainer.fit = counting
"""


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:  # noqa: ANN001
    root = tiny_project(tmp_path_factory.mktemp("single"), **SETTINGS)
    done = pretrain(root, patch=COUNT)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def single_curve(single: Path) -> dict[int, dict[str, float]]:
    return curve(single)


def curve(root: Path) -> dict[int, dict[str, float]]:
    with open(root / "reports/plots/pretrain/gpt.csv") as f:
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
    return client.search_runs([exp.experiment_id], "tags.`bigmodel.stage` = 'pretrain@gpt'")


def registered_versions(root: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [str(v.version) for v in client.search_model_versions("name='bigmodel-gpt'")]


def done_lines(log_dir: Path, stage: str) -> dict[int, list[str]]:
    """Each local rank's `<stage>: done` lines, from the stdout that torchrun's `--tee` keeps
    apart per rank (<log_dir>/<run id>/attempt_0/<local rank>/stdout.log)."""
    return {int(f.parent.name): [ln for ln in f.read_text().splitlines()
                                 if ln.startswith(f"{stage}: done")]
            for f in log_dir.glob("*/attempt_0/*/stdout.log")}


def held(root: Path) -> list[int]:
    return [int((root / f"held.{rank}").read_text()) for rank in range(len(list(root.glob("held.*"))))]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_follow_the_single_process_loss_curve(tmp_path, single, single_curve,
                                                                 parallel):
    root = tiny_project(tmp_path / parallel, **SETTINGS, parallel=parallel)
    script = tmp_path / "counting_pretrain.py"
    script.write_text(SCRIPT.format(patch=COUNT))
    logs = tmp_path / "torchrun-logs"
    done = subprocess.run(  # torchrun as `--nproc 2` runs it, on the script that counts; every
        # rank's output kept, each in its own file (not rank 0's alone, as `--nproc` shows)
        [*TORCHRUN, "--tee", "3", "--log-dir", str(logs), str(script), "pretrain",
         "--params", str(root / "params.yaml")],
        cwd=root, env=env(), capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 0, done.stderr
    assert_same_curve(curve(root), single_curve)
    [total] = held(single)
    if parallel == "ddp":  # a full replica in each process
        assert held(root) == [total, total]
    else:  # each process holds its shard: about half, and together the whole model once
        assert sum(held(root)) == total and max(held(root)) < 0.6 * total
    # the final model (gathered from the shards under FSDP) is the single process's
    weights, want = (load_file(r / "models/pretrain/gpt/model.safetensors") for r in (root, single))
    assert weights.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(weights[name], tensor, atol=TOLERANCE, rtol=0, msg=name)
    # rank 0 alone: one MLflow run, one registered version, one summary line (the other rank
    # trains to the end and notes only its step)
    assert len(pretrain_runs(root)) == 1 and registered_versions(root) == ["1"]
    lines = done_lines(logs, "pretrain@gpt")
    assert sorted(lines) == [0, 1], lines
    [summary], [other] = lines[0], lines[1]
    assert re.fullmatch(r"pretrain@gpt: done in [\d.]+s  step 30: train loss .*"
                        r"; registered bigmodel-gpt v1", summary), summary
    assert re.fullmatch(r"pretrain@gpt: done in [\d.]+s  rank 1: step 30", other), other
    state = json.loads((root / "models/checkpoints/gpt/state.json").read_text())
    assert (state["step"], state["world_size"], state["parallel"]) == (30, 2, parallel)


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "resume_nproc"), [("ddp", 2), ("fsdp", 1)])
def test_a_run_killed_on_both_ranks_resumes_on_the_single_process_curve(
        tmp_path, single_curve, parallel, resume_nproc):
    root = tiny_project(tmp_path / parallel, **SETTINGS, parallel=parallel)
    script = tmp_path / "hanging_pretrain.py"
    hang = HANG.format(draw=hang_draw(18, SETTINGS["grad_accum"]))
    script.write_text(SCRIPT.format(patch=hang))
    torchrun = subprocess.Popen(
        [*TORCHRUN, str(script), "pretrain", "--params", str(root / "params.yaml")],
        cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with reaped(root, torchrun):
        pids = wait_until_hung(root, torchrun, ranks=2)  # both in step 18
        assert checkpoint_step(root) == 15
        for pid in pids:  # both training processes die at once, as on a lost machine
            os.kill(pid, signal.SIGKILL)
        assert torchrun.wait(timeout=60) != 0

    # FSDP's checkpoint is a full state dict: one process resumes it
    resumed = pretrain(root, "--nproc", str(resume_nproc), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_curve(curve(root), single_curve)  # steps 1-15 come from the checkpoint
    assert len(pretrain_runs(root)) == 2 and registered_versions(root) == ["1"]
    # `--nproc` shows rank 0's console alone: one done line, the summary (not "rank 1: ...")
    [line] = [ln for ln in resumed.stdout.splitlines() if ln.startswith("pretrain@gpt: done")]
    assert "  step 30: train loss " in line and line.endswith("; registered bigmodel-gpt v1")
