"""Warm stage processes: a flow's stages start as forks of one process that has already
imported torch, MLflow and bigmodel, instead of importing them anew (3-5 s a stage on two
cores, 32 stages in the default pipeline; benchmarks/RESULTS.md).

The flow starts `serve(socket)` in a process of its own (`serving()`), and puts the socket's
path in the stage processes' environment (BIGMODEL_WARM). DVC still runs each stage's command,
`bigmodel <stage> ...`; that console command (`main` here) sees the variable, hands the server
its argv, working directory, environment and its stdin/stdout/stderr (the descriptors
themselves, over the socket), and waits. The server forks; the child takes all of those on
and runs `bigmodel.cli.main` as the command would have. The command exits with the child's
exit status (a child killed by a signal kills the command with the same signal), forwards
SIGINT, SIGTERM and SIGHUP to the child, and if the command dies, the server kills the child.
If the server dies, its children die with it and the command exits 75 (transient: the flow's
retry resumes). Whatever the server cannot do (not started yet, gone, refused), the command
does itself in this process, as without a server.

The server stays single-threaded, and imports nothing that starts a thread or touches a device,
so forking it is safe; each child reseeds Python's, NumPy's and torch's default generators, as
a new process would have. Without BIGMODEL_WARM nothing here runs: `bigmodel` by hand, under
`dvc repro` or in tests is an ordinary process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bigmodel.errors import EXIT_TRANSIENT

WARM_ENV = "BIGMODEL_WARM"
SWITCH_ENV = "BIGMODEL_WARM_START"  # 0: the flow's stages start in interpreters of their own
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Imported before the first fork (what a source or prepare stage needs), then one by one while
# no stage is waiting. shap reads NUMBA_DISABLE_JIT once, at its import: set as the explain
# stages set it (bigmodel.tasks.seq_cls).
FIRST = ("bigmodel.cli", "bigmodel.config", "bigmodel.tracking")
LATER = ("numpy", "torch", "bigmodel.train.trainer", "bigmodel.stages.source",
         "bigmodel.stages.prepare", "bigmodel.stages.tokenizer", "bigmodel.stages.tokenize",
         "bigmodel.stages.pretrain", "bigmodel.stages.evaluate_pretrain",
         "bigmodel.stages.finetune", "bigmodel.stages.evaluate", "bigmodel.stages.explain",
         "bigmodel.tasks.seq_cls", "shap")


# --- the command's side ---

def main() -> None:
    """The `bigmodel` console command."""
    address = os.environ.get(WARM_ENV)
    if address:
        code = run_warm(address, sys.argv)
        if code is not None:
            sys.exit(code)
    from bigmodel.cli import main as cli_main

    sys.exit(cli_main())


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        sock.sendall(frame)


def _recv(sock: socket.socket) -> dict | None:
    """One framed message; None when the other side closed first."""
    buf = b""
    while len(buf) < 4:
        chunk = sock.recv(4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    size = struct.unpack("!I", buf[:4])[0]
    data = buf[4:]
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def run_warm(address: str, argv: list[str]) -> int | None:
    """Run the command in a fork of the server at `address`: its exit status, or None when the
    server did not take it (the caller runs it itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        umask = os.umask(0)
        os.umask(umask)
        std = [fd for fd in (0, 1, 2) if _is_open(fd)]  # a closed one stays closed in the stage
        _send(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                     "std": std}, std)
        started = _recv(sock)
    except OSError:
        started = None
    if not started or "pid" not in started:
        sock.close()
        return None
    pid = int(started["pid"])
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: _forward(pid, s))
    try:  # a forwarded signal's handler runs in between; the wait goes on (PEP 475)
        ended = _recv(sock)
    except OSError:
        ended = None
    if ended is None:
        print("error (transient): the warm stage server went away while the stage ran; the "
              "stage can be retried", file=sys.stderr)
        return EXIT_TRANSIENT
    if "signal" in ended:  # die as the child died
        sig = int(ended["signal"])
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return int(ended["exit"])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# --- the server's side ---

CLI = "bigmodel.cli:main"
forked = False  # True in a stage forked from the server (tracked on its MLflow run)


@contextlib.contextmanager
def serving(target: str = CLI) -> Iterator[subprocess.Popen | None]:
    """A warm stage server for the duration of the block, its address in os.environ (so the
    processes started inside inherit it). Stopped, with any stage still running, at the end.
    Its children run `target` ("module:function", called with the command's arguments).
    With BIGMODEL_WARM_START=0 there is no server (and the block gets None)."""
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="bigmodel-warm-"))
    address = str(folder / "socket")
    # safe path: the server's sys.path is the console command's (a workspace's own bigmodel/
    # folder must not shadow the installed package)
    # a session of its own: a Ctrl-C reaches each stage once, through its command
    proc = subprocess.Popen([sys.executable, "-m", "bigmodel.warmstart", address, target],
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONSAFEPATH": "1"},
                            start_new_session=True)
    # it binds its socket before importing anything heavy (a fraction of a second); one that
    # does not come up leaves the stages to start as they would without it
    deadline = time.monotonic() + 60
    while not os.path.exists(address) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    old = os.environ.get(WARM_ENV)
    if os.path.exists(address):
        os.environ[WARM_ENV] = address
    try:
        yield proc
    finally:
        if old is None:
            os.environ.pop(WARM_ENV, None)
        else:
            os.environ[WARM_ENV] = old
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(address)
        with contextlib.suppress(OSError):
            folder.rmdir()


