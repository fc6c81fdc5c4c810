"""One run at a time in a workspace: the lock a pipeline, a retrain or a stage holds for its run.

Two runs in one project folder would race on params.yaml (a run with overrides rewrites it),
on checkpoints and on outputs. Whoever starts first takes `.bigmodel/run.lock` (an OS file
lock: a killed holder releases it with its last file descriptor, so no stale lock survives a
crash) and writes who it is into it; a second run stops at once with one line naming the first.
The stages a pipeline starts (through DVC, in processes of their own) are part of its run: they
find the holder's token in their environment and go ahead; so do torchrun's workers, whose
rank 0 holds the workspace for them all.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bigmodel.errors import BigModelError

TOKEN_ENV = "BIGMODEL_RUN_TOKEN"
RESUME_ENV = "BIGMODEL_RESUME"  # set by the flow when it retries a stage: pretraining resumes


def lock_file(root: Path) -> Path:
    return root / ".bigmodel" / "run.lock"


@contextmanager
def held(root: Path, what: str) -> Iterator[None]:
    """Hold the workspace for `what` ("pipeline", "pretrain@gpt"), or join the run that holds
    it when this process was started by it (its token is in the environment)."""
    if int(os.environ.get("RANK", "0") or 0) > 0:
        yield  # a torchrun worker: rank 0 holds the workspace for them all
        return
    path = lock_file(Path(root).resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            if holder.get("token") and holder.get("token") == os.environ.get(TOKEN_ENV):
                yield  # a stage of the run that holds the lock
                return
            raise BigModelError(f"{root}: {describe(holder)} is running in this workspace; "
                                f"wait for it to end or stop it (lock: {path})") from None
        token = uuid.uuid4().hex
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"what": what, "pid": os.getpid(), "token": token,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)[:300]}).encode())
        old = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = token  # inherited by the processes this run starts
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = old
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def read_holder(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def describe(holder: dict[str, str]) -> str:
    if not holder:
        return "another bigmodel run"
    return f"{holder.get('what', 'a run')} (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
