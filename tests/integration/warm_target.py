"""What the warm-start tests' server runs in its children instead of bigmodel's CLI."""

from __future__ import annotations

import json
import os
import sys
import time

from bigmodel import warmstart


def main(args: list[str]) -> int:
    if args[0] == "show":
        print(json.dumps({"cwd": os.getcwd(), "marker": os.environ.get("WARM_MARKER"),
                          "argv": sys.argv, "ppid": os.getppid(), "forked": warmstart.forked,
                          "stdin": sys.stdin.read(), "torch": "torch" in sys.modules}))
        print("to stderr", file=sys.stderr)
        return int(args[1]) if len(args) > 1 else 0
    if args[0] == "wait":
        print("waiting", flush=True)
        time.sleep(120)
        return 0
    if args[0] == "usage":
        raise SystemExit("usage: a message for the user")
    raise RuntimeError("a bug in a stage")
