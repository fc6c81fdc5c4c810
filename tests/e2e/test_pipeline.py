"""The whole pipeline, tiny config, every family, through the real Prefect flow, DVC and MLflow."""

import json
import re
import subprocess

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from bigmodel.tracking import flatten
from flows.pipeline import pipeline, stage_names
from tests.conftest import dvc, make_project, stage_env

GPT_CHAIN = ["tokenize@gpt", "pretrain@gpt", "evaluate-pretrain@gpt", "finetune@gpt-cls",
             "evaluate@gpt-cls", "explain@gpt-cls"]
BERT_CHAIN = ["tokenize@bert", "pretrain@bert", "evaluate-pretrain@bert", "finetune@bert-cls",
              "finetune@bert-tag", "evaluate@bert-cls", "evaluate@bert-tag", "explain@bert-cls",
              "explain@bert-tag"]
SEQ2SEQ_CHAIN = ["tokenize@seq2seq", "pretrain@seq2seq", "evaluate-pretrain@seq2seq"]
RESNET_CHAIN = ["pretrain@resnet", "evaluate-pretrain@resnet", "finetune@resnet-cls",
                "evaluate@resnet-cls", "explain@resnet-cls"]
STAGES = ["source@stdlib", "source@digits", "prepare@stdlib", "prepare@digits", "tokenizer@bpe",
          "tokenizer@wordpiece", "tokenizer@joint", "tokenizer@pixels", "tokenize@gpt",
          "tokenize@bert", "tokenize@seq2seq", "tokenize@resnet",
          "pretrain@gpt", "pretrain@bert", "pretrain@seq2seq", "pretrain@resnet",
          "evaluate-pretrain@gpt", "evaluate-pretrain@bert", "evaluate-pretrain@seq2seq",
          "evaluate-pretrain@resnet",
          "finetune@gpt-cls", "finetune@bert-cls", "finetune@bert-tag", "finetune@resnet-cls",
          "evaluate@gpt-cls", "evaluate@bert-cls", "evaluate@bert-tag", "evaluate@resnet-cls",
          "explain@gpt-cls", "explain@bert-cls", "explain@bert-tag", "explain@resnet-cls"]
REGISTERED = ["bigmodel-gpt-cls", "bigmodel-bert-cls", "bigmodel-bert-tag", "bigmodel-gpt",
              "bigmodel-seq2seq", "bigmodel-resnet", "bigmodel-resnet-cls"]


def edit_params(project, change) -> None:  # noqa: ANN001
    params = yaml.safe_load((project / "params.yaml").read_text())
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc_status(project) -> set[str]:  # noqa: ANN001
    """The stages whose own code, data or params changed."""
    out = dvc(project, "status", "--json")
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def would_rerun(project) -> set[str]:  # noqa: ANN001
    """The stages `dvc repro` would run now: the changed ones and everything downstream of
    them in DVC's own DAG (`dvc dag`)."""
    out = dvc(project, "dag", "--dot")
    assert out.returncode == 0, out.stderr
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', out.stdout)
    reached, frontier = set(), dvc_status(project)
    while frontier:
        reached |= frontier
        frontier = {b for a, b in edges if a in frontier} - reached
    return reached


