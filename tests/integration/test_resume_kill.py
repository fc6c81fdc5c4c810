"""`bigmodel pretrain` as a real process: SIGKILLed mid-run, `--resume` ends exactly where an
uninterrupted run ends (bitwise, on the CPU with one thread); a diverging run stops with one line,
exit code 2, and keeps its last good checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import stage_env

VAL_BATCHES = 2
PRETRAIN = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8,
            "max_steps": 30, "warmup_steps": 5, "eval_interval": 10, "eval_batches": VAL_BATCHES,
            "log_interval": 4, "checkpoint_interval": 5, "device": "cpu"}

# Runs `bigmodel pretrain` after wrapping one function of the stage, then exits like the CLI.
SCRIPT = """
import sys, time
from bigmodel.objectives import clm as pretrain

{patch}

from bigmodel.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Freezes the process (each rank) at its `draw`-th batch (see hang_draw), leaving its pid in
# hung.<rank>, so the test kills it at a known point.
HANG = """
import os
draw, calls = pretrain.WindowSampler.__call__, [0]
def hanging(self):
    calls[0] += 1
    if calls[0] == {draw}:
        rank = os.environ.get("RANK", "0")
        with open(f".hung.{{rank}}", "w") as f:
            f.write(str(os.getpid()))
        os.replace(f".hung.{{rank}}", f"hung.{{rank}}")
        time.sleep(600)
    return draw(self)
pretrain.WindowSampler.__call__ = hanging
"""

# The training loss turns NaN from step NAN_FROM on (evaluation, in eval mode, is left alone).
NAN = """
loss, calls = pretrain.lm_loss, [0]
def poisoned(model, batch):
    calls[0] += model.training
    return loss(model, batch) * (float("nan") if calls[0] >= {step} else 1.0)
pretrain.lm_loss = poisoned
"""


def hang_draw(step: int, grad_accum: int = 1) -> int:
    """Which batch draw is the first micro-batch of `step` (the validation batches come first)."""
    return VAL_BATCHES + (step - 1) * grad_accum + 1


def tiny_project(root: Path, **pretrain: object) -> Path:
    """A folder holding what the pretrain stage reads: a small tokenizer, token shards of
    tokenized code, and a params.yaml (defaults but for a tiny model)."""
    from bigmodel.text.tokenizers import train_bpe as train

    texts = [f"def f{i}(a, b):\n    \"\"\"Return {i} times the sum.\"\"\"\n    return {i} * (a + b)\n"
             f"class Queue{i}:\n    def put(self, item): self.items.append(item)\n"
             for i in range(120)]
    tok = train(iter(texts), vocab_size=300, min_frequency=1)
    (root / "models" / "tokenizer" / "bpe").mkdir(parents=True)
    tok.save(str(root / "models" / "tokenizer" / "bpe" / "tokenizer.json"))
    tokens = root / "data" / "tokens" / "gpt"
    tokens.mkdir(parents=True)
    splits = {}
    for split, part in (("train", texts[:100]), ("val", texts[100:])):
        encoded = [e.ids for e in tok.encode_batch(part)]
        ids = np.array([i for e in encoded for i in e], dtype=np.uint16)
        ids.tofile(tokens / f"{split}.bin")
        np.save(tokens / f"{split}_docs.npy", np.cumsum([0] + [len(e) for e in encoded[:-1]]))
        splits[split] = {"tokens": len(ids), "bytes": sum(len(t.encode()) for t in part)}
    (tokens / "meta.json").write_text(json.dumps(
        {"dtype": "uint16", "vocab_size": tok.get_vocab_size(), "splits": splits}))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "pretrain": {"gpt": {"family": "gpt", "objective": "clm", "corpus": "stdlib",
                             "tokenizer": "bpe", **PRETRAIN, **pretrain}}, "finetune": {}}))
    return root


