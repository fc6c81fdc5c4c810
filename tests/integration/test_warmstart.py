"""The warm stage server (bigmodel.warmstart): a command run through it behaves as the same
command run alone (output, input, exit status, directory, environment, signals), and a server
that is missing or goes away costs nothing but the warm start."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel import warmstart

REPO = Path(__file__).resolve().parents[2]
COMMAND = str(Path(sys.executable).parent / "bigmodel")
TARGET = "tests.integration.warm_target:main"


@pytest.fixture
def server(monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    with warmstart.serving(TARGET) as proc:
        yield proc


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def wait_for(predicate, seconds: float = 30.0) -> bool:  # noqa: ANN001
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_command_runs_in_a_fork_of_the_warm_server_as_it_would_alone(server, tmp_path):  # noqa: ANN001
    env = {**os.environ, "WARM_MARKER": "from the command"}
    proc = subprocess.run([COMMAND, "show", "3"], cwd=tmp_path, env=env, input="some input",
                          capture_output=True, text=True, timeout=120)
    seen = json.loads(proc.stdout)
    assert proc.returncode == 3
    assert proc.stderr == "to stderr\n"
    assert seen["ppid"] == server.pid and seen["forked"] is True
    assert seen["cwd"] == str(tmp_path) and seen["marker"] == "from the command"
    assert seen["argv"] == [COMMAND, "show", "3"] and seen["stdin"] == "some input"
    # and the fork found torch already imported by the server: the start it saves
    assert wait_for(lambda: json.loads(subprocess.run(
        [COMMAND, "show"], env=env, capture_output=True, text=True, input="").stdout)["torch"])


def test_errors_exit_as_they_would_alone(server):  # noqa: ANN001
    usage = subprocess.run([COMMAND, "usage"], capture_output=True, text=True, timeout=120)
    assert (usage.returncode, usage.stderr) == (1, "usage: a message for the user\n")
    bug = subprocess.run([COMMAND, "bug"], capture_output=True, text=True, timeout=120)
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and bug.stderr.strip().endswith("RuntimeError: a bug in a stage")
    # the server is still there for the next one
    assert subprocess.run([COMMAND, "show"], capture_output=True, text=True,
                          input="").returncode == 0


def started(server) -> subprocess.Popen:  # noqa: ANN001
    proc = subprocess.Popen([COMMAND, "wait"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "waiting\n"
    assert wait_for(lambda: len(children_of(server.pid)) == 1)
    return proc


def test_a_signal_to_the_command_reaches_its_stage_and_the_command_dies_of_it(server):  # noqa: ANN001
    proc = started(server)
    [child] = children_of(server.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert wait_for(lambda: not children_of(server.pid))
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()


def test_a_killed_command_takes_its_stage_with_it(server):  # noqa: ANN001
    proc = started(server)
    proc.kill()
    proc.wait(timeout=30)
    assert wait_for(lambda: not children_of(server.pid))


def test_a_server_stopped_under_a_running_stage_stops_it_with_sigterm(server):  # noqa: ANN001
    proc = started(server)
    [child] = children_of(server.pid)
    server.terminate()  # what the flow does at its end
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert server.wait(timeout=30) == 0
    assert wait_for(lambda: not Path(f"/proc/{child}").exists())


def test_a_server_killed_under_a_running_stage_makes_it_a_transient_failure(server):  # noqa: ANN001
    proc = subprocess.Popen([COMMAND, "wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "waiting\n"
    [child] = children_of(server.pid)
    server.kill()  # its stages die with it
    assert proc.wait(timeout=30) == 75
    assert "warm stage server went away" in proc.stderr.read()
    assert wait_for(lambda: not Path(f"/proc/{child}").exists())


def test_without_a_server_the_command_runs_by_itself(tmp_path):  # noqa: ANN001
    params = tmp_path / "params.yaml"
    params.write_text("seed: [not a number]\n")
    for env in ({}, {warmstart.WARM_ENV: str(tmp_path / "no-such-socket")}):
        proc = subprocess.run([COMMAND, "check", "--params", str(params)],
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_the_switch_turns_the_server_off(monkeypatch):  # noqa: ANN001
    monkeypatch.setenv(warmstart.SWITCH_ENV, "0")
    monkeypatch.delenv(warmstart.WARM_ENV, raising=False)
    with warmstart.serving(TARGET) as proc:
        assert proc is None and warmstart.WARM_ENV not in os.environ


def test_a_request_that_is_not_a_commands_is_dropped_and_the_server_serves_on(server):  # noqa: ANN001
    import socket

    for junk in (b"\x00\x00\x00\x05{}}}}", b"\x00\x00\x00\x02{}", b"xy"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.environ[warmstart.WARM_ENV])
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""  # closed, nothing started
    assert server.poll() is None
    proc = subprocess.run([COMMAND, "show"], capture_output=True, text=True, input="")
    assert json.loads(proc.stdout)["ppid"] == server.pid
