"""One run at a time in a workspace, and params.yaml always put back: a second run started
beside a first (a real process holding the lock) stops with one line naming it; a run the
first started joins it; a killed holder leaves no stale lock; a run with overrides that fails
restores params.yaml, and a backup a killed run left stops the next one."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from bigmodel import cli, config, workspace
from bigmodel.errors import BigModelError

HOLD = """
import sys, time
from pathlib import Path
from bigmodel import workspace
with workspace.held(Path(sys.argv[1]), "pipeline"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):  # noqa: ANN001, ANN201
    """A process holding tmp_path's workspace as a pipeline would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"  # type: ignore[union-attr]
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def params_file(root: Path) -> Path:
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 7}))
    return root / "params.yaml"


def run_cli(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = cli.main(list(args))
    return code, err.getvalue()


def test_a_stage_started_beside_a_running_pipeline_stops_with_one_line(tmp_path, holder):  # noqa: ANN001
    path = params_file(tmp_path)
    code, err = run_cli("promote", "--params", str(path))
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {tmp_path}: pipeline (pid {holder.pid}, since ")
    assert line.endswith(f"is running in this workspace; wait for it to end or stop it "
                         f"(lock: {workspace.lock_file(tmp_path)})")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):  # noqa: ANN001
    with pytest.raises(BigModelError, match="pipeline"):
        with workspace.held(tmp_path, "pretrain@gpt"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with workspace.held(tmp_path, "pretrain@gpt"):
        assert workspace.read_holder(workspace.lock_file(tmp_path))["what"] == "pretrain@gpt"


def test_the_processes_a_run_starts_join_it_and_others_do_not(tmp_path):  # noqa: ANN001
    probe = ("import sys; from pathlib import Path; from bigmodel import workspace\n"
             "with workspace.held(Path(sys.argv[1]), 'stage'): print('ran')")
    with workspace.held(tmp_path, "pipeline"):
        joined = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                                text=True, timeout=60)  # inherits the run's token
        outsider = subprocess.run([sys.executable, "-c", probe, str(tmp_path)],
                                  capture_output=True, text=True, timeout=60,
                                  env={k: v for k, v in os.environ.items()
                                       if k != workspace.TOKEN_ENV})
    assert joined.returncode == 0 and joined.stdout.strip() == "ran", joined.stderr
    assert outsider.returncode != 0 and "pipeline (pid" in outsider.stderr
    assert workspace.TOKEN_ENV not in os.environ  # the token leaves with the run


def test_a_failing_run_with_overrides_puts_params_yaml_back(tmp_path):  # noqa: ANN001
    path = params_file(tmp_path)
    original = path.read_bytes()
    with pytest.raises(RuntimeError, match="stage failed"):
        with config.overridden(path, {"seed": 11}) as params:
            assert params.seed == 11 and "seed: 11" in path.read_text()
            raise RuntimeError("stage failed")
    assert path.read_bytes() == original
    assert not config.backup_of(path).exists()


def test_a_backup_left_by_a_killed_run_stops_the_next_run_with_one_line(tmp_path):  # noqa: ANN001
    # a real run with overrides, killed while it holds params.yaml rewritten
    path = params_file(tmp_path)
    original = path.read_bytes()
    script = ("import sys, time; from bigmodel import config\n"
              "with config.overridden(sys.argv[1], {'seed': 11}):\n"
              "    print('rewritten', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "rewritten"  # type: ignore[union-attr]
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    backup = config.backup_of(path)
    assert backup.read_bytes() == original and b"seed: 11" in path.read_bytes()
    from flows.pipeline import run_main

    err = io.StringIO()
    started = []
    with redirect_stderr(err):
        code = run_main(lambda: started.append(1) or [], lambda _: [], params_file=path)
    assert code == 2 and started == []
    with pytest.raises(BigModelError) as refused:
        with config.overridden(path, {"seed": 12}):
            pass
    assert str(refused.value) == (f"{backup} exists: an earlier run with overrides was "
                                  f"interrupted; put it back with `mv {backup} {path}` (or "
                                  f"delete it) first")
    assert backup.read_bytes() == original  # nothing overwritten


def test_a_checkpoint_is_tied_to_the_training_params_not_the_served_limits(tmp_path):  # noqa: ANN001
    from bigmodel.stages.pretrain import training_identity
    from tests.conftest import REPO

    (tmp_path / "meta.json").write_text("{}")
    base = training_identity(config.load(REPO / "params.yaml"), "gpt", tmp_path)
    served = config.load(REPO / "params.yaml", ["serving.max_rows=8", "tracking.model_prefix=x-"])
    trained = config.load(REPO / "params.yaml", ["pretrain.gpt.n_embd=64"])
    assert training_identity(served, "gpt", tmp_path) == base
    assert training_identity(trained, "gpt", tmp_path) != base
    assert "seed" in base["params"] and "pretrain.gpt" in base["params"]
