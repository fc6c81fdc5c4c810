import subprocess
import sys

import pytest
import yaml

from bigmodel import config
from bigmodel.errors import BigModelError
from tests.conftest import REPO


def write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_file_is_valid_and_complete():
    params = config.load(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # every section the schema knows is spelled out in params.yaml, so dvc.yaml can list it
    assert set(raw) == set(config.Params.model_fields)
    assert params.path("prepared") == (REPO / "data/prepared").resolve()


def test_misspelt_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = write(tmp_path, "pretrain:\n  lrr: 0.1\n")
    with pytest.raises(BigModelError) as e:
        config.load(path)
    msg = str(e.value)
    assert "unknown key 'pretrain.lrr'" in msg
    assert "lr, " in msg and "max_steps" in msg
    assert "\n" not in msg


def test_unknown_top_level_section_is_refused(tmp_path):
    with pytest.raises(BigModelError, match="unknown key 'pretrian'"):
        config.load(write(tmp_path, "pretrian:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pretrain:\n  lr: fast\n", "pretrain.lr = 'fast': Input should be a valid number"),
        ("pretrain:\n  lr: -1\n", "pretrain.lr = -1: Input should be greater than 0"),
        ("prepare:\n  source: s3\n", "prepare.source = 's3': Input should be 'builtin', 'files' or 'hf'"),
        ("pretrain:\n  n_embd: 130\n  n_head: 4\n", "n_embd (130) must be divisible by n_head (4)"),
        ("prepare:\n  source: files\n", "source 'files' needs prepare.files.glob"),
    ],
)
def test_bad_values_get_one_clear_line(tmp_path, text, expected):
    with pytest.raises(BigModelError) as e:
        config.load(write(tmp_path, text))
    assert expected in str(e.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(BigModelError, match=r"line 2: not valid YAML"):
        config.load(write(tmp_path, "pretrain:\n\tlr: 0.1\n"))


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "pretrain:\n  lr: 0.1\n")
    params = config.load(path, ["pretrain.lr=3e-4", "pretrain.compile=true", "prepare.hf.config=x"])
    assert params.pretrain.lr == pytest.approx(3e-4)
    assert params.pretrain.compile is True
    assert params.prepare.hf.config == "x"
    with pytest.raises(BigModelError, match="unknown key 'pretrain.nope'"):
        config.load(path, ["pretrain.nope=1"])
    with pytest.raises(BigModelError, match="expected section.key=value"):
        config.load(path, ["pretrain.lr"])


def test_missing_params_file(tmp_path):
    with pytest.raises(BigModelError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")


def test_cli_prints_one_line_and_exits_2_on_a_misspelt_key(tmp_path):
    path = write(tmp_path, "finetune:\n  epochz: 3\n")
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "check", "--params", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown key 'finetune.epochz'" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "bigmodel.cli", "check", "--params",
                         str(REPO / "params.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_cli_refuses_a_stage_with_bad_params_before_any_work(tmp_path):
    path = write(tmp_path, "prepare:\n  val_fraction: 0.9\n")
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "prepare", "--params", str(path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "prepare.val_fraction = 0.9" in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()
