"""`bigmodel pretrain` as a real process: SIGKILLed mid-run, `--resume` ends exactly where an
uninterrupted run ends (bitwise, on the CPU with one thread); a diverging run stops with one line,
exit code 2, and keeps its last good checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
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

from bigmodel.io import ASIDE
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
        return json.loads((root / "models/checkpoints/gpt/state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def outcome(root: Path) -> tuple[dict, str, dict]:
    """(metrics without timings, the loss-curve CSV, final weights) of a finished run."""
    metrics = json.loads((root / "reports/metrics/pretrain/gpt.json").read_text())
    for timing in ("tokens_per_s", "seconds"):
        metrics.pop(timing)
    return (metrics, (root / "reports/plots/pretrain/gpt.csv").read_text(),
            load_file(root / "models/pretrain/gpt/model.safetensors"))


# Freezes the process at the n-th matching call of one point of the run (KILL_AT="point:n"),
# leaving its pid in hung.0, so the test SIGKILLs it there. Points inside a checkpoint write
# (io.atomic_path on models/checkpoints/gpt) and the final model write are reached by wrapping
# the calls they make; "draw" is a batch draw, between two optimizer steps.
KILL = """
import os, shutil, torch
import bigmodel.stages.pretrain as stage
import bigmodel.train.trainer as trainer
from bigmodel.io import ASIDE
point, n = os.environ["KILL_AT"].split(":")
n, calls, replace, rmtree = int(n), [0], os.replace, shutil.rmtree

def freeze():
    with open(".hung.0", "w") as f:
        f.write(str(os.getpid()))
    replace(".hung.0", "hung.0")
    time.sleep(600)

def due(name):
    if name == point:
        calls[0] += 1
        return calls[0] == n
    return False

draw = pretrain.WindowSampler.__call__
def drawing(self):
    if due("draw"):
        freeze()
    return draw(self)
pretrain.WindowSampler.__call__ = drawing

save_file = trainer.save_file
def saving_weights(*a, **k):  # the checkpoint's weights are written, the rest is not
    save_file(*a, **k)
    if due("weights"):
        freeze()
trainer.save_file = saving_weights

