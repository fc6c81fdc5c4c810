"""The whole pipeline, tiny config, through the real Prefect flow, DVC and MLflow."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline import pipeline, stage_names
from tests.conftest import dvc, make_project

STAGES = ["prepare", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate", "explain"]


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
    assert len(parents) == 1 and parents[0].data.metrics["stages_ran"] == 7
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["bigmodel.stage"] for r in children) == sorted(STAGES)
    assert all(r.data.metrics for r in children)
    assert [v.version for v in client.search_model_versions("name='bigmodel-classifier'")] == [1]

    # the report, the explanations
    report = (project / "reports" / "pipeline_report.md").read_text()
    assert "| explain | ran |" in report and "| bow logreg |" in report
    assert parents[0].info.run_id in report
    assert "<html>" in (project / "reports/explain/shap.html").read_text()[:200]
    assert (project / "reports/explain/attention_1.png").stat().st_size > 1000
    assert (project / "reports/explain/shap_0.png").stat().st_size > 1000

    # nothing changed: a second flow run skips every stage and `dvc repro` has nothing to do
    again = pipeline(root=str(project))
    assert [o.status for o in again] == ["skipped"] * 7
    assert "Data and pipelines are up to date" in dvc(project, "repro").stdout

    # one parameter changes: exactly the stage that reads it reruns
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["explain"]["n_examples"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert list(json.loads(dvc(project, "status", "--json").stdout)) == ["explain"]
    third = pipeline(root=str(project))
    assert [o.stage for o in third if o.status == "ran"] == ["explain"]
    assert json.loads((project / "reports/metrics/explain.json").read_text())["n_examples"] == 3
