"""Transfer for images: a ResNet pretrained on some classes, finetuned to a label set, against
the same network trained from scratch and a linear probe of the frozen backbone, at the same
budget (the finetune run's epochs and learning rate), with few and with all training images
per class, over several seeds.

    python benchmarks/image_transfer.py [--root PROJECT] [--name RUN] [--seeds N]
                                        [--per-class 10,30,0] [--classes 5,6,7,8,9]

PROJECT is a folder where `pretrain@<base of RUN>` and `prepare@<its data>` have run (default:
this repo after `make pipeline`). Every variant is the real finetune stage (`--set` overrides
of RUN, e.g. finetune.RUN.from_scratch=true), evaluated by the task's own test scoring, in a
scratch copy of the project's params and tracking, so the project's models are left alone.
`--classes` finetunes to those classes only ("": the run's own). Prints one markdown table:
test macro-F1 and accuracy, mean ± standard deviation over the seeds, per variant and size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import commit, cpu_model  # noqa: E402

from bigmodel import config  # noqa: E402
from bigmodel.stages import finetune  # noqa: E402
from bigmodel.tasks import image_cls  # noqa: E402

VARIANTS = {
    "pretrained, full finetune": {},
    "pretrained, frozen backbone (linear probe)": {"freeze_backbone": True},
    "from scratch (same network)": {"from_scratch": True},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO)
    ap.add_argument("--name", default="resnet-cls")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", default="10,30,0", help="training images per class (0: all)")
    ap.add_argument("--classes", default="", help="comma-separated labels ('': the run's own)")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    project = args.root.resolve()
    raw = yaml.safe_load((project / "params.yaml").read_text())
    base = config.validate(raw)
    spec = base.finetune[args.name]
    if spec.task != "image_cls":
        raise SystemExit(f"finetune.{args.name} is a {spec.task} run, not image_cls")
    sizes = [int(s) for s in args.per_class.split(",")]
    classes = [c for c in args.classes.split(",") if c] or spec.classes
    prepared = base.path("data", spec.data) / "prepared"
    train, test = (pd.read_parquet(prepared / f"image_cls_{s}.parquet") for s in ("train", "test"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["BIGMODEL_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        for variant, change in VARIANTS.items():
            for size in sizes:
                f1s, accs, secs = [], [], []
                for seed in range(args.seeds):
                    run = {**raw["finetune"][args.name], **change, "max_per_class": size,
                           "classes": classes}
                    params = config.validate({**raw, "seed": base.seed + seed,
                                              "finetune": {args.name: run},
                                              "paths": {**raw.get("paths", {}),
                                                        "finetune": f"{scratch}/models",
                                                        "metrics": f"{scratch}/metrics",
                                                        "plots": f"{scratch}/plots"}})
                    params._root = project
                    start = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):  # the stage's progress lines
                        finetune.run(params, args.name)
                    secs.append(time.perf_counter() - start)
                    clf = image_cls.ImageClassifier.load(params.path("finetune", args.name))
                    scores, _, _ = image_cls.test_scores(clf, test, 256, None)
                    f1s.append(scores["macro_f1"])
                    accs.append(scores["accuracy"])
                rows.append((variant, size, f1s, accs, statistics.mean(secs)))
                print(f"{variant} / {size or 'all'} per class: macro-F1 "
                      f"{statistics.mean(f1s):.4f}", file=sys.stderr, flush=True)
    n_labels = len(classes) or train["label"].nunique()
    print(f"# image transfer: finetune.{args.name} ({n_labels} classes, base "
          f"{spec.base}), {args.seeds} seeds; commit {commit()}, {cpu_model()}")
    print()
    print("| variant | train images / class | test macro-F1 | test accuracy | seconds / run |")
    print("|---|---:|---:|---:|---:|")
    for variant, size, f1s, accs, sec in rows:
        sd = statistics.stdev if len(f1s) > 1 else (lambda _: 0.0)
        print(f"| {variant} | {size or 'all'} | {statistics.mean(f1s):.4f} ± {sd(f1s):.4f} | "
              f"{statistics.mean(accs):.4f} ± {sd(accs):.4f} | {sec:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