save = torch.save
def saving(obj, f, *a, **k):  # trainer.pt half written
    name = str(getattr(f, "name", f))
    if name.endswith("trainer.pt") and due("trainer_pt"):
        save(obj, f, *a, **k)
        f.flush()
        os.truncate(name, os.path.getsize(name) // 2)
        freeze()
    return save(obj, f, *a, **k)
torch.save = saving

def replacing(src, dst, *a, **k):  # the old checkpoint is aside, the new one not yet in
    replace(src, dst, *a, **k)
    if str(dst).endswith(ASIDE) and due("swap"):
        freeze()
os.replace = replacing

def removing(path, *a, **k):
    if str(path).endswith(ASIDE):
        if due("settle"):  # the new checkpoint is in, the old one not yet deleted
            freeze()
        if due("half_delete"):  # the old one half deleted
            victim = sorted(p for p in os.listdir(path))[0]
            os.remove(os.path.join(path, victim))
            freeze()
    return rmtree(path, *a, **k)
shutil.rmtree = removing

build_save = stage.registry.save
def saving_final(*a, **k):  # the final model written to its temporary folder only
    build_save(*a, **k)
    if due("final"):
        freeze()
stage.registry.save = saving_final

publish = stage.publish
def publishing(*a, **k):  # the final model in place, MLflow not yet told
    if due("publish"):
        freeze()
    return publish(*a, **k)
stage.publish = publishing
"""


def started_from(output: str) -> int | None:
    """The checkpoint step a `pretrain --resume` said it continued from (None: from step 0)."""
    if "no checkpoint in" in output and "starting from step 0" in output:
        return None
    found = re.search(r"resuming from the checkpoint at step (\d+)", output)
    assert found, f"the run said neither where it resumed nor that it started afresh:\n{output}"
    return int(found.group(1))


def resumed_draw(step: int, checkpoint: int) -> int:
    """Which batch draw of a process resumed at `checkpoint` is the one of `step`."""
    return VAL_BATCHES + (step - checkpoint - 1) + 1


# (where the process is killed, the checkpoint step on disk once the next start has recovered
# what the kill left). 30 steps, a checkpoint every 5; spread over the run's life, six of the
# eleven inside a checkpoint or final-model write.
KILLS = [
    (f"draw:{hang_draw(3)}", None),  # before the first checkpoint: the next run starts at 0
    ("weights:1", None),  # the first checkpoint's weights written, nothing else
    (f"draw:{hang_draw(8)}", 5),
    ("swap:1", 5),  # checkpoint 10: old renamed aside, new not in: the old comes back
    ("settle:1", 10),  # checkpoint 10 in place, the old one beside it: deleted
    ("trainer_pt:1", 10),  # checkpoint 15: its optimizer state half written
    ("half_delete:1", 15),  # checkpoint 15 in, the old one half deleted
    (f"draw:{resumed_draw(21, 15)}", 20),  # after the evaluation and checkpoint at step 20
    ("weights:2", 25),  # checkpoint 30 half written, 25 kept
    ("final:1", 30),  # the last checkpoint written, the final model not yet in place
    ("publish:1", 30),  # the final model in place, the MLflow run not finished
]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_reaches_the_uninterrupted_weights_bitwise(tmp_path):
    reference = tiny_project(tmp_path / "reference")
    done = pretrain(reference)
    assert done.returncode == 0, done.stderr

    killed = tiny_project(tmp_path / "killed")
    ckpt = killed / "models/checkpoints/gpt"
    before = None  # the checkpoint step the next start must find, once it recovered the last kill
    for point, after in KILLS:
        log = killed / f"{point}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(pretrain_cmd(killed, "--resume", patch=KILL), cwd=killed,
                                    env={**env(), "KILL_AT": point}, stdout=out,
                                    stderr=subprocess.STDOUT)
            with reaped(killed, proc):
                [pid] = wait_until_hung(killed, proc)
                os.kill(pid, signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
        (killed / "hung.0").unlink()
        assert started_from(log.read_text()) == before, (point, log.read_text()[-2000:])
        if point == "swap:1":  # the moment the old folder replaced nothing: none in place
            assert not ckpt.exists() and (ckpt.parent / f".gpt{ASIDE}").is_dir()
        before = after
    resumed = pretrain(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert started_from(resumed.stdout) == 30
    metrics, curve, weights = outcome(killed)
    ref_metrics, ref_curve, ref_weights = outcome(reference)
    assert metrics == ref_metrics and metrics["steps"] == 30
    assert curve == ref_curve  # train loss (its log windows straddled kills) and val loss
    assert weights.keys() == ref_weights.keys()
    assert all(weights[k].equal(ref_weights[k]) for k in weights)
    leftovers = [p.name for d in (killed / "models/pretrain/gpt", ckpt.parent)
                 for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_sigterm_stops_a_stage_with_its_mlflow_run_killed_and_nothing_left_held(tmp_path):
    from mlflow.tracking import MlflowClient

    root = tiny_project(tmp_path / "stopped")
    proc = subprocess.Popen(pretrain_cmd(root, patch=HANG.format(draw=hang_draw(12))), cwd=root,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with reaped(root, proc):
        [pid] = wait_until_hung(root, proc)  # at step 12: its checkpoint of step 10 is kept
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("bigmodel").experiment_id])
    assert run.info.status == "KILLED" and run.info.end_time  # not RUNNING for ever
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [4, 8]
    # the stage's lock went with it: the next start takes the project and resumes
    resumed = pretrain(root, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert started_from(resumed.stdout) == 10
    runs = client.search_runs([client.get_experiment_by_name("bigmodel").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_a_diverging_run_exits_2_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # Logging only at the end: the checkpoint due at step 15 is what meets the NaN from step 13.
    root = tiny_project(tmp_path / "nan", log_interval=100)
    result = pretrain(root, patch=NAN.format(step=13))

    assert result.returncode == 2
    ckpt = root / "models/checkpoints/gpt"
    # (MLflow's own warnings and INFO lines may come before it)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: training diverged: loss is nan at step 13 (lower the learning rate); "
        f"the last good checkpoint (step 10) is kept in {ckpt}")
    assert "Traceback" not in result.stderr
    assert checkpoint_step(root) == 10
    weights = load_file(ckpt / "model.safetensors")
    assert all(math.isfinite(float(w.abs().max())) for w in weights.values())
    assert not (root / "models/pretrain/gpt/model.safetensors").exists()  # no final model either


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "models").rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_refused_write_ends_with_one_line_and_keeps_the_previous_model_and_checkpoint(tmp_path):
    # A model whose optimizer state (trainer.pt, twice the weights) is over a file-size limit
    # its weights and the tracking store stay under: the checkpoint write at step 5 is refused.
    import resource

    root = tiny_project(tmp_path / "disk", n_embd=256, n_head=4, max_steps=10,
                        checkpoint_interval=5, eval_interval=5)
    assert pretrain(root).returncode == 0
    before = files_of(root)
    weights = len(before["models/checkpoints/gpt/model.safetensors"])
    limit = weights * 3 // 2
    assert len(before["models/checkpoints/gpt/trainer.pt"]) > limit
    assert (root / "mlflow.db").stat().st_size < limit // 2

    def file_size_limit() -> None:  # writes past it fail with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    refused = subprocess.run(pretrain_cmd(root), cwd=root, env=env(), capture_output=True,
                             text=True, timeout=300, preexec_fn=file_size_limit)
    assert refused.returncode == 74, refused.stderr
    assert "Traceback" not in refused.stderr
    [line] = [l for l in refused.stderr.splitlines() if l.startswith("error")]
    assert line == (f"error: {root / 'models/checkpoints/gpt'}: the filesystem refused the write "
                    f"(over the file-size limit); free some space and run again (the previous "
                    f"gpt, if any, is kept)")
    assert files_of(root) == before  # the model and checkpoint of the first run, byte for byte
