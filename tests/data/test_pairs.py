"""The built-in seq2seq task (a function's code → its docstring's summary) and how prepare
filters and splits (source, target) pairs."""

import json
import os
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pytest

from bigmodel import config
from bigmodel.data.code2doc import stdlib_pairs, summary
from bigmodel.errors import BigModelError
from bigmodel.stages import prepare

MODULE = '''
import os


def size(path, follow=True):
    """Return the size of a file, in bytes.  Follows links.

    More text that is not the summary.
    """
    # a comment that is dropped
    return os.stat(path, follow_symlinks=follow).st_size


class Box:
    def open(self):
        """Open the box and return its content."""
        return self._content

    def stub(self):
        """Do nothing at all here."""
        ...

    def short(self):
        """Short."""
        return 1

    def nodoc(self):
        return 2
'''


def test_pairs_are_code_without_its_docstring_and_the_first_summary_sentence(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def f(:\n")
    pairs = stdlib_pairs(tmp_path, [tmp_path / "broken.py", tmp_path / "pkg" / "mod.py"])
    assert pairs["group"].tolist() == ["pkg/mod.py", "pkg/mod.py"]
    assert pairs["target"].tolist() == ["Return the size of a file, in bytes.",
                                        "Open the box and return its content."]
    assert pairs["source"].tolist() == [
        "def size(path, follow=True): return os.stat(path, follow_symlinks=follow).st_size",
        "def open(self): return self._content"]


def test_summary_is_the_first_sentence_of_the_first_paragraph_on_one_line():
    assert summary("Return the\n    sum of two.  Then more.\n\nDetails.", 160) == "Return the sum of two."
    assert summary("Version 3.2 of the thing is returned", 160) == "Version 3.2 of the thing is returned"
    assert summary(">>> f(1)\n2", 160) is None  # does not start with a letter
    assert summary("Too short.", 160) is None
    assert summary("Word " * 50, 20) is None


def test_source_is_cut_at_a_word_boundary(tmp_path):
    body = "    x = 1\n" * 200
    (tmp_path / "m.py").write_text(f'def f():\n    """Compute a long thing here."""\n{body}')
    full = stdlib_pairs(tmp_path, [tmp_path / "m.py"], max_source_chars=10_000)["source"][0]
    source = stdlib_pairs(tmp_path, [tmp_path / "m.py"], max_source_chars=50)["source"][0]
    assert 40 < len(source) <= 50 and full.startswith(source) and full[len(source)] == " "


def test_clean_pairs_applies_length_ratio_and_duplicate_filters_and_counts_each():
    table = pd.DataFrame({
        "source": ["a b c", "a b c", "x", "short", "one two three four five six seven", "ok  then"],
        "target": ["A B C", "A B C", "y", "a much much longer target", "seven", "fine\nthen"],
        "group": ["g1", "g2", "g1", "g1", "g3", "g1"],
    })
    cfg = config.DataRun(pair_min_chars=2, pair_max_chars=30, pair_max_ratio=3.0)
    out, dropped = prepare.clean_pairs(table, cfg)
    assert sorted(zip(out["source"], out["target"])) == [("a b c", "A B C"), ("ok then", "fine then")]
    assert out.loc[out["source"] == "a b c", "group"].tolist() == ["g1"]  # the first copy kept
    assert dropped == {"pairs_in": 6, "pairs_dropped_length": 2, "pairs_dropped_ratio": 1,
                       "pairs_dropped_duplicate": 1}


def test_ratio_filter_off_keeps_lopsided_pairs():
    table = pd.DataFrame({"source": ["def f(): " + "x = 1; " * 20], "target": ["Do it."],
                          "group": ["g"]})
    out, dropped = prepare.clean_pairs(table, config.DataRun())
    assert len(out) == 1 and "pairs_dropped_ratio" not in dropped


FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "parallel"


def pairs_params(tmp_path: Path, data: dict) -> config.Params:
    """Params whose data run `par` is the given source, with a seq2seq model on it."""
    raw = {"data": {"par": {"min_chars": 5, **data}},
           "tokenizer": {"joint": {"kind": "bpe", "data": "par", "text": "seq2seq"}},
           "pretrain": {"s2s": {"family": "seq2seq", "corpus": "par", "tokenizer": "joint"}},
           "finetune": {}}
    params = config.validate(raw)
    params._root = tmp_path
    return params


def fixture_pairs(split: str) -> list[tuple[str, str]]:
    en = (FIXTURE / f"{split}.en").read_text().splitlines()
    de = (FIXTURE / f"{split}.de").read_text().splitlines()
    return list(zip(en, de))


def written(params: config.Params, split: str) -> list[tuple[str, str]]:
    table = pd.read_parquet(params.path("data", "par") / "prepared" / f"seq2seq_{split}.parquet")
    return list(zip(table["source"], table["target"]))


def keeps_the_fixed_split(params: config.Params) -> None:
    prepare.run(params, "par")
    for split, given in (("train", "train"), ("val", "dev"), ("test", "test")):
        assert sorted(written(params, split)) == sorted(fixture_pairs(given)), split
    manifest = json.loads((params.path("data", "par") / "prepared" / "manifest.json").read_text())
    assert manifest["files"]["seq2seq_val.parquet"]["rows"] == 5
    assert manifest["pair_filters"]["pairs_in"] == 30


def test_line_aligned_files_with_one_glob_per_split(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "par")
    params = pairs_params(tmp_path, {"source": "files", "files": {
        "format": "aligned", "target_suffix": "de",
        "splits": {"train": "par/train.en", "val": "par/dev.en", "test": "par/test.en"}}})
    keeps_the_fixed_split(params)


def test_a_table_of_pairs_with_a_split_column(tmp_path):
    shutil.copy(FIXTURE / "pairs.tsv", tmp_path / "pairs.tsv")
    params = pairs_params(tmp_path, {"source": "files", "files": {
        "glob": "pairs.tsv", "source_column": "en", "target_column": "de", "split_column": "split"}})
    keeps_the_fixed_split(params)


def test_a_local_hf_translation_dataset(tmp_path):
    rows = [{"translation": {"en": en, "de": de}} for split in ("train", "dev", "test")
            for en, de in fixture_pairs(split)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "wmt-mini"))
    params = pairs_params(tmp_path, {"source": "hf", "hf": {
        "name": str(tmp_path / "wmt-mini"), "source_column": "translation.en",
        "target_column": "translation.de"}, "val_fraction": 0.2, "test_fraction": 0.2})
    prepare.run(params, "par")
    got = sorted(p for s in ("train", "val", "test") for p in written(params, s))
    assert got == sorted(fixture_pairs("train") + fixture_pairs("dev") + fixture_pairs("test"))
    assert all(len(written(params, s)) > 0 for s in ("val", "test"))
    with pytest.raises(BigModelError, match="has no key 'fr' in every row"):
        prepare.load(pairs_params(tmp_path, {"source": "hf", "hf": {
            "name": str(tmp_path / "wmt-mini"), "source_column": "translation.en",
            "target_column": "translation.fr"}}), "par")


def test_aligned_files_that_do_not_align_are_one_line_naming_both(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    params = pairs_params(tmp_path, {"source": "files", "files": {
        "glob": "*.en", "format": "aligned", "target_suffix": "de"}})
    with pytest.raises(BigModelError, match=r"a.en has 3 lines but a.de has 2"):
        prepare.load(params, "par")
    (tmp_path / "a.de").unlink()
    with pytest.raises(BigModelError, match=r"a.en: no target file a.de beside it"):
        prepare.load(params, "par")
    with pytest.raises(BigModelError, match="source_column and files.target_column go together"):
        pairs_params(tmp_path, {"source": "files", "files": {"glob": "x.tsv", "source_column": "en"}})


def test_a_nested_code_object_is_named_not_addressed():
    # its repr holds a memory address: the built-in seq2seq targets differed between two runs
    from bigmodel.data.bytecode import instructions

    def total(values):  # noqa: ANN001, ANN202
        return sum(v * 2 for v in values) + (lambda: 1)()

    words = instructions(total.__code__)
    assert "<code <genexpr>>" in words and "<code <lambda>>" in words
    assert "0x" not in words and " at " not in words


def test_a_set_constant_is_written_the_same_in_every_process():
    # a frozenset's repr follows string hashing, which differs from process to process: the
    # built-in seq2seq targets differed between two clean-clone runs
    import subprocess
    import sys

    script = ("from bigmodel.data.bytecode import instructions\n"
              "def f(x): return x in {'alpha', 'beta', 'gamma', 'delta', 'eps', None, 3} "
              "or x in ('k', frozenset({'q', 'r', 's'}))\n"
              "print(instructions(f.__code__))")
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}, check=True).stdout
            for seed in range(6)}
    [words] = outs
    assert "frozenset({'alpha', 'beta', 'delta', 'eps', 'gamma', 3, None})" in words
    from bigmodel.data.bytecode import _stable_repr

    for value in [(1,), ("a", 2.5), (), frozenset(), ("x", (None, b"y"))]:  # as repr writes them
        assert _stable_repr(value) == repr(value)
