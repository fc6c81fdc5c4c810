"""The champion gate against a real MLflow registry: when the alias moves, when it stays, and
what the registry records about the decision. Scores are given, so each branch is exercised."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bigmodel import config, promote, serving, tracking
from bigmodel.errors import BigModelError
from bigmodel.io import write_json


@pytest.fixture
def params(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    p = config.validate({"tracking": {"experiment": "gate"}})
    p._root = tmp_path
    return p


def register(params, model_dir: Path, stage_dir: Path) -> str:  # noqa: ANN001
    with tracking.stage_run("finetune@gate", params, ["finetune.gpt-cls"]) as run:
        version = serving.log_model(run, model_dir, "gate-clf", example=["read a file"])
    write_json(stage_dir / "registry.json", {"name": "gate-clf", "version": version})
    return version


def test_the_alias_moves_only_to_a_challenger_better_by_the_margin(params, tiny_classifier_dir,
                                                                  tmp_path):  # noqa: ANN001
    stage_dir = tmp_path / "stage"
    scores = {}

    scored = []

    def score(folder: Path) -> float:  # the challenger is scored in place, the champion downloaded
        scored.append(folder)
        return scores["challenger" if folder == stage_dir else "champion"]

    def gate() -> promote.Decision:
        return promote._gate(params, stage_dir, "macro_f1", score, higher_is_better=True,
                             margin=0.01)

    v1 = register(params, tiny_classifier_dir, stage_dir)
    scores["challenger"] = 0.40
    first = gate()
    assert first.moved and first.champion_after == v1 and first.reason.startswith("no champion yet")
    assert scored == [] and first.challenger_score is None  # nothing to compare: nothing scored
    again = gate()
    assert not again.moved and "already the champion" in again.reason

    v2 = register(params, tiny_classifier_dir, stage_dir)
    scores.update(challenger=0.46, champion=0.40)
    better = gate()
    assert better.moved and better.champion_before == v1 and better.champion_after == v2
    assert math.isclose(better.champion_score, 0.40) and math.isclose(better.challenger_score, 0.46)

    v3 = register(params, tiny_classifier_dir, stage_dir)
    scores.update(challenger=0.465, champion=0.46)  # better, but by less than the margin
    slight = gate()
    assert not slight.moved and slight.champion_after == v2 and "kept v2" in slight.reason

    client = MlflowClient()
    assert str(client.get_model_version_by_alias("gate-clf", "champion").version) == v2
    tags = client.get_model_version("gate-clf", v3).tags
    assert tags["bigmodel.gate.moved"] == "False" and "margin 0.01" in tags["bigmodel.gate.reason"]


def test_lower_is_better_for_bits_per_byte(params, tiny_classifier_dir, tmp_path):  # noqa: ANN001
    stage_dir = tmp_path / "stage"
    register(params, tiny_classifier_dir, stage_dir)
    promote._gate(params, stage_dir, "test_bpb", lambda f: 2.0, higher_is_better=False, margin=0.01)
    v2 = register(params, tiny_classifier_dir, stage_dir)
    bpb = {True: 1.9, False: 2.0}
    d = promote._gate(params, stage_dir, "test_bpb", lambda f: bpb[f == stage_dir],
                      higher_is_better=False, margin=0.01)
    assert d.moved and d.champion_after == v2


def test_text_bpb_is_finite_and_a_missing_registry_file_is_a_clear_error(params, tiny_gpt_dir,
                                                                         tmp_path):  # noqa: ANN001
    texts = ["def read(path):\n    return open(path).read()\n" * 20] * 5
    from bigmodel.tasks import clm

    bpb = clm.text_bpb(tiny_gpt_dir, texts, max_bytes=2000, batch_size=4)
    assert 0 < bpb < 64 and math.isfinite(bpb)
    with pytest.raises(BigModelError, match="registry.json: not found"):
        promote._gate(params, tmp_path / "nowhere", "macro_f1", lambda f: 0.0, True, 0.01)
