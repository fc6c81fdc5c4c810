"""Expectations on the data the prepare stage produces."""

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from bigmodel import config
from bigmodel.config import HFSource
from bigmodel.data import conll
from bigmodel.data import sources
from bigmodel.stages import prepare
from bigmodel.errors import BigModelError


def test_normalise_keeps_code_indentation_but_collapses_prose():
    code = "def f():\r\n    return 1   \r\n"
    assert prepare.normalise(code, collapse_spaces=False) == "def f():\n    return 1"
    assert prepare.normalise("Return  the\n   sum.\t", collapse_spaces=True) == "Return the sum."
    assert prepare.normalise("cafe\u0301", collapse_spaces=True) == "caf\u00e9"  # NFC


def test_clean_drops_short_long_and_duplicate_rows_whatever_the_input_order():
    rows = pd.DataFrame({
        "text": ["ok text here", "x", "y" * 50, "ok text here", "another fine one"],
        "group": ["b", "a", "a", "a", "c"],
    })
    out1 = prepare.clean(rows, min_chars=5, max_chars=20, collapse_spaces=True)
    out2 = prepare.clean(rows.iloc[::-1], min_chars=5, max_chars=20, collapse_spaces=True)
    assert out1["text"].tolist() == ["ok text here", "another fine one"]
    assert out1["group"].tolist() == ["a", "c"]  # the first copy in group order survives
    pd.testing.assert_frame_equal(out1, out2)


def test_stratified_split_keeps_groups_together_and_every_class_in_every_split():
    rows = []
    for label in ("a", "b", "c"):
        for g in range(30):
            rows += [{"text": f"{label}{g}-{i}", "label": label, "group": f"{label}/{g}"}
                     for i in range(1 + g % 4)]
    rows += [{"text": f"big-{i}", "label": "a", "group": "a/huge"} for i in range(200)]
    table = pd.DataFrame(rows)
    where = prepare.stratified_group_split(table, seed=1, val_fraction=0.1, test_fraction=0.1)
    table["split"] = table["group"].map(where)
    assert table.groupby("group")["split"].nunique().max() == 1
    assert where["a/huge"] == "train"  # too big to fit val/test: it would swamp them
    counts = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (counts[["val", "test"]] > 0).all().all()
    for label in ("b", "c"):  # ≈ 10% of each class in each held-out split
        share = counts.loc[label] / counts.loc[label].sum()
        assert 0.05 <= share["test"] <= 0.15 and 0.05 <= share["val"] <= 0.15
    assert where == prepare.stratified_group_split(table, 1, 0.1, 0.1)  # deterministic


def test_builtin_corpus_is_the_stdlib_without_tests_and_has_a_real_task():
    corpus = sources.load_builtin()
    groups = corpus.documents["group"]
    assert not groups.str.contains(r"(?:^|/)(?:test|tests|idle_test)/").any()
    assert (groups == "json/decoder.py").any()
    labelled = corpus.labelled
    assert labelled["label"].nunique() >= 6
    assert len(labelled) >= 2000
    assert set(labelled["group"]) <= set(groups)


def files_params(tmp_path, glob: str = "", **files_kw) -> config.Params:
    """Params whose one data run, `raw`, reads local files (and one GPT pretrains on it)."""
    files = {"glob": glob, **files_kw} if glob else files_kw
    raw = {"data": {"raw": {"source": "files", "min_chars": 5, "label_min_chars": 5,
                            "files": files}},
           "tokenizer": {"bpe": {"data": "raw"}},
           "pretrain": {"gpt": {"family": "gpt", "corpus": "raw"}}, "finetune": {}}
    params = config.validate(raw)
    params._root = tmp_path
    return params


def prepared(params: config.Params):  # noqa: ANN201
    return params.path("data", "raw") / "prepared"


