"""BERT pretrained with MLM alone against MLM + next-sentence prediction, at equal steps (equal
tokens: an NSP row packs A and B into the same block), judged by what they do downstream.

In a scratch copy of this project, with the repo's params.yaml: prepare the built-in data,
train the WordPiece tokenizer, then for nsp in (false, true): `pretrain@bert`,
`evaluate-pretrain@bert`, `finetune@bert-cls` + `evaluate@bert-cls`, `finetune@bert-tag` +
`evaluate@bert-tag`, each a real `bigmodel` command. Prints one markdown table (pretraining
seconds, masked-token accuracy, NSP accuracy, classifier test macro-F1, tagger test entity F1).

    python benchmarks/nsp_vs_mlm.py [--steps N] [--rounds R] [--nsp-set KEY=VALUE ...]

`--nsp-set` gives the NSP arm settings of its own (e.g. the learning rate it trains stably at:
`--nsp-set pretrain.bert.lr=5e-4 --nsp-set pretrain.bert.min_lr=5e-5`); the MLM arm keeps
params.yaml's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import commit, cpu_model  # noqa: E402


def bigmodel(root: Path, *args: str) -> float:
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bigmodel {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def metrics(root: Path, kind: str, name: str) -> dict:
    return json.loads((root / "reports" / "metrics" / kind / f"{name}.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=0, help="pretraining steps (0: params.yaml's)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of the pair")
    ap.add_argument("--nsp-set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for the NSP arm only (repeatable)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nsp-bench-") as d:
        root = Path(d)
        for item in ("bigmodel", "dvc.yaml", "params.yaml"):
            (shutil.copytree if (REPO / item).is_dir() else shutil.copy)(REPO / item, root / item)
        for stage, name in (("source", "stdlib"), ("prepare", "stdlib"), ("tokenizer", "wordpiece"),
                            ("tokenize", "bert")):
            bigmodel(root, stage, "--name", name)
        steps = ["--set", f"pretrain.bert.max_steps={args.steps}"] if args.steps else []
        for round_ in range(1, args.rounds + 1):
            for nsp in ("false", "true"):
                over = [*steps, "--set", f"pretrain.bert.nsp={nsp}"]
                if nsp == "true":
                    over += [a for item in args.nsp_set for a in ("--set", item)]
                seconds = bigmodel(root, "pretrain", "--name", "bert", *over)
                bigmodel(root, "evaluate-pretrain", "--name", "bert", *over)
                for run in ("bert-cls", "bert-tag"):
                    bigmodel(root, "finetune", "--name", run, *over)
                    bigmodel(root, "evaluate", "--name", run, *over)
                pre, ev = metrics(root, "pretrain", "bert"), metrics(root, "evaluate-pretrain", "bert")
                rows.append({
                    "round": round_, "objective": "mlm+nsp" if nsp == "true" else "mlm",
                    "steps": pre["steps"], "seconds": seconds, "tokens_per_s": pre["tokens_per_s"],
                    "masked_accuracy": ev["test"]["masked_accuracy"],
                    "nsp_accuracy": ev["test"].get("nsp_accuracy"),
                    "cls_macro_f1": metrics(root, "evaluate", "bert-cls")["test"]["macro_f1"],
                    "tag_f1": metrics(root, "evaluate", "bert-tag")["test"]["f1"],
                })
    print(f"### BERT: MLM against MLM + NSP at equal steps ({time.strftime('%Y-%m-%d')})\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}; commit {commit()}; "
          f"NSP arm overrides: {' '.join(args.nsp_set) or 'none'}\n")
    print("| round | objective | steps | pretrain s (process) | tokens/s | test masked-token acc | "
          "test NSP acc | bert-cls test macro-F1 | bert-tag test entity F1 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        nsp = f"{r['nsp_accuracy']:.3f}" if r["nsp_accuracy"] is not None else "–"
        print(f"| {r['round']} | {r['objective']} | {r['steps']} | {r['seconds']:.0f} | "
              f"{r['tokens_per_s']:,.0f} | {r['masked_accuracy']:.3f} | {nsp} | "
              f"{r['cls_macro_f1']:.3f} | {r['tag_f1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
