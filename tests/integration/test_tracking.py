"""Against a real MLflow SQLite store in a temporary folder."""

import mlflow
import pandas as pd
import pytest

from bigmodel import config, serving, tracking


@pytest.fixture
def params(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    p = config.validate({"tracking": {"experiment": "t"}})
    p._root = tmp_path
    return p


def test_stage_runs_nest_under_the_pipeline_run_with_params_metrics_and_lineage(params, tmp_path):
    with tracking.pipeline_run(params, "pipeline test", {"prefect.flow_run": "x"}) as parent:
        with tracking.stage_run("pretrain@bert", params, ["seed", "pretrain.bert"]) as run:
            run.metrics({"val_loss": 2.5}, step=10)
            run.metrics({"val_loss": 2.0}, step=20)
    assert (tmp_path / "mlflow.db").is_file()
    children = tracking.child_runs(params, parent)
    assert [c["stage"] for c in children] == ["pretrain@bert"]
    got = mlflow.get_run(children[0]["run_id"])
    assert got.data.params["pretrain.bert.lr"] == str(params.pretrain["bert"].lr)
    assert got.data.params["pretrain.bert.norm"] == "post"
    assert not any(k.startswith("pretrain.gpt") for k in got.data.params)  # its own run only
    assert got.data.tags["bigmodel.stage"] == "pretrain@bert"
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
        with tracking.stage_run("prepare@stdlib", p, ["data.stdlib"]) as run:
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
    with tracking.stage_run("finetune@gpt-cls", params, ["finetune.gpt-cls"]) as run:
        version = serving.log_model(run, tiny_classifier_dir, "tiny-clf", example=["read a file"])
    assert version == "1"
    model = mlflow.pyfunc.load_model("models:/tiny-clf/1")
    out = model.predict(pd.DataFrame({"text": ["open the file", "a button on a window"]}))
    assert list(out.columns) == ["label", "p_asyncio", "p_files", "p_gui"]
    assert set(out["label"]) <= {"asyncio", "files", "gui"}
    assert out[["p_asyncio", "p_files", "p_gui"]].sum(axis=1).round(5).tolist() == [1.0, 1.0]


def test_a_tagger_pyfunc_answers_text_with_words_tags_and_entity_spans(params, tiny_tagger_dir):
    with tracking.stage_run("finetune@bert-tag", params, ["finetune.bert-tag"]) as run:
        version = serving.log_model(run, tiny_tagger_dir, "tiny-tagger", example=["def f(x): ..."])
    model = mlflow.pyfunc.load_model(f"models:/tiny-tagger/{version}")
    out = model.predict(pd.DataFrame({"text": ["def read(path): return open(path)"]}))
    assert list(out.columns) == ["tokens", "tags", "entities"]
    words, tags = list(out["tokens"][0]), list(out["tags"][0])
    assert words == ["def", "read", "(", "path", ")", ":", "return", "open", "(", "path", ")"]
    assert len(tags) == len(words) and set(tags) <= {"O", "B-FUNC", "I-FUNC", "B-PARAM", "I-PARAM"}
    for e in out["entities"][0]:  # every span is a valid IOB2 run of the predicted tags
        assert tags[e["start"]] == f"B-{e['type']}"
        assert e["text"] == " ".join(words[e["start"]: e["end"] + 1])
    from bigmodel.tasks.token_cls import Tagger

    by_words = Tagger.load(tiny_tagger_dir).predict_words([["def", "read", "(", "path", ")"]])
    assert list(by_words["tokens"][0]) == ["def", "read", "(", "path", ")"]
    assert len(by_words["tags"][0]) == 5


def test_the_experiment_is_tagged_as_model_training_for_the_ui(params):
    exp_id = tracking.configure(params)
    exp = mlflow.MlflowClient().get_experiment(exp_id)
    assert exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"


def test_what_a_stage_logs_as_params_is_what_dvc_yaml_lists_for_it(params):
    from bigmodel.stages import param_keys

    params._root = config.Path(__file__).resolve().parents[2]  # the repo's dvc.yaml
    assert param_keys(params, "pretrain", "bert") == ["seed", "pretrain.bert", "tracking.model_prefix",
                                                      "serving"]
    assert param_keys(params, "tokenize", "gpt") == ["tokenize", "pretrain.gpt.corpus",
                                                     "pretrain.gpt.tokenizer"]
    assert param_keys(params, "source", "stdlib") == ["data.stdlib"]
