"""The whole pipeline, tiny config, through the real Prefect flow, DVC and MLflow."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline import pipeline, stage_names
from tests.conftest import dvc, make_project

STAGES = ["source", "prepare", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate", "explain"]


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_then_reruns_only_what_changed(tmp_path, prefect_harness):
    project = make_project(tmp_path / "project")
    assert stage_names(project) == STAGES

    outcomes = pipeline(root=str(project))
    assert [(o.stage, o.status) for o in outcomes] == [(s, "ran") for s in STAGES]

    # DVC recorded every stage; its metrics view lists the evaluation
    assert set(yaml.safe_load((project / "dvc.lock").read_text())["stages"]) == set(STAGES)
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    evaluate = shown[""]["data"]["reports/metrics/evaluate.json"]["data"]
    assert 0 <= evaluate["classifier"]["macro_f1"] <= 1
    assert evaluate["baselines"]["majority"]["accuracy"] > 0

    # MLflow: one pipeline run with the seven stage runs nested under it, each with metrics
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bigmodel")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.metrics["stages_ran"] == len(STAGES)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["bigmodel.stage"] for r in children) == sorted(STAGES)
    assert all(r.data.metrics for r in children)
    assert [v.version for v in client.search_model_versions("name='bigmodel-classifier'")] == [1]
    assert [v.version for v in client.search_model_versions("name='bigmodel-gpt'")] == [1]

    # the champion gate promoted both first models, and said why on the versions
    for name in ("bigmodel-classifier", "bigmodel-gpt"):
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == "1"
        assert champion.tags["bigmodel.gate.reason"].startswith("no champion yet")

    # lineage: each stage run carries DVC's hashes of the data it read and the outputs it wrote
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    finetune = next(r for r in children if r.data.tags["bigmodel.stage"] == "finetune")
    got = {d.dataset.name: d.dataset.digest for d in finetune.inputs.dataset_inputs}
    want = {d["path"]: d["md5"] for d in lock["finetune"]["deps"] if not d["path"].startswith("bigmodel/")}
    assert got == want and "models/pretrain" in got
    assert finetune.data.tags["bigmodel.dvc_out.models/finetune"] == lock["finetune"]["outs"][0]["md5"]

    # the report, the explanations
    report = (project / "reports" / "pipeline_report.md").read_text()
    assert "| explain | ran |" in report and "| bow logreg |" in report
    assert parents[0].info.run_id in report
    assert "<html>" in (project / "reports/explain/shap.html").read_text()[:200]
    assert (project / "reports/explain/attention_1.png").stat().st_size > 1000
    assert (project / "reports/explain/shap_0.png").stat().st_size > 1000

    # nothing changed: a second flow run refreshes the source snapshot and skips every stage;
    # `dvc repro` has nothing to do; the champions stay
    again = pipeline(root=str(project))
    assert [o.status for o in again] == ["ran"] + ["skipped"] * (len(STAGES) - 1)
    assert "Data and pipelines are up to date" in dvc(project, "repro").stdout
    assert "v1 is already the champion; kept" in (project / "reports/pipeline_report.md").read_text()

    # one parameter changes: exactly the stage that reads it reruns
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["explain"]["n_examples"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert list(json.loads(dvc(project, "status", "--json").stdout)) == ["explain"]
    third = pipeline(root=str(project))
    assert [o.stage for o in third if o.status == "ran"] == ["source", "explain"]
    assert json.loads((project / "reports/metrics/explain.json").read_text())["n_examples"] == 3

    # overrides from a flow parameter reach the stages through the params file, for this run only
    original = (project / "params.yaml").read_text()
    fourth = pipeline(root=str(project), overrides={"explain.n_examples": 1})
    assert [o.stage for o in fourth if o.status == "ran"] == ["source", "explain"]
    assert json.loads((project / "reports/metrics/explain.json").read_text())["n_examples"] == 1
    assert (project / "params.yaml").read_text() == original
    assert list(json.loads(dvc(project, "status", "--json").stdout)) == ["explain"]
