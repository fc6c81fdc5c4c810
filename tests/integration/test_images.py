"""The ResNet chain on the built-in digits, stage by stage as `dvc repro` calls them (the e2e
test runs the same chain through DVC and the flow); the served model answering a real PNG over
HTTP; the champion gate; resume after SIGKILL (bitwise); and two gloo processes under DDP."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from bigmodel import cli
from bigmodel.data import images
from bigmodel.tasks.image_cls import ImageClassifier, png_base64
from tests.conftest import make_project, stage_env
from tests.integration.test_resume_kill import env, reaped, wait_until_hung
from tests.integration.test_serving import post, serve

IMAGES_ONLY = {"data": ["digits"], "tokenizer": ["pixels"], "pretrain": ["resnet"],
               "finetune": ["resnet-cls"]}
STAGES = ["source@digits", "prepare@digits", "tokenizer@pixels", "tokenize@resnet",
          "pretrain@resnet", "evaluate-pretrain@resnet", "finetune@resnet-cls",
          "evaluate@resnet-cls", "explain@resnet-cls"]
PRETRAIN = {"max_steps": 24, "batch_size": 16, "warmup_steps": 4, "eval_interval": 12,
            "log_interval": 4, "checkpoint_interval": 8, "device": "cpu"}

# `bigmodel pretrain` after wrapping the image sampler: the process freezes at its `draw`-th
# batch, leaving its pid in hung.<rank> (see tests/integration/test_resume_kill.py).
HANG = """
import os, sys, time
from bigmodel.objectives import image_cls
draw, calls = image_cls.ImageSampler.__call__, [0]
def hanging(self):
    calls[0] += 1
    if calls[0] == {draw}:
        rank = os.environ.get("RANK", "0")
        with open(f".hung.{{rank}}", "w") as f:
            f.write(str(os.getpid()))
        os.replace(f".hung.{{rank}}", f"hung.{{rank}}")
        time.sleep(600)
    return draw(self)
