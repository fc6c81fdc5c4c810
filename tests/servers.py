"""Real server processes on 127.0.0.1 for the integration tests: start, wait for health, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (server and its workers), SIGKILL what is left after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its children may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


@contextmanager
def running(cmd: list[str], log_dir: Path, env: dict[str, str], health: str | None = None,
            cwd: Path | None = None, timeout_s: float = 90) -> Iterator[subprocess.Popen]:
    """Start `cmd` in its own process group, logging to log_dir/<name>.log; when `health` is
    given, wait until that URL answers 200 (fail with the log's tail if it never does)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{Path(cmd[0]).name}-{cmd[1] if len(cmd) > 1 else 'run'}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=cwd or log_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while health and not answers(health):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {proc.returncode}" if proc.returncode is not None
                       else f"did not answer {health} within {timeout_s:.0f} s")
                pytest.fail(f"{' '.join(cmd[:3])} {why}; log:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.25)
        yield proc
    finally:
        stop(proc)
        log.close()
