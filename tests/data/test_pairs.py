"""The built-in seq2seq task (a function's code → its docstring's summary) and how prepare
filters and splits (source, target) pairs."""

import pandas as pd

from bigmodel import config
from bigmodel.data.code2doc import stdlib_pairs, summary
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
