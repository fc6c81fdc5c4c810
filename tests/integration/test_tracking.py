"""Against a real MLflow SQLite store in a temporary folder."""

import mlflow
import pandas as pd
import pytest

from bigmodel import config, tracking


@pytest.fixture
def params(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    p = config.validate({"tracking": {"experiment": "t", "registered_model": "tiny-clf"}})
    p._root = tmp_path
    return p


def test_stage_runs_nest_under_the_pipeline_run_with_params_metrics_and_lineage(params, tmp_path):
    with tracking.pipeline_run(params, "pipeline test", {"prefect.flow_run": "x"}) as parent:
        with tracking.stage_run("pretrain", params, ["seed", "pretrain"]) as run:
            run.metrics({"val_loss": 2.5}, step=10)
            run.metrics({"val_loss": 2.0}, step=20)
    assert (tmp_path / "mlflow.db").is_file()
    children = tracking.child_runs(params, parent)
    assert [c["stage"] for c in children] == ["pretrain"]
    got = mlflow.get_run(children[0]["run_id"])
    assert got.data.params["pretrain.lr"] == str(params.pretrain.lr)
    assert got.data.tags["bigmodel.stage"] == "pretrain"
    assert len(got.data.tags["bigmodel.params_hash"]) == 12
    history = mlflow.MlflowClient().get_metric_history(run.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 2.0)]
    assert got.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_each_project_logs_to_its_own_store_even_after_mlflow_exported_another(tmp_path):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second project must not inherit it
    stores = []
    for name in ("one", "two"):
        p = config.validate({"tracking": {"experiment": "t"}})
        p._root = tmp_path / name
        p.root.mkdir()
        with tracking.stage_run("prepare", p, ["prepare"]) as run:
            run.metrics({"rows": 1.0})
        stores.append(mlflow.MlflowClient(f"sqlite:///{p.root / 'mlflow.db'}"))
    for client in stores:
        exp = client.get_experiment_by_name("t")
        assert exp is not None and len(client.search_runs([exp.experiment_id])) == 1


def test_tracking_uri_comes_from_params_then_bigmodel_env(params, monkeypatch, tmp_path):
    assert tracking.tracking_uri(params) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking.tracking_uri(params) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    params.tracking.uri = "http://server:5000"
    assert tracking.tracking_uri(params) == "http://server:5000"
    monkeypatch.setenv(tracking.URI_ENV, "http://env:5000")
    assert tracking.tracking_uri(params) == "http://env:5000"


def test_classifier_pyfunc_is_registered_and_answers_text_with_label_and_probabilities(
        params, tiny_classifier_dir):
    with tracking.stage_run("finetune", params, ["finetune"]) as run:
        version = run.log_classifier(tiny_classifier_dir, "tiny-clf", example=["read a file"])
    assert version == "1"
    model = mlflow.pyfunc.load_model("models:/tiny-clf/1")
    out = model.predict(pd.DataFrame({"text": ["open the file", "a button on a window"]}))
    assert list(out.columns) == ["label", "p_asyncio", "p_files", "p_gui"]
    assert set(out["label"]) <= {"asyncio", "files", "gui"}
    assert out[["p_asyncio", "p_files", "p_gui"]].sum(axis=1).round(5).tolist() == [1.0, 1.0]
