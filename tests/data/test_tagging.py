"""Expectations on the built-in tagging task: names in stdlib code tagged by what they denote."""

import textwrap

from bigmodel.data.sources import builtin_files
from bigmodel.data.tagging import LABELS, stdlib_tagging_examples, tag_source
from bigmodel.tasks.token_cls import entity_scores, most_frequent_tag_baseline


def render(tokens: list[str], tags: list[str]) -> str:
    """`word/TAG` for entities, the bare word for O: one readable string a line."""
    return " ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(tokens, tags))


def examples(tmp_path, sources: dict[str, str], **kwargs) -> list[str]:
    files = []
    for name, code in sources.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code), encoding="utf-8")
        files.append(path)
    table = stdlib_tagging_examples(tmp_path, files, **kwargs)
    return [render(tokens, tags) for tokens, tags in zip(table["tokens"], table["tags"])]


def test_params_imports_classes_and_calls_get_the_exact_expected_tags(tmp_path):
    lines = examples(tmp_path, {"mod.py": '''
        import os.path as osp, sys
        from . import util
        from collections import OrderedDict
        LIMIT = 3  # a global: O

        class Box(object):
            def __init__(self, type):
                self.type = type

            def size(self):
                return len(self.type)

        def make(list, n=len):
            return Box(list), n(list), helper(x=list)

        def helper(x):
            return list(x), type(x), osp.join(x), util.f(sys, OrderedDict, LIMIT)
    '''})
    assert lines == [
        "import os/B-MODULE ./I-MODULE path/I-MODULE as osp/B-MODULE , sys/B-MODULE",
        "from . import util/B-MODULE",
        "from collections/B-MODULE import OrderedDict",
        "class Box/B-CLASS ( object/B-BUILTIN ) :",
        "def __init__/B-FUNC ( self/B-PARAM , type/B-PARAM ) :",
        "self/B-PARAM . type = type/B-PARAM",
        "def size/B-FUNC ( self/B-PARAM ) :",
        "return len/B-BUILTIN ( self/B-PARAM . type )",
        "def make/B-FUNC ( list/B-PARAM , n/B-PARAM = len/B-BUILTIN ) :",
        "return Box/B-CLASS ( list/B-PARAM ) , n/B-PARAM ( list/B-PARAM ) , helper/B-FUNC "
        "( x = list/B-PARAM )",
        "def helper/B-FUNC ( x/B-PARAM ) :",
        "return list/B-BUILTIN ( x/B-PARAM ) , type/B-BUILTIN ( x/B-PARAM ) , osp/B-MODULE . join "
        "( x/B-PARAM ) , util/B-MODULE . f ( sys/B-MODULE , OrderedDict , LIMIT )",
    ]


def test_scope_rules_decide_what_the_same_name_denotes(tmp_path):
    lines = examples(tmp_path, {"scopes.py": '''
        def outer(path):
            def inner():
                return path
            return [path for path in range(path)], lambda path: path

        def other():
            return path

        path = None

        class C:
            kind = int
            def m(self):
                return kind

        def rebinds(data):
            global counter
            data = data or []
            counter = 1
            return counter

        try:
            import json
        except ImportError:
            json = None

        def uses_json():
            return json.dumps(str)
    '''})
    assert lines == [
        "def outer/B-FUNC ( path/B-PARAM ) :",
        "def inner/B-FUNC ( ) :",
        "return path/B-PARAM",  # a closure over outer's parameter
        # the comprehension's own `path` is a local; range(path) runs in outer's scope
        "return [ path for path in range/B-BUILTIN ( path/B-PARAM ) ] , lambda path/B-PARAM : "
        "path/B-PARAM",
        "def other/B-FUNC ( ) :",
        # the module-level `path = None` is a plain global: O
        "class C/B-CLASS :",
        "kind = int/B-BUILTIN",
        "def m/B-FUNC ( self/B-PARAM ) :",
        # `return kind`: a class body's names are invisible to its methods, and no global: O
        "def rebinds/B-FUNC ( data/B-PARAM ) :",
        "data/B-PARAM = data/B-PARAM or [ ]",  # a reassigned parameter stays a parameter
        "import json/B-MODULE",
        "except ImportError/B-BUILTIN :",
        # json is a module in one branch and None in the other: O where it is used
        "def uses_json/B-FUNC ( ) :",
        "return json . dumps ( str/B-BUILTIN )",
    ]


def test_shadowing_a_builtin_at_module_level_makes_it_o_everywhere(tmp_path):
    lines = examples(tmp_path, {"shadow.py": '''
        open = None
        def f(x):
            return open(x), len(x)
    '''})
    assert lines == ["def f/B-FUNC ( x/B-PARAM ) :",
                     "return open ( x/B-PARAM ) , len/B-BUILTIN ( x/B-PARAM )"]


def test_comments_dropped_and_long_strings_shortened():
    lines = tag_source('def f(x):  # a comment\n'
                       '    return x + "short" + "a string literal longer than 24 chars"\n'
                       'y = b"""two\nlines"""\n')
    assert [w for w, _ in lines] == [
        ["def", "f", "(", "x", ")", ":"],
        ["return", "x", "+", '"short"', "+", '"a string literal…"'],  # the first 16 characters
        ["y", "=", 'b"""two…"""'],
    ]


def test_long_lines_entityless_lines_and_unparsable_files_are_dropped(tmp_path):
    long_call = "print(" + ", ".join(["1"] * 40) + ")"  # 82 words
    lines = examples(tmp_path, {"a.py": f"x = 1\n{long_call}\nprint(x)\n",
                                "broken.py": "def f(:\n    pass\n"}, max_words=64)
    assert lines == ["print/B-BUILTIN ( x )"]


def test_rows_are_grouped_by_posix_path_and_deterministic(tmp_path):
    sources = {"pkg/sub/b.py": "import os\n", "a.py": "def f(x): return x\n"}
    examples(tmp_path, sources)
    files = [tmp_path / "pkg/sub/b.py", tmp_path / "a.py"]
    first = stdlib_tagging_examples(tmp_path, files)
    again = stdlib_tagging_examples(tmp_path, files)
    assert first["group"].tolist() == ["pkg/sub/b.py", "a.py"]  # files in the order given
    assert first.equals(again)
    assert list(first.columns) == ["tokens", "tags", "group"]
    assert {t for tags in first["tags"] for t in tags} <= set(LABELS)


def test_real_stdlib_sample_has_many_entity_types_and_the_baseline_is_far_from_perfect():
    root, files = builtin_files()
    sample = files[:: max(1, len(files) // 20)][:20]  # a spread of ~20 files, deterministic
    table = stdlib_tagging_examples(root, sample)
    types = {t[2:] for tags in table["tags"] for t in tags if t != "O"}
    assert len(types) >= 4
    groups = sorted(table["group"].unique())
    test_files = set(groups[::4])  # a file-disjoint split: every 4th file is test
    test = table[table["group"].isin(test_files)]
    train = table[~table["group"].isin(test_files)]
    assert len(test) > 50 and len(train) > 200
    predicted = most_frequent_tag_baseline(train["tokens"].tolist(), train["tags"].tolist(),
                                           test["tokens"].tolist())
    scores = entity_scores(test["tags"].tolist(), predicted)
    assert 0.2 < scores["f1"] < 0.97