def pretrain_cmd(root: Path, *args: str, patch: str = "") -> list[str]:
    head = [sys.executable, "-c", SCRIPT.format(patch=patch)] if patch else [
        sys.executable, "-m", "bigmodel.cli"]
    return [*head, "pretrain", "--params", str(root / "params.yaml"), *args]


def env() -> dict[str, str]:
    # one thread: bitwise reproducible on the CPU, and polite on a shared machine
    return {**stage_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pretrain(root: Path, *args: str, patch: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_cmd(root, *args, patch=patch), cwd=root, env=env(),
                          capture_output=True, text=True, timeout=300)


@contextmanager
def reaped(root: Path, proc: subprocess.Popen) -> Iterator[None]:
    """Whatever happens in the block, no frozen training process outlives the test."""
    try:
        yield
    finally:
        for marker in root.glob("hung.*"):
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(marker.read_text()), signal.SIGKILL)
        if proc.poll() is None:
            proc.terminate()  # torchrun passes it on to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until_hung(root: Path, proc: subprocess.Popen, ranks: int = 1) -> list[int]:
    """The pids of the `ranks` processes frozen by HANG."""
    markers = [root / f"hung.{rank}" for rank in range(ranks)]
    deadline = time.monotonic() + 120
    while not all(m.exists() for m in markers):
        assert proc.poll() is None, f"training ended with {proc.returncode} before the kill"
        assert time.monotonic() < deadline, "training did not reach the kill point in 120 s"
        time.sleep(0.05)
    return [int(m.read_text()) for m in markers]


def checkpoint_step(root: Path) -> int | None:
    try:
        return json.loads((root / "models/pretrain/gpt/checkpoint/state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def outcome(root: Path) -> tuple[dict, str, dict]:
    """(metrics without timings, the loss-curve CSV, final weights) of a finished run."""
    metrics = json.loads((root / "reports/metrics/pretrain/gpt.json").read_text())
    for timing in ("tokens_per_s", "seconds"):
        metrics.pop(timing)
    return (metrics, (root / "reports/plots/pretrain/gpt.csv").read_text(),
            load_file(root / "models/pretrain/gpt/model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_loss_and_weights_bitwise(tmp_path):
    reference = tiny_project(tmp_path / "reference")
    done = pretrain(reference)
    assert done.returncode == 0, done.stderr

    killed = tiny_project(tmp_path / "killed")
    proc = subprocess.Popen(pretrain_cmd(killed, patch=HANG.format(draw=hang_draw(18))),
                            cwd=killed, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with reaped(killed, proc):
        [pid] = wait_until_hung(killed, proc)  # in step 18: steps 16, 17 are taken, not saved
        assert checkpoint_step(killed) == 15
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (killed / "models/pretrain/gpt/model.safetensors").exists()

    resumed = pretrain(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    metrics, curve, weights = outcome(killed)
    ref_metrics, ref_curve, ref_weights = outcome(reference)
    assert metrics == ref_metrics and metrics["steps"] == 30
    assert curve == ref_curve  # train loss (its log window straddled the kill) and val loss
    assert weights.keys() == ref_weights.keys()
    assert all(weights[k].equal(ref_weights[k]) for k in weights)
    assert [p.name for p in (killed / "models/pretrain/gpt").iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_a_diverging_run_exits_2_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # Logging only at the end: the checkpoint due at step 15 is what meets the NaN from step 13.
    root = tiny_project(tmp_path / "nan", log_interval=100)
    result = pretrain(root, patch=NAN.format(step=13))

    assert result.returncode == 2
    ckpt = root / "models/pretrain/gpt/checkpoint"
    # (MLflow's own warnings and INFO lines may come before it)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: training diverged: loss is nan at step 13 (lower the learning rate); "
        f"the last good checkpoint (step 10) is kept in {ckpt}")
    assert "Traceback" not in result.stderr
    assert checkpoint_step(root) == 10
    weights = load_file(ckpt / "model.safetensors")
    assert all(math.isfinite(float(w.abs().max())) for w in weights.values())
    assert not (root / "models/pretrain/gpt/model.safetensors").exists()  # no final model either
