"""Scheduled retraining on a local-files source, through the real flow, DVC and MLflow:
unchanged data retrains nothing; new data retrains and the champion moves only on merit; with a
DVC remote the run pushes, and a cache deleted afterwards comes back with `dvc pull`."""

import json
import shutil

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bigmodel.data.sources import load_builtin
from flows.retrain import retrain
from tests.conftest import dvc, git, make_project

# one data run of local files, pretrained on and finetuned on by the GPT chain alone
FILES = {"data": {"raw": {"source": "files", "files": {
    "glob": "raw/*.jsonl", "text_column": "text", "label_column": "label", "group_column": "group"}}},
    "tokenizer": {"bpe": {"data": "raw"}}, "pretrain": {"gpt": {"corpus": "raw"}},
    "finetune": {"gpt-cls": {"data": "raw"}}}
ONLY = {"data": ["raw"], "tokenizer": ["bpe"], "pretrain": ["gpt"], "finetune": ["gpt-cls"]}
MODELS = ("bigmodel-gpt-cls", "bigmodel-gpt")


def write_part(project, name: str, rows: pd.DataFrame) -> None:  # noqa: ANN001
    (project / "raw").mkdir(exist_ok=True)
    rows.to_json(project / "raw" / name, orient="records", lines=True)


@pytest.mark.slow
def test_retrain_skips_unchanged_data_and_gates_the_champion_after_new_data(tmp_path,  # noqa: ANN001
                                                                           prefect_harness):
    labelled = load_builtin().labelled
    families = ["asyncio", "email", "files", "numeric"]
    pool = labelled[labelled["label"].isin(families)].sample(frac=1.0, random_state=0)
    pool = pool.groupby("label").head(120)
    first, second = pool.iloc[: len(pool) // 2], pool.iloc[len(pool) // 2:]
    project = make_project(tmp_path / "project", FILES, only=ONLY)
    write_part(project, "part1.jsonl", first)

    # first run: everything trains; there is no champion yet, so both models take the alias
    one = retrain(root=str(project))
    assert one.data_changed and "explain@gpt-cls" in one.retrained
    assert set(one.moved) == set(MODELS)
    assert not one.pushed  # no DVC remote yet

    # unchanged data: the snapshot is refreshed, nothing else runs, the champion stays
    two = retrain(root=str(project))
    assert two.summary == "no change, champion kept"
    assert two.retrained == [] and not two.data_changed and two.moved == []
    report = (project / "reports/retrain_report.md").read_text()
    assert "- data: no change" in report and "- retrained: nothing" in report

    # new data and a DVC remote: everything downstream of the data retrains; the gate decides
    remote = tmp_path / "remote"
    assert dvc(project, "remote", "add", "-d", "local", str(remote)).returncode == 0
    write_part(project, "part2.jsonl", second)
    three = retrain(root=str(project))
    assert three.data_changed and three.pushed
    assert {"prepare@raw", "tokenizer@bpe", "tokenize@gpt", "pretrain@gpt", "evaluate-pretrain@gpt",
            "finetune@gpt-cls", "evaluate@gpt-cls"} <= set(three.retrained)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for name in MODELS:
        newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        assert newest == 2
        tags = client.get_model_version(name, "2").tags
        champion = str(client.get_model_version_by_alias(name, "champion").version)
        assert champion == ("2" if name in three.moved else "1")
        assert tags["bigmodel.gate.moved"] == str(name in three.moved)
        assert tags["bigmodel.gate.reason"] in (project / "reports/retrain_report.md").read_text()
    assert "- data: changed" in (project / "reports/retrain_report.md").read_text()

    # the remote holds every output: with the cache and the outputs gone, `dvc pull` restores them
    git(project, "add", "-A")
    git(project, "commit", "-qm", "retrained")
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "models")
    shutil.rmtree(project / "data" / "raw" / "prepared")
    assert dvc(project, "pull").returncode == 0
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    assert (project / "models/finetune/gpt-cls/model.safetensors").is_file()