def serve(address: str, target: str = CLI) -> None:
    _die_with_parent()  # the flow gone (even killed), the server goes, and its stages with it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)  # bound first: a stage that comes early waits in the backlog
    listener.listen(64)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stages themselves
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
    for module in FIRST:
        _preload(module)
    later = list(LATER)
    children: dict[int, socket.socket] = {}  # pid -> its command's connection
    orphans: set[int] = set()  # killed because their command went away; not yet reaped
    while not stopping:
        watched = [c for p, c in children.items() if p not in orphans]
        try:
            ready, _, _ = select.select([listener, *watched], [], [], 0 if later else 0.2)
        except InterruptedError:
            continue
        for sock in ready:
            if sock is listener:
                conn, _ = listener.accept()
                pid = _start(conn, listener, children, target, threads)
                if pid:
                    children[pid] = conn
                continue
            pid = next(p for p, c in children.items() if c is sock)
            try:
                gone = not sock.recv(1)
            except OSError:
                gone = True
            if gone:  # the command was killed: its stage goes with it
                orphans.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap(children)
        orphans &= set(children)
        if later and not ready:
            _preload(later.pop(0))
    _stop(children)
    listener.close()


def _stop(children: dict[int, socket.socket], grace: float = 5.0) -> None:
    """SIGTERM to the stages still running, SIGKILL to those still there after `grace` s."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _preload(module: str) -> None:
    try:
        __import__(module)
    except Exception:  # a stage that needs it reports the error itself, with its traceback
        pass


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        ended = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                 else {"exit": os.waitstatus_to_exitcode(status)})
        with contextlib.suppress(OSError):
            _send(conn, ended)
        conn.close()


def _start(conn: socket.socket, listener: socket.socket, children: dict[int, socket.socket],
           target: str, threads: str | None) -> int | None:
    global forked
    fds: list[int] = []
    try:
        frame, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        size = struct.unpack("!I", frame[:4])[0]
        data = frame[4:]
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        request = json.loads(data)
        if len(fds) != len(request["std"]):
            raise OSError("descriptors missing")
    except (OSError, ValueError, KeyError, TypeError, struct.error):  # not a command's request
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        try:
            _send(conn, {"pid": pid})
        except OSError:
            os.kill(pid, signal.SIGKILL)
        return pid
    # the child
    code = 1
    try:
        listener.close()
        for other in children.values():
            other.close()
        conn.close()
        _die_with_parent()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        passed = dict(zip(request["std"], fds))
        for std in (0, 1, 2):
            if std in passed:
                os.dup2(passed[std], std)
                os.close(passed[std])
            else:
                with contextlib.suppress(OSError):
                    os.close(std)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(int(request["umask"]))
        sys.argv = list(request["argv"])
        # line by line where a new process would be: to a terminal, or asked to be unbuffered
        if os.environ.get("PYTHONUNBUFFERED") or os.isatty(1):
            sys.stdout.reconfigure(line_buffering=True)
        _reseed()
        _threads(threads)
        forked = True
        code = _run(target, sys.argv[1:])
    except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        _exit(code)
    return None  # not reached


def _run(target: str, args: list[str]) -> int:
    module, _, function = target.partition(":")
    try:
        return int(getattr(__import__(module, fromlist=[function]), function)(args) or 0)
    except SystemExit as e:  # argparse's usage errors and --help
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001 - an uncaught error: its traceback, exit 1
        import traceback

        traceback.print_exc()
        return 1


def _exit(code: int) -> None:
    """End the child as an interpreter ends: exit handlers, flushed streams; never back into
    the server's loop."""
    import atexit

    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL when the parent process dies (Linux); gone already: exit now."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(EXIT_TRANSIENT)


def _threads(server_had: str | None) -> None:
    """OpenMP read OMP_NUM_THREADS when the server imported torch: a stage asking for another
    count gets it set."""
    asked = os.environ.get("OMP_NUM_THREADS")
    if "torch" in sys.modules and asked != server_had:
        with contextlib.suppress(ValueError):
            n = int(asked) if asked else len(os.sched_getaffinity(0))
            sys.modules["torch"].set_num_threads(max(1, n))


def _reseed() -> None:
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


if __name__ == "__main__":  # through the module, so its children see `forked` set there
    from bigmodel import warmstart

    warmstart.serve(*sys.argv[1:3])