@pytest.mark.slow
def test_tiny_pipeline_runs_every_family_end_to_end_then_reruns_only_what_changed(
        tmp_path, prefect_harness):
    project = make_project(tmp_path / "project")
    assert stage_names(project) == STAGES

    outcomes = pipeline(root=str(project))
    assert [(o.stage, o.status) for o in outcomes] == [(s, "ran") for s in STAGES]

    # DVC recorded every stage instance; its metrics view lists each model's evaluation
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)[""]["data"]
    bert_tag = shown["reports/metrics/evaluate/bert-tag.json"]["data"]
    assert bert_tag["task"] == "token_cls" and "f1" in bert_tag["baselines"]["most_frequent_tag"]
    mlm = shown["reports/metrics/evaluate-pretrain/bert.json"]["data"]
    assert mlm["test"]["masked_accuracy"] > 0 and "unigram" in mlm["baselines"]
    s2s = shown["reports/metrics/evaluate-pretrain/seq2seq.json"]["data"]
    assert s2s["task"] == "seq2seq" and s2s["test"]["bleu_signature"].startswith("nrefs:1")
    assert {"copy_source", "retrieval"} <= set(s2s["baselines"])
    s2s_file = json.loads((project / "reports/metrics/evaluate-pretrain/seq2seq.json").read_text())
    assert len(s2s_file["examples"]) == 5  # (dvc metrics show leaves lists out)
    images = shown["reports/metrics/evaluate/resnet-cls.json"]["data"]
    assert images["task"] == "image_cls"
    assert {"majority", "pixel_logreg"} <= set(images["baselines"])
    assert images["test"]["accuracy"] > images["baselines"]["majority"]["accuracy"]
    # the scores are those of the predictions the stage saved: accuracy, and ECE by its
    # definition over the saved reliability bins (which hold every prediction once)
    images = json.loads((project / "reports/metrics/evaluate/resnet-cls.json").read_text())
    predictions = pd.read_csv(project / "reports/evaluate/resnet-cls/predictions.csv",
                              dtype={"actual": str, "predicted": str})
    bins = pd.read_csv(project / "reports/evaluate/resnet-cls/reliability.csv")
    n, correct = len(predictions), predictions["actual"] == predictions["predicted"]
    assert n > 0 and bins["count"].sum() == n
    assert images["test"]["accuracy"] == pytest.approx(correct.mean())
    assert (bins["count"] * bins["accuracy"]).sum() == pytest.approx(correct.sum())
    ece = (bins["count"] / n * (bins["accuracy"] - bins["confidence"]).abs()).sum()
    assert images["test"]["ece"] == pytest.approx(ece, abs=1e-6)
    assert images["test"]["ece"] >= abs(correct.mean() - predictions["confidence"].mean()) - 1e-4

    # MLflow: one pipeline run with every stage instance nested under it, each with metrics,
    # and each logging as params exactly the values DVC hashed for it
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.metrics["stages_ran"] == len(STAGES)
    children = {r.data.tags["bigmodel.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == sorted(STAGES)
    assert all(r.data.metrics for r in children.values())
    # every stage started as a fork of the flow's warm server (bigmodel.warmstart)
    assert {r.data.tags["bigmodel.process"] for r in children.values()} == {"warm fork"}
    for stage, run in children.items():
        hashed = {k: str(v) for k, v in flatten(lock[stage].get("params", {}).get("params.yaml", {})).items()}
        assert run.data.params == hashed, stage
    for name in REGISTERED:
        assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
        champion = client.get_model_version_by_alias(name, "champion")  # the gate's first pick
        assert str(champion.version) == "1"
        assert champion.tags["bigmodel.gate.reason"].startswith("no champion yet")

    # lineage: each stage run carries DVC's hashes of the data it read and the outputs it wrote
    finetune = children["finetune@bert-tag"]
    got = {d.dataset.name: d.dataset.digest for d in finetune.inputs.dataset_inputs}
    want = {d["path"]: d["md5"] for d in lock["finetune@bert-tag"]["deps"]
            if not d["path"].startswith("bigmodel/")}
    assert got == want and "models/pretrain/bert" in got
    assert (finetune.data.tags["bigmodel.dvc_out.models/finetune/bert-tag"]
            == lock["finetune@bert-tag"]["outs"][0]["md5"])

    # the report: every model beside its baselines; the explanations of every family
    report = (project / "reports" / "pipeline_report.md").read_text()
    assert "| explain@bert-tag | ran |" in report and parents[0].info.run_id in report
    # every stage that trains, scores or explains reports its rate beside its seconds
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines()
            if line.startswith("| ") and " | ran | " in line}
    assert re.search(r"\| [\d,.]+ tokens/s \|", rows["pretrain@gpt"])
    assert re.search(r"\| [\d,.]+ images/s \|", rows["pretrain@resnet"])
    assert re.search(r"\| [\d,.]+ examples/s \|", rows["finetune@bert-cls"])
    assert re.search(r"\| [\d,.]+ test examples/s \|", rows["evaluate@gpt-cls"])
    assert re.search(r"\| [\d,.]+ examples/s \|", rows["explain@bert-tag"])
    assert "| baseline: bow logreg |" in report and "| gpt-cls (finetuned gpt `gpt`) |" in report
    assert "| bert-cls (finetuned bert `bert`) |" in report
    assert "## Taggers" in report and "| bert-tag (finetuned bert `bert`) |" in report
    assert "test masked-token accuracy" in report and "test bits/byte" in report
    assert "## Sequence-to-sequence models" in report and "| seq2seq | beam 4 |" in report
    assert "## Image classifiers" in report and "| resnet-cls (finetuned `resnet`) | digits |" in report
    assert "| resnet (pretrained, 5 classes) | digits |" in report
    for run in ("resnet", "resnet-cls"):  # SHAP and Grad-CAM maps of the pretrained and the finetuned
        assert (project / f"reports/explain/{run}/gradcam.png").stat().st_size > 1000
        assert (project / f"reports/explain/{run}/shap.png").stat().st_size > 1000
    assert "Grad-CAM `gradcam.png`" in report
    for run in ("gpt-cls", "bert-cls"):
        assert "<html>" in (project / f"reports/explain/{run}/shap.html").read_text()[:200]
        assert (project / f"reports/explain/{run}/attention_1.png").stat().st_size > 1000
    assert (project / "reports/explain/bert-tag/attention_0.png").stat().st_size > 1000
    # the pretrained models explained by evaluate-pretrain: seq2seq alignments and SHAP,
    # GPT and BERT attention maps
    assert "- seq2seq: 2 test sources in `reports/explain/seq2seq/` (alignment maps" in report
    assert "<html>" in (project / "reports/explain/seq2seq/shap.html").read_text()[:200]
    assert (project / "reports/explain/seq2seq/alignment_1.png").stat().st_size > 1000
    explained = json.loads((project / "reports/metrics/explain/seq2seq.json").read_text())
    assert explained["additivity_max_error"] < 1e-3
    for run in ("gpt", "bert"):
        assert (project / f"reports/explain/{run}/attention_1.png").stat().st_size > 1000

    # the trained models leave: each export is loaded back and matched to our logits by the
    # command itself (tests/integration/test_export.py checks that check)
    for run, fmt, what in (("gpt", "hf", "GPT2LMHeadModel"), ("bert", "hf", "BertForMaskedLM"),
                           ("bert-cls", "hf", "BertForSequenceClassification"),
                           ("bert-tag", "hf", "BertForTokenClassification"),
                           ("gpt-cls", "onnx", "model.onnx"), ("resnet-cls", "onnx", "model.onnx")):
        out = subprocess.run(["bigmodel", "export", run, "--format", fmt, "--out",
                              str(tmp_path / f"export-{run}")], cwd=project, env=stage_env(),
                             capture_output=True, text=True)
        assert out.returncode == 0 and f"{what} (" in out.stdout, out.stderr
    refused = subprocess.run(["bigmodel", "export", "resnet-cls", "--format", "hf", "--out",
                              str(tmp_path / "no")], cwd=project, env=stage_env(),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "the 'small' stem" in refused.stderr

    # nothing changed: a second flow run refreshes the source snapshot and skips every stage;
    # `dvc repro` has nothing to do; the champions stay
    again = pipeline(root=str(project))
    assert [o.status for o in again] == ["ran"] * 2 + ["skipped"] * (len(STAGES) - 2)
    assert "Data and pipelines are up to date" in dvc(project, "repro").stdout
    assert "v1 is already the champion; kept" in (project / "reports/pipeline_report.md").read_text()

    # editing BERT's pretraining reaches exactly BERT's chain (its tokenize reads other keys)
    original = (project / "params.yaml").read_text()
    edit_params(project, lambda p: p["pretrain"]["bert"].update(lr=p["pretrain"]["bert"]["lr"] * 1.5))
    assert dvc_status(project) == {"pretrain@bert"}
    assert would_rerun(project) == set(BERT_CHAIN) - {"tokenize@bert"}
    # a GPT model edit reaches the GPT chain alone
    (project / "params.yaml").write_text(original)
    edit_params(project, lambda p: p["pretrain"]["gpt"].update(n_embd=48))
    assert would_rerun(project) == set(GPT_CHAIN) - {"tokenize@gpt"}
    # the seq2seq model's own settings reach its training and evaluation alone
    (project / "params.yaml").write_text(original)
    edit_params(project, lambda p: p["pretrain"]["seq2seq"].update(label_smoothing=0.2))
    assert would_rerun(project) == set(SEQ2SEQ_CHAIN) - {"tokenize@seq2seq"}
    # the ResNet's classes reach its own chain from pretraining on (its images stay as they are)
    (project / "params.yaml").write_text(original)
    edit_params(project, lambda p: p["pretrain"]["resnet"].update(classes=["0", "1", "2"]))
    assert would_rerun(project) == set(RESNET_CHAIN)
    # a new finetune run adds its own three stages and reruns nothing else
    (project / "params.yaml").write_text(original)
    edit_params(project, lambda p: p["finetune"].update(
        {"bert-cls2": {**p["finetune"]["bert-cls"], "lr": 0.003}}))
    new = {"finetune@bert-cls2", "evaluate@bert-cls2", "explain@bert-cls2"}
    assert dvc_status(project) == new and would_rerun(project) == new
    (project / "params.yaml").write_text(original)
    assert dvc_status(project) == set()

    # an override from a flow parameter reaches the stages that read it, for this run only
    fourth = pipeline(root=str(project), overrides={"finetune.resnet-cls.epochs": 1})
    assert sorted(o.stage for o in fourth if o.status == "ran") == sorted(
        {"source@stdlib", "source@digits", *RESNET_CHAIN[2:]})
    assert json.loads((project / "reports/metrics/finetune/resnet-cls.json").read_text())["epochs"] == 1
    assert (project / "params.yaml").read_text() == original
    assert dvc_status(project) == {"finetune@resnet-cls"}
