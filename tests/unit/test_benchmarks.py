"""The benchmarks themselves: bad input, the same-time run keeping its budget, the GPU check
on tiny CPU shapes (their figures are recorded in benchmarks/RESULTS.md)."""

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks/pretrain_vs_nanogpt.py"), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_nanogpt_benchmark_without_the_peer_says_where_it_looked(tmp_path):
    done = run("--peer", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: the nanoGPT peer is not at {tmp_path / 'nowhere' / 'run_nanogpt.sh'}: this "
        f"benchmark runs it beside bigmodel (pass --peer DIR, the folder holding run_nanogpt.sh)"]


def test_the_nanogpt_benchmark_refuses_a_bad_setting_before_running_anything(tmp_path):
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "run_nanogpt.sh").write_text("exit 1\n")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100)
    done = run("--peer", str(peer), "--data", str(text), "--set", "precision=bf32")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "precision" in line
    done = run("--peer", str(peer), "--data", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "missing.txt: not found" in done.stderr


def test_the_bf16_step_breakdown_runs_or_says_why_not():
    from bigmodel.train.trainer import cpu_has_bf16

    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bf16_step.py"), "--steps", "10"],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=REPO / "benchmarks")
    if not cpu_has_bf16():  # the Trainer would run fp32: the script refuses to measure that
        assert done.returncode == 1 and "no bf16 units" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    [phases] = [ln for ln in done.stdout.splitlines() if re.match(r"\| [\d.]+ \| [\d.]+ \|", ln)]
    assert len(phases.split(" | ")) == 8
    assert "| flat buffer (Trainer) |" in done.stdout and "| bf16 flash |" in done.stdout
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/bf16_step.py"), "--steps", "3"],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=REPO / "benchmarks")
    assert done.returncode == 2 and "at least 10" in done.stderr


def test_the_gpu_check_runs_end_to_end_on_tiny_shapes():
    # the GPU path itself needs a GPU; this keeps the script that measures it working
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke",
                           "--steps", "10"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith(("| gpt", "| bert", "| resnet"))]
    assert [r.split(" | ")[0] for r in rows] == ["| gpt", "| bert", "| resnet"]
    assert all(re.search(r"\| [\d,]+ (tokens|images)/s \|", r) for r in rows)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--only", "vit"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "unknown --only vit" in done.stderr


def test_the_same_time_run_ends_inside_its_budget(tmp_path):
    # its length is re-planned as it goes; a step planned as the last must stay the last
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from pretrain_vs_nanogpt import prepare
    finally:
        sys.path.pop(0)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                            for i in range(3000)))
    prepare(text, tmp_path)
    started = time.time()
    done = run("--worker", "time", "--prepared", str(tmp_path), "--started", repr(started),
               "--seconds", "10")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["steps"] > 30  # re-planned past the first log intervals
    assert result["wall_s"] <= 10.5 and time.time() - started < 40  # the whole-split score after
    assert math.isfinite(result["est_val_loss"]) and result["est_val_loss"] < 4.0