def labelled_rows(n: int = 120) -> list[dict]:
    return [{"review": f"review number {i} is {'great' if i % 2 else 'awful'}",
             "stars": "pos" if i % 2 else "neg", "film": f"film{i % 40}"} for i in range(n)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_files_source_reads_tables_and_prepare_writes_leak_free_splits(tmp_path, fmt):
    table = pd.DataFrame(labelled_rows())
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    params = files_params(tmp_path, f"*.{fmt}", text_column="review", label_column="stars",
                          group_column="film")
    prepare.run(params, "raw")
    out = prepared(params)
    manifest = json.loads((out / "manifest.json").read_text())
    splits = {s: pd.read_parquet(out / f"seq_cls_{s}.parquet") for s in prepare.SPLITS}
    assert sum(len(t) for t in splits.values()) == 120
    for s, t in splits.items():
        assert manifest["files"][f"seq_cls_{s}.parquet"]["rows"] == len(t)
        assert set(t["label"]) == {"pos", "neg"}
    films = [set(t["group"]) for t in splits.values()]
    assert not (films[0] & films[1]) and not (films[0] & films[2]) and not (films[1] & films[2])
    assert json.loads(params.metrics_file("prepare", "raw").read_text())["seq_cls_train_rows"] > 0


def test_txt_files_become_paragraph_documents_without_labels(tmp_path):
    (tmp_path / "book.txt").write_text("\n\n".join(f"Paragraph {i} of the book." for i in range(60)))
    params = files_params(tmp_path, "*.txt")
    corpus = prepare.load(params, "raw")
    assert len(corpus.documents) == 60 and corpus.labelled is None
    prepare.run(params, "raw")
    assert not (prepared(params) / "seq_cls_train.parquet").exists()
    assert (prepared(params) / "pretrain_train.parquet").exists()


def test_files_source_errors_name_the_problem(tmp_path):
    with pytest.raises(BigModelError, match=r"data.raw.files.glob: no files match 'missing/\*.csv'"):
        prepare.load(files_params(tmp_path, "missing/*.csv"), "raw")
    pd.DataFrame(labelled_rows(5)).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(BigModelError, match=r"r.csv: data.raw.files.text_column 'text' is not a column"):
        prepare.load(files_params(tmp_path, "r.csv"), "raw")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, encore un caf\xe9".encode("latin-1"))
    with pytest.raises(BigModelError, match="latin1.txt: not UTF-8 text"):
        prepare.load(files_params(tmp_path, "latin1.txt"), "raw")


def test_hf_source_loads_a_saved_dataset_and_a_folder_of_data_files(tmp_path):
    rows = labelled_rows(40)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    spec = HFSource(name=str(saved), text_column="review", label_column="stars")
    corpus = sources.load_hf(spec)
    assert len(corpus.documents) == 40 and set(corpus.labelled["label"]) == {"pos", "neg"}

    folder = tmp_path / "hub_like"
    folder.mkdir()
    pd.DataFrame(rows).to_json(folder / "train.jsonl", orient="records", lines=True)
    corpus = sources.load_hf(HFSource(name=str(folder), text_column="review"))
    assert corpus.documents["text"].tolist()[:2] == [rows[0]["review"], rows[1]["review"]]
    assert corpus.labelled is None

    with pytest.raises(BigModelError, match="column 'body' not in"):
        sources.load_hf(HFSource(name=str(saved), text_column="body"))


def test_a_labelled_split_that_comes_out_empty_is_an_error(tmp_path):
    rows = [{"review": f"the same film review {i}", "stars": "pos", "film": "one"} for i in range(20)]
    pd.DataFrame(rows).to_csv(tmp_path / "r.csv", index=False)
    params = files_params(tmp_path, "r.csv", text_column="review", label_column="stars",
                          group_column="film")
    with pytest.raises(BigModelError, match="split is empty"):
        prepare.run(params, "raw")
    assert not prepared(params).exists()


def test_a_fixed_split_is_kept_as_given_by_split_column_or_by_one_glob_per_split(tmp_path):
    rows = labelled_rows(90)
    for i, r in enumerate(rows):
        r["part"] = ("train", "dev", "test")[i % 3]
    pd.DataFrame(rows).to_csv(tmp_path / "all.csv", index=False)
    params = files_params(tmp_path, "all.csv", text_column="review", label_column="stars",
                          split_column="part")
    prepare.run(params, "raw")
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        got = pd.read_parquet(prepared(params) / f"seq_cls_{split}.parquet")
        assert sorted(got["text"]) == sorted(r["review"] for r in rows if r["part"] == name)

    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
        part = [r for r in rows if r["part"] == {"val": "dev"}.get(split, split)]
        pd.DataFrame(part).drop(columns="part").to_csv(tmp_path / split / "r.csv", index=False)
    params = files_params(tmp_path, text_column="review", label_column="stars",
                          splits={s: f"{s}/*.csv" for s in ("train", "val", "test")})
    prepare.run(params, "raw")
    val = pd.read_parquet(prepared(params) / "seq_cls_val.parquet")
    assert sorted(val["text"]) == sorted(r["review"] for r in rows if r["part"] == "dev")

    rows[0]["part"] = "holdout"
    pd.DataFrame(rows).to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(BigModelError, match="split_column 'part' has 'holdout'; valid: train, val"):
        prepare.run(files_params(tmp_path, "all.csv", text_column="review", label_column="stars",
                                 split_column="part"), "raw")


CONLL = Path(__file__).resolve().parents[1] / "fixtures" / "conll"


def test_conll_files_with_a_split_per_file_become_a_tagged_set_in_iob2(tmp_path):
    params = files_params(tmp_path, format="conll", splits={
        "train": str(CONLL / "train.txt"), "val": str(CONLL / "dev.txt"),
        "test": str(CONLL / "test.txt")})
    assert params.data["raw"].tasks() == {"token_cls"}
    prepare.run(params, "raw")
    for split, file in (("train", "train.txt"), ("val", "dev.txt"), ("test", "test.txt")):
        table = pd.read_parquet(prepared(params) / f"token_cls_{split}.parquet")
        want = conll.read_conll(CONLL / file)
        assert len(table) == len({(tuple(w), tuple(t)) for w, t in want})  # exact duplicates go
        for tags in table["tags"]:
            assert list(tags) == conll.to_iob2(list(tags))  # IOB2 whatever the file used
    manifest = json.loads((prepared(params) / "manifest.json").read_text())
    assert set(manifest["files"]["token_cls_train.parquet"]["entities"]) <= {"PER", "ORG", "LOC", "MISC"}


def test_the_builtin_source_carries_a_tagging_task_split_by_source_file(tmp_path):
    params = config.validate({"data": {"stdlib": {"max_tagged": 500}, "digits": {"kind": "image"}}})
    params._root = tmp_path
    prepare.run(params, "stdlib")
    out = params.path("data", "stdlib") / "prepared"
    tables = {s: pd.read_parquet(out / f"token_cls_{s}.parquet") for s in prepare.SPLITS}
    assert len(tables["train"]) == 500 and len(tables["test"]) > 200
    files = [set(t["group"]) for t in tables.values()]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    docs = [set(pd.read_parquet(out / f"pretrain_{s}.parquet")["group"]) for s in prepare.SPLITS]
    assert files[2] <= docs[2]  # a test file's lines are tagged in test, its text is test text
    types = {t[2:] for tags in tables["train"]["tags"] for t in tags if t != "O"}
    assert len(types) >= 4
