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


def test_repo_params_file_is_valid_complete_and_equal_to_the_schema_defaults():
    params = config.load(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # every section the schema knows is spelled out in params.yaml, so dvc.yaml can list it
    assert set(raw) == set(config.Params.model_fields)
    # every key of every run is written out, with the value the schema would give it
    assert params.model_dump(mode="json") == config.Params().model_dump(mode="json")
    assert raw == params.model_dump(mode="json")
    assert params.path("data", "stdlib") == (REPO / "data/stdlib").resolve()


def test_misspelt_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = write(tmp_path, "pretrain:\n  gpt:\n    family: gpt\n    lrr: 0.1\n")
    with pytest.raises(BigModelError) as e:
        config.load(path)
    msg = str(e.value)
    assert "unknown key 'pretrain.gpt.lrr'" in msg
    assert "lr, " in msg and "max_steps" in msg
    assert "\n" not in msg


def test_a_bert_run_lists_berts_own_keys(tmp_path):
    path = write(tmp_path, "pretrain:\n  bert:\n    family: bert\n    nps: true\n")
    with pytest.raises(BigModelError, match="unknown key 'pretrain.bert.nps'.*mask_rate.*norm, nsp"):
        config.load(path)


def test_a_dangling_base_is_one_line_naming_the_runs_there_are(tmp_path):
    path = write(tmp_path, "finetune:\n  x:\n    base: bret\n")
    with pytest.raises(BigModelError) as e:
        config.load(path)
    assert str(e.value).endswith("finetune.x.base = 'bret': no such pretrain run (have: bert, gpt, resnet, seq2seq)")
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "check", "--params", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_unknown_top_level_section_is_refused(tmp_path):
    with pytest.raises(BigModelError, match="unknown key 'pretrian'"):
        config.load(write(tmp_path, "pretrian:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pretrain:\n  gpt:\n    family: gpt\n    lr: fast\n",
         "pretrain.gpt.lr = 'fast': Input should be a valid number"),
        ("pretrain:\n  gpt:\n    family: gpt\n    lr: -1\n",
         "pretrain.gpt.lr = -1: Input should be greater than 0"),
        ("data:\n  stdlib:\n    source: s3\n",
         "data.stdlib.source = 's3': Input should be 'builtin', 'files' or 'hf'"),
        ("pretrain:\n  gpt:\n    family: gpt\n    n_embd: 130\n    n_head: 4\n",
         "n_embd (130) must be divisible by n_head (4)"),
        ("data:\n  stdlib:\n    source: files\n", "source 'files' needs files.glob"),
        ("pretrain:\n  gpt:\n    family: t5\n", "pretrain.gpt.family: 't5' is not a model family (one of gpt, bert, seq2seq, resnet)"),
        ("pretrain:\n  gpt:\n    lr: 0.1\n", "pretrain.gpt.family: missing (one of gpt, bert, seq2seq, resnet)"),
        ("pretrain:\n  bert:\n    family: bert\n    parallel: fsdp\n", "use parallel: ddp"),
        ("pretrain:\n  gpt:\n    family: gpt\n    tokenizer: wordpiece\n",
         "pretrain.gpt.tokenizer = 'wordpiece' is a wordpiece tokenizer; a gpt model reads bpe or char"),
        ("pretrain:\n  gpt:\n    family: gpt\n    corpus: books\n",
         "pretrain.gpt.corpus = 'books': no such data run (have: digits, stdlib)"),
        ("finetune:\n  x:\n    base: gpt\n    max_len: 4096\n",
         "finetune.x.max_len (4096) exceeds the block_size of pretrain.gpt (128)"),
        ("data:\n  stdlib: {}\n  digits: {kind: image}\n  reviews:\n    source: files\n    files: {glob: a.csv, label_column: y}\n"
         "finetune:\n  x:\n    base: bert\n    task: token_cls\n    data: reviews\n",
         "finetune.x.task = 'token_cls': data run 'reviews' has no such labelled set (it has: seq_cls)"),
        ("data:\n  stdlib:\n    source: files\n    files: {glob: a.csv, label_column: y}\n"
         "  digits: {kind: image}\n",
         "pretrain.seq2seq.corpus = 'stdlib' has no (source, target) pairs"),
        ("tokenizer:\n  bpe: {}\n  wordpiece: {kind: wordpiece}\n  joint:\n    kind: bpe\n"
         "    data: stdlib\n    text: pretrain\n",
         "pretrain.seq2seq.tokenizer = 'joint' is trained on pretrain text; a seq2seq model needs "
         "a joint vocabulary"),
        ("pretrain:\n  s:\n    family: seq2seq\n    tokenizer: wordpiece\n",
         "pretrain.s.tokenizer = 'wordpiece' is a wordpiece tokenizer; a seq2seq model reads bpe or char"),
        ("finetune:\n  Big Run:\n    base: gpt\n", "finetune.Big Run: a run name is lowercase"),
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
    path = write(tmp_path, "data: {stdlib: {}, digits: {kind: image}}\n"
                           "pretrain:\n  gpt: {family: gpt, objective: clm, corpus: stdlib, "
                           "tokenizer: bpe, lr: 0.1}\n"
                           "finetune:\n  c: {base: gpt, task: seq_cls, data: stdlib}\n")
    params = config.load(path, ["pretrain.gpt.lr=3e-4", "pretrain.gpt.compile=true",
                                "data.stdlib.hf.config=x"])
    assert params.pretrain["gpt"].lr == pytest.approx(3e-4)
    assert params.pretrain["gpt"].compile is True
    assert params.data["stdlib"].hf.config == "x"
    with pytest.raises(BigModelError, match="unknown key 'pretrain.gpt.nope'"):
        config.load(path, ["pretrain.gpt.nope=1"])
    with pytest.raises(BigModelError, match="expected section.key=value"):
        config.load(path, ["pretrain.gpt.lr"])
    # a new run from the command line alone
    params = config.load(path, ["pretrain.small={family: gpt, objective: clm, corpus: stdlib, "
                                "tokenizer: bpe, n_layer: 1}"])
    assert set(params.pretrain) == {"gpt", "small"} and params.pretrain["small"].n_layer == 1


def test_a_run_must_spell_out_the_keys_dvc_yaml_builds_its_stages_from(tmp_path):
    path = write(tmp_path, "pretrain:\n  small:\n    family: gpt\n    n_layer: 1\n"
                           "finetune: {}\n")
    with pytest.raises(BigModelError) as e:
        config.load(path)
    assert str(e.value).endswith("pretrain.small.objective: missing; dvc.yaml builds this run's "
                                 "stages from it, so write it out (a pretrain run names family, "
                                 "objective, corpus, tokenizer)")


def test_missing_params_file(tmp_path):
    with pytest.raises(BigModelError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")


def test_cli_prints_one_line_and_exits_2_on_a_misspelt_key(tmp_path):
    path = write(tmp_path, "finetune:\n  c:\n    base: gpt\n    epochz: 3\n"
                           "pretrain:\n  gpt:\n    family: gpt\n")
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "check", "--params", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown key 'finetune.c.epochz'" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "bigmodel.cli", "check", "--params",
                         str(REPO / "params.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_cli_refuses_a_stage_with_bad_params_before_any_work(tmp_path):
    path = write(tmp_path, "data:\n  stdlib:\n    val_fraction: 0.9\n")
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "prepare", "--params", str(path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.stdlib.val_fraction = 0.9" in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_command_needs_a_run_name_when_there_are_several(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "pretrain", "--params",
                           str(REPO / "params.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "pretrain: several runs (bert, gpt, resnet, seq2seq); name one with --name" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bigmodel.cli", "finetune", "--name", "gtp-cls",
                           "--params", str(REPO / "params.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "finetune.gtp-cls: no such run (have: bert-cls, bert-tag, gpt-cls, resnet-cls)" in proc.stderr


def test_a_pretrain_and_a_finetune_run_cannot_share_a_name(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("\n  bert-cls:\n", "\n  bert:\n", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(BigModelError, match="pretrain.bert and finetune.bert share a name"):
        config.load(path)
