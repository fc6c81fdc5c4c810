"""The flow's stages started warm (forks of bigmodel.warmstart's server) against cold (each in an
interpreter of its own, BIGMODEL_WARM_START=0), alternating, on fresh copies of one project.

    python benchmarks/warm_start.py [--rounds N] [--all-families]

Each run is the pipeline flow, in a process of its own, on a new tiny project (the tests' tiny
config: the GPT chain, or every family with --all-families), so every stage instance runs. It
prints each run's stage seconds (the report's column: the `dvc repro` of that stage, start to
end) and their sum, and the cold / warm ratio round by round.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import GPT_ONLY, make_project  # noqa: E402  (the tests' tiny project)

ROW = re.compile(r"^\| (\S+@\S+) \| ran \| ([0-9.]+) \|")


def run(project: Path, warm: bool) -> tuple[float, dict[str, float]]:
    env = {**os.environ, "BIGMODEL_WARM_START": "1" if warm else "0",
           "PREFECT_HOME": str(project / ".prefect"), "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from flows.pipeline import "
                           "pipeline; pipeline(root=sys.argv[1])", str(project)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the flow failed ({'warm' if warm else 'cold'}): "
                 f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    report = (project / "reports" / "pipeline_report.md").read_text()
    stages = {m.group(1): float(m.group(2)) for m in map(ROW.match, report.splitlines()) if m}
    return wall, stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--all-families", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be >= 1")
    only = None if args.all_families else GPT_ONLY
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            got = {}
            for warm in (False, True):
                project = make_project(Path(tmp) / f"r{r}-{'warm' if warm else 'cold'}",
                                       only=only)
                got[warm] = run(project, warm)
                wall, stages = got[warm]
                print(f"round {r} {'warm' if warm else 'cold'}: flow {wall:.1f} s, stages "
                      f"{sum(stages.values()):.1f} s over {len(stages)}: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
            rows.append((r, got[False], got[True]))
    print("\n| round | stages | cold: stage s | warm: stage s | cold / warm | cold: flow s | "
          "warm: flow s |\n|---:|---:|---:|---:|---:|---:|---:|")
    for r, (cw, cs), (ww, ws) in rows:
        c, w = sum(cs.values()), sum(ws.values())
        print(f"| {r} | {len(cs)} | {c:.1f} | {w:.1f} | **{c / w:.2f}x** | {cw:.1f} | {ww:.1f} |")
    stages = list(rows[0][1][1])
    print("\nper stage, seconds (cold → warm, each round):")
    for s in stages:
        print(f"- {s}: " + "; ".join(f"{cs[s]:.1f} → {ws[s]:.1f}" for _, (_, cs), (_, ws) in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