image_cls.ImageSampler.__call__ = hanging
from bigmodel.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Each rank writes a digest of its parameters (not the batch-norm statistics, which each rank
# keeps from its own half of the batch) when training ends.
DIGEST = """
import hashlib, os, sys
from bigmodel.train import trainer
fit = trainer.Trainer.fit
def digesting(self, *args, **kwargs):
    out = fit(self, *args, **kwargs)
    h = hashlib.sha256()
    for name, p in sorted(self.model.named_parameters()):
        h.update(p.detach().cpu().numpy().tobytes())
    with open(f"params.{os.environ.get('RANK', '0')}", "w") as f:
        f.write(h.hexdigest())
    return out
trainer.Trainer.fit = digesting
from bigmodel.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:  # noqa: ANN001
    """The image runs of a tiny project, each stage run as its dvc.yaml command says, in this
    process (a stage process costs seconds of imports; DVC itself is the e2e test's)."""
    root = make_project(tmp_path_factory.mktemp("images") / "project", only=IMAGES_ONLY)
    for stage in STAGES:
        kind, name = stage.split("@")
        assert cli.main([kind, "--name", name, "--params", str(root / "params.yaml")]) == 0, stage
    return root


def metrics(root: Path, kind: str, name: str) -> dict:
    return json.loads((root / f"reports/metrics/{kind}/{name}.json").read_text())


def assert_scores_are_those_of_the_saved_predictions(test: dict, folder: Path) -> None:
    """Accuracy, macro-F1 and ECE recomputed from predictions.csv and reliability.csv."""
    from sklearn.metrics import f1_score

    predictions = pd.read_csv(folder / "predictions.csv", dtype={"actual": str, "predicted": str})
    bins = pd.read_csv(folder / "reliability.csv")
    n, correct = len(predictions), predictions["actual"] == predictions["predicted"]
    assert test["accuracy"] == pytest.approx(correct.mean())
    assert test["macro_f1"] == pytest.approx(f1_score(
        predictions["actual"], predictions["predicted"], labels=list(test["per_class"]),
        average="macro", zero_division=0))
    # the bins hold each prediction once, with its correctness and its confidence
    assert bins["count"].sum() == n
    assert (bins["count"] * bins["accuracy"]).sum() == pytest.approx(correct.sum())
    assert ((bins["count"] * bins["confidence"]).sum() / n
            == pytest.approx(predictions["confidence"].mean(), abs=1e-4))
    # ECE by its definition, and at least the gap between mean confidence and accuracy
    ece = (bins["count"] / n * (bins["accuracy"] - bins["confidence"]).abs()).sum()
    assert test["ece"] == pytest.approx(ece, abs=1e-6)
    assert test["ece"] >= abs(correct.mean() - predictions["confidence"].mean()) - 1e-4


@pytest.mark.slow
def test_the_stages_train_finetune_evaluate_and_explain_the_resnet(project):  # noqa: ANN001
    pre = metrics(project, "pretrain", "resnet")
    assert pre["steps"] == 30 and pre["images_per_s"] > 0 and pre["n_params"] > 0
    # MLflow has what the MFU divides by: the model's training FLOPs an image
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    [run] = client.search_runs([exp.experiment_id], "tags.`bigmodel.stage` = 'pretrain@resnet'")
    model = ImageClassifier.load(project / "models/pretrain/resnet").model
    assert run.data.metrics["flops_per_image"] == pytest.approx(model.flops_per_image())
    # the train images of its five classes, of the ten the tokenize stage wrote
    meta = json.loads((project / "data/tokens/resnet/meta.json").read_text())
    y = np.load(project / "data/tokens/resnet/train_labels.npy")
    five = [meta["labels"].index(c) for c in "01234"]
    assert run.data.metrics["train_images"] == int(np.isin(y, five).sum()) < len(y)
    # the pretrained model knows its five classes; the finetuned one all ten
    assert json.loads((project / "models/pretrain/resnet/config.json").read_text())["labels"] == list("01234")
    tuned = json.loads((project / "models/finetune/resnet-cls/config.json").read_text())
    assert tuned["labels"] == list("0123456789") and tuned["arch"]["n_classes"] == 10
    # (the pretrained model's predictions are saved by its explain stage, the finetuned one's by
    # its evaluate stage)
    for kind, name, folder in (("evaluate-pretrain", "resnet", "reports/explain/resnet/test"),
                               ("evaluate", "resnet-cls", "reports/evaluate/resnet-cls")):
        m = metrics(project, kind, name)
        test, base = m["test"], m["baselines"]
        assert m["task"] == "image_cls"
        assert_scores_are_those_of_the_saved_predictions(test, project / folder)
        assert test["accuracy"] > base["majority"]["accuracy"] + 0.2  # learnt something
        assert set(test["per_class"]) == set(json.loads(
            (project / ("models/pretrain/resnet" if kind == "evaluate-pretrain"
                        else "models/finetune/resnet-cls") / "config.json").read_text())["labels"])
        assert base["pixel_logreg"]["accuracy"] > 0.9  # the digits are easy for pixels too
    for folder in ("reports/evaluate/resnet-cls", "reports/explain/resnet/test"):
        assert (project / folder / "reliability.png").stat().st_size > 1000
        assert (project / folder / "confusion.png").stat().st_size > 1000
        bins = pd.read_csv(project / folder / "reliability.csv")
        assert bins["count"].sum() == len(pd.read_csv(project / folder / "predictions.csv"))
    for name in ("resnet", "resnet-cls"):
        explained = metrics(project, "explain", name)
        assert explained["n_examples"] == 2 and explained["additivity_max_error"] < 1e-4
        # hiding pixels moved p(predicted) each time (a drop of exactly 0 is a masking that hid
        # nothing); which map hurts most is not asserted: two examples of a tiny model
        for key in ("deletion_drop_shap", "deletion_drop_gradcam", "deletion_drop_random"):
            assert explained[key] != 0 and abs(explained[key]) <= 1, (key, explained[key])
        for figure in ("shap.png", "gradcam.png"):
            assert (project / f"reports/explain/{name}/{figure}").stat().st_size > 1000


@pytest.mark.slow
def test_the_served_resnet_answers_a_png_over_http_as_the_local_model_does(project, tmp_path):  # noqa: ANN001
    test = pd.read_parquet(project / "data/digits/prepared/image_cls_test.parquet").head(3)
    pixels = images.pixels_of(test, images.shape_of(test))
    pngs = [png_base64(p) for p in pixels]
    store = f"sqlite:///{project / 'mlflow.db'}"
    port, server = serve("models:/bigmodel-resnet-cls/1", store, tmp_path / "serve")
    with server:
        out = post(f"http://127.0.0.1:{port}/invocations",
                   {"dataframe_split": {"columns": ["image"], "data": [[p] for p in pngs]}})
        with pytest.raises(Exception) as bad:  # not an image: an error answer, the server lives on
            post(f"http://127.0.0.1:{port}/invocations",
                 {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}})
        again = post(f"http://127.0.0.1:{port}/invocations",
                     {"dataframe_split": {"columns": ["image"], "data": [[pngs[0]]]}})
    assert "image 0: not a readable image" in bad.value.read().decode()  # type: ignore[attr-defined]
    rows = out["predictions"]
    local = ImageClassifier.load(project / "models/finetune/resnet-cls").predict(pngs)
    assert [r["label"] for r in rows] == local["label"].tolist()
    for row, (_, want) in zip(rows, local.iterrows()):
        assert sum(v for k, v in row.items() if k.startswith("p_")) == pytest.approx(1, abs=1e-5)
        assert row["p_3"] == pytest.approx(want["p_3"], abs=1e-5)
    assert again["predictions"][0] == pytest.approx(rows[0], abs=1e-6)  # a batch of one alike


@pytest.mark.slow
def test_the_gate_promotes_the_first_resnets_then_keeps_a_worse_challenger(project):  # noqa: ANN001
    first = subprocess.run([sys.executable, "-m", "bigmodel.cli", "promote"], cwd=project,
                           env=stage_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "bigmodel-resnet-cls: no champion yet: v1 promoted" in first.stdout
    assert "bigmodel-resnet: no champion yet: v1 promoted" in first.stdout
    # a challenger trained for one epoch at a hundredth of the rate: worse, so kept out
    worse = subprocess.run(
        [sys.executable, "-m", "bigmodel.cli", "finetune", "--name", "resnet-cls",
         "--set", "finetune.resnet-cls.epochs=1", "--set", "finetune.resnet-cls.lr=0.00003"],
        cwd=project, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert worse.returncode == 0, worse.stderr
    second = subprocess.run([sys.executable, "-m", "bigmodel.cli", "promote"], cwd=project,
                            env=stage_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    line = next(x for x in second.stdout.splitlines() if x.startswith("bigmodel-resnet-cls:"))
    assert "challenger v2 macro_f1" in line and "not better" in line and line.endswith("kept v1")
    assert "bigmodel-resnet: v1 is already the champion; kept" in second.stdout


def pretrain_project(source: Path, root: Path, **settings: object) -> Path:
    """What `pretrain@resnet` reads (the image arrays and the processor) and a params file."""
    for folder in ("data/tokens/resnet", "models/tokenizer/pixels"):
        shutil.copytree(source / folder, root / folder)
    params = yaml.safe_load((source / "params.yaml").read_text())
    params["pretrain"]["resnet"].update({**PRETRAIN, **settings})
    params["finetune"] = {}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_pretrain(root: Path, *args: str, script: str | None = None) -> list[str]:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "bigmodel.cli"]
    return [*head, "pretrain", "--name", "resnet", "--params", str(root / "params.yaml"), *args]


def outcome(root: Path) -> tuple[dict, str, dict]:
    m = metrics(root, "pretrain", "resnet")
    for timing in ("images_per_s", "seconds"):
        m.pop(timing)
    return (m, (root / "reports/plots/pretrain/resnet.csv").read_text(),
            load_file(root / "models/pretrain/resnet/model.safetensors"))


@pytest.mark.slow
def test_a_resnet_killed_mid_run_resumes_to_the_same_weights_bitwise(project, tmp_path):  # noqa: ANN001
    reference = pretrain_project(project, tmp_path / "reference")
    done = subprocess.run(run_pretrain(reference), cwd=reference, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    killed = pretrain_project(project, tmp_path / "killed")
    proc = subprocess.Popen(run_pretrain(killed, script=HANG.format(draw=19)), cwd=killed, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with reaped(killed, proc):
        [pid] = wait_until_hung(killed, proc)  # in step 19: 17 and 18 are taken, not saved
        state = json.loads((killed / "models/checkpoints/resnet/state.json").read_text())
        assert state["step"] == 16
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    resumed = subprocess.run(run_pretrain(killed, "--resume"), cwd=killed, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got, want = outcome(killed), outcome(reference)
    assert got[0] == want[0] and got[0]["steps"] == 24
    assert got[1] == want[1]  # the loss curve, augmentations and all
    assert got[2].keys() == want[2].keys()
    assert all(got[2][k].equal(want[2][k]) for k in want[2])  # batch-norm statistics too


@pytest.mark.slow
def test_two_gloo_processes_train_one_resnet_in_step(project, tmp_path):  # noqa: ANN001
    root = pretrain_project(project, tmp_path / "ddp")
    script = tmp_path / "digest.py"
    script.write_text(DIGEST)
    logs = tmp_path / "torchrun-logs"  # every rank's output, each in its own file
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "--tee", "3", "--log-dir", str(logs), str(script),
                "pretrain", "--name", "resnet", "--params", str(root / "params.yaml")]
    done = subprocess.run(torchrun, cwd=root, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    digests = [(root / f"params.{rank}").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]  # DDP kept the two replicas' parameters identical
    saved = load_file(root / "models/pretrain/resnet/model.safetensors")
    h = hashlib.sha256()
    for name in sorted(k for k in saved if "running" not in k and "num_batches" not in k):
        h.update(saved[name].numpy().tobytes())
    assert h.hexdigest() == digests[0]  # rank 0 wrote the model it trained
    # rank 0 alone logs, registers and sums up; the other rank notes only its step
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    assert len(client.search_runs([exp.experiment_id],
                                  "tags.`bigmodel.stage` = 'pretrain@resnet'")) == 1
    assert [str(v.version) for v in client.search_model_versions("name='bigmodel-resnet'")] == ["1"]
    lines = {int(f.parent.name): [ln for ln in f.read_text().splitlines()
                                  if ln.startswith("pretrain@resnet: done")]
             for f in logs.glob("*/attempt_0/*/stdout.log")}
    assert sorted(lines) == [0, 1], lines
    [summary], [other] = lines[0], lines[1]
    assert re.fullmatch(r"pretrain@resnet: done in [\d.]+s  step 24: train loss .*"
                        r"; registered bigmodel-resnet v1", summary), summary
    assert re.fullmatch(r"pretrain@resnet: done in [\d.]+s  rank 1: step 24", other), other
    m = metrics(root, "pretrain", "resnet")
    assert m["steps"] == 24 and m["val_accuracy"] > 0.3  # five classes: chance is 0.2
    curve = pd.read_csv(root / "reports/plots/pretrain/resnet.csv").dropna(subset=["train_loss"])
    assert curve["train_loss"].iloc[-1] < curve["train_loss"].iloc[0]
    state = json.loads((root / "models/checkpoints/resnet/state.json").read_text())
    assert state["world_size"] == 2
