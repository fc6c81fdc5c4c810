"""Expectations on the image data: an image folder, a Hugging Face image dataset and the
built-in digits through `source` and `prepare`; the image processor (`tokenizer` of kind
image) and the arrays `tokenize` writes for a ResNet run; and the config errors of image runs."""

import io
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from bigmodel import cli, config, tracking
from bigmodel.data import images
from bigmodel.errors import BigModelError
from bigmodel.stages import finetune, prepare, pretrain, source, tokenize, tokenizer

SPLITS = ("train", "val", "test")
SHAPES = {"circle": (220, 30, 30), "square": (30, 200, 40), "cross": (40, 60, 230)}
PER_CLASS = 10


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_mlflow_store(tmp_path_factory):  # noqa: ANN201
    """One MLflow store for every stage run of this module, its artifacts beside it: a fresh
    sqlite file per test costs about 1.5 s of table creation, which would triple the module's
    time. (The stages still log exactly as in a project: BIGMODEL_TRACKING_URI is how a user
    points them at another store.)"""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tracking.URI_ENV, f"sqlite:///{root / 'mlflow.db'}")
        params = image_params(root)
        tracking.configure(params)  # creates the experiment, artifacts in root/mlartifacts
        yield


def image_params(tmp_path: Path, name: str = "shapes", **run) -> config.Params:
    """Params whose one data run, `name`, is a data run of images (no model runs)."""
    raw = {"data": {name: {"kind": "image", **run}}, "tokenizer": {}, "pretrain": {},
           "finetune": {}}
    params = config.validate(raw)
    params._root = tmp_path
    return params


def prepared_dir(params: config.Params, name: str) -> Path:
    return params.path("data", name) / "prepared"


def tables(params: config.Params, name: str) -> dict[str, pd.DataFrame]:
    out = prepared_dir(params, name)
    return {s: pd.read_parquet(out / f"image_cls_{s}.parquet") for s in SPLITS}


def manifest(params: config.Params, name: str) -> dict:
    return json.loads((prepared_dir(params, name) / "manifest.json").read_text())


def shape_image(kind: str, i: int) -> Image.Image:
    """A genuinely different picture per class (colour and shape) and per index (size, aspect,
    background), so no two are alike and every one of them needs resizing."""
    w, h = 12 + 3 * i, 12 + 3 * i + (i % 3)
    img = Image.new("RGB", (w, h), (10 + 7 * i, 20 + 5 * i, 15 + 3 * i))
    d = ImageDraw.Draw(img)
    colour, m = SHAPES[kind], max(w // 5, 1)
    if kind == "circle":
        d.ellipse([m, m, w - m, h - m], fill=colour)
    elif kind == "square":
        d.rectangle([m, m, w - m, h - m], fill=colour)
    else:
        width = max(1, w // 6)
        d.line([0, 0, w, h], fill=colour, width=width)
        d.line([0, h, w, 0], fill=colour, width=width)
    return img


def write_folder(folder: Path, per_class: int = PER_CLASS) -> list[Path]:
    """`folder/<class>/<i>.png` (every fourth a JPEG); returns the files written."""
    files = []
    for kind in SHAPES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / kind / (f"{i}.jpg" if i % 4 == 3 else f"{i}.png")
            shape_image(kind, i).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
            files.append(path)
    return files


def truncated_png() -> bytes:
    buf = io.BytesIO()
    shape_image("square", 5).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


CORRUPT = {"garbage": b"not a png", "truncated": truncated_png()}


def folder_params(tmp_path: Path, **run) -> config.Params:
    return image_params(tmp_path, source="files", files={"glob": "images/*/*"}, size=16, **run)


def resized(path: Path, mode: str, size: int = 16) -> np.ndarray:
    """What a file should become: Pillow's own conversion and bilinear resize."""
    img = Image.open(path).convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if mode == "L" else out


def all_groups(parts: dict[str, pd.DataFrame]) -> list[set]:
    return [set(parts[s]["group"]) for s in SPLITS]


def disjoint(sets: list[set]) -> bool:
    return all(not (sets[i] & sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets)))


# --- an image folder --------------------------------------------------------------------------

@pytest.mark.parametrize("corrupt", ["garbage", "truncated"])
def test_an_image_folder_prepares_with_its_one_unreadable_file_counted_and_named(tmp_path, corrupt):
    files = write_folder(tmp_path / "images")
    (tmp_path / "images" / "circle" / "broken.png").write_bytes(CORRUPT[corrupt])
    params = folder_params(tmp_path)

    snap = source.run(params, "shapes")
    assert f"{len(files) + 1} files" in snap  # the snapshot lists the broken file too
    summary = prepare.run(params, "shapes")
    assert summary == f"{len(files)} images 16×16×3 in 3 classes; 1 unreadable (see manifest.json)"

    m = manifest(params, "shapes")
    assert m["unreadable"] == {"count": 1, "first": ["images/circle/broken.png"]}
    assert m["shape"] == [16, 16, 3] and m["duplicates_dropped"] == 0
    assert json.loads(params.metrics_file("prepare", "shapes").read_text())["unreadable_images"] == 1

    parts = tables(params, "shapes")
    assert sum(len(t) for t in parts.values()) == len(files)  # every readable file, once
    for split, t in parts.items():
        assert len(t) > 0 and set(t["label"]) == set(SHAPES)  # stratified: every class
        assert m["files"][f"image_cls_{split}.parquet"]["rows"] == len(t)
        assert (t["label"] == t["group"].map(lambda g: Path(g).parent.name)).all()  # folder name
        assert images.shape_of(t) == (16, 16, 3) and (t["channels"] == 3).all()
        assert t["pixels"].map(len).eq(16 * 16 * 3).all()
    assert disjoint(all_groups(parts))  # no file in two splits
    assert disjoint([set(t["pixels"]) for t in parts.values()])  # nor any picture
    assert set().union(*all_groups(parts)) == {p.relative_to(tmp_path).as_posix() for p in files}

    # each row holds its file decoded and resized, exactly (JPEGs included)
    every = pd.concat(parts.values(), ignore_index=True)
    pixels = images.pixels_of(every, (16, 16, 3))
    for i, group in enumerate(every["group"]):
        np.testing.assert_array_equal(pixels[i], resized(tmp_path / group, "RGB"), err_msg=group)

    # the stored train statistics are those of the train split's rows
    train = images.pixels_of(parts["train"], (16, 16, 3))
    mean, std = images.channel_stats(train)
    assert m["train_mean"] == pytest.approx(mean, abs=1e-12)
    assert m["train_std"] == pytest.approx(std, abs=1e-12)


def test_an_exact_copy_of_an_image_is_dropped_so_it_cannot_sit_in_two_splits(tmp_path):
    files = write_folder(tmp_path / "images", per_class=8)
    shutil.copy(tmp_path / "images" / "circle" / "0.png", tmp_path / "images" / "square" / "zz.png")
    params = folder_params(tmp_path)
    prepare.run(params, "shapes")
    assert manifest(params, "shapes")["duplicates_dropped"] == 1
    parts = tables(params, "shapes")
    groups = set().union(*all_groups(parts))
    assert "images/circle/0.png" in groups and "images/square/zz.png" not in groups  # first stays
    every = pd.concat(parts.values())
    assert len(every) == len(files) and every["pixels"].is_unique


def test_color_gray_gives_one_channel_decoded_as_pillow_converts_to_l(tmp_path):
    write_folder(tmp_path / "images", per_class=8)
    params = folder_params(tmp_path, color="gray")
    prepare.run(params, "shapes")
    assert manifest(params, "shapes")["shape"] == [16, 16, 1]
    parts = tables(params, "shapes")
    for t in parts.values():
        assert images.shape_of(t) == (16, 16, 1) and (t["channels"] == 1).all()
    train = parts["train"]
    pixels = images.pixels_of(train, (16, 16, 1))
    for i, group in enumerate(train["group"]):
        np.testing.assert_array_equal(pixels[i], resized(tmp_path / group, "L"))
    assert len(manifest(params, "shapes")["train_mean"]) == 1


def test_a_fixed_split_of_train_val_test_folders_is_kept_exactly_as_given(tmp_path):
    given = {}
    for n, split in zip((6, 3, 3), SPLITS):
        files = []
        for kind in SHAPES:
            (tmp_path / split / kind).mkdir(parents=True)
            for i in range(n):
                # different pictures per split: index offset, so no duplicates across folders
                path = tmp_path / split / kind / f"{split}{i}.png"
                shape_image(kind, i + {"train": 0, "val": 6, "test": 9}[split]).save(path)
                files.append(path.relative_to(tmp_path).as_posix())
        given[split] = set(files)
    params = image_params(tmp_path, source="files", size=8,
                          files={"splits": {s: f"{s}/*/*" for s in SPLITS}})
    prepare.run(params, "shapes")
    parts = tables(params, "shapes")
    for split in SPLITS:
        assert set(parts[split]["group"]) == given[split]  # nothing moved, nothing lost
        assert "split" not in parts[split]
        assert set(parts[split]["label"]) == set(SHAPES)
    assert manifest(params, "shapes")["source"]["splits"] == {s: f"{s}/*/*" for s in SPLITS}


def test_a_folder_of_only_unreadable_files_is_one_clear_error_not_a_traceback(tmp_path, capsys):
    for i, kind in enumerate(SHAPES):
        (tmp_path / "images" / kind).mkdir(parents=True)
        (tmp_path / "images" / kind / f"{i}.png").write_bytes(CORRUPT["garbage"])
    params = folder_params(tmp_path)
    with pytest.raises(BigModelError) as err:
        prepare.run(params, "shapes")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.shapes.files: none of the 3 images could be read")
    assert "images/circle/0.png" in message  # names one of them
    assert not prepared_dir(params, "shapes").exists()

    # what a user sees: one line on stderr, exit code 2
    (tmp_path / "params.yaml").write_text(
        "data:\n  shapes:\n    kind: image\n    source: files\n    files: {glob: 'images/*/*'}\n"
        "tokenizer: {}\npretrain: {}\nfinetune: {}\n")
    code = cli.main(["prepare", "--params", str(tmp_path / "params.yaml"), "--name", "shapes"])
    out = capsys.readouterr()
    assert code == cli.EXIT_USER_ERROR
    ours = [line for line in out.err.splitlines() if " INFO mlflow" not in line]  # MLflow's logs
    assert len(ours) == 1 and ours[0].startswith("error: data.shapes.files: none of the 3 images")
    assert "Traceback" not in out.err + out.out


def test_every_unreadable_file_is_counted_and_the_first_twenty_named(tmp_path):
    write_folder(tmp_path / "images", per_class=8)
    for i in range(25):
        (tmp_path / "images" / "cross" / f"bad{i:02d}.png").write_bytes(CORRUPT["garbage"])
    params = folder_params(tmp_path)
    prepare.run(params, "shapes")
    unreadable = manifest(params, "shapes")["unreadable"]
    assert unreadable["count"] == 25
    assert unreadable["first"] == [f"images/cross/bad{i:02d}.png" for i in range(20)]
    assert json.loads(params.metrics_file("prepare", "shapes").read_text())["unreadable_images"] == 25


def test_a_glob_matching_no_image_file_is_an_error_naming_the_glob(tmp_path):
    (tmp_path / "images" / "notes").mkdir(parents=True)
    (tmp_path / "images" / "notes" / "readme.txt").write_text("no pictures here")
    with pytest.raises(BigModelError, match=r"data.shapes.files: no png/jpg/jpeg files match "
                                            r"'images/\*/\*'"):
        prepare.run(folder_params(tmp_path), "shapes")


def test_a_16_bit_png_keeps_its_contrast_when_decoded():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 … 63,000 of 65,535
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    got = images.decode(buf.getvalue(), 8, gray=True)[..., 0].astype(int)
    np.testing.assert_allclose(got, ramp / 257, atol=1.0)  # 16 → 8 bits: / 257


# --- a Hugging Face image dataset -------------------------------------------------------------

NAMES = ["cat", "dog", "owl"]


def hf_dataset(path: Path, n: int = 30, junk_row: int | None = None, seed: int = 0) -> Path:
    """A saved image dataset: random pictures of varied sizes, a ClassLabel label (and, with
    `junk_row`, one row whose bytes are no image)."""
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(rng.integers(0, 256, (10 + i % 4, 12 + i % 3, 3), dtype=np.uint8))
            for i in range(n)]
    column: list = list(pics)
    if junk_row is not None:
        column[junk_row] = {"bytes": b"no image at all", "path": None}
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": column, "label": [i % 3 for i in range(n)]},
                                    features=features)
    ds.save_to_disk(str(path))
    return path


def test_a_local_hf_image_dataset_gives_its_classlabel_names_as_labels(tmp_path):
    saved = hf_dataset(tmp_path / "pets", junk_row=4)
    params = image_params(tmp_path, "pets", source="hf", hf={"name": str(saved)}, size=8)
    assert "hf:" in source.run(params, "pets")
    prepare.run(params, "pets")
    parts = tables(params, "pets")
    assert sum(len(t) for t in parts.values()) == 29
    for t in parts.values():
        assert set(t["label"]) == set(NAMES)  # the names, not the indices 0, 1, 2
        assert images.shape_of(t) == (8, 8, 3)
    every = pd.concat(parts.values())
    row = every["group"].map(lambda g: int(g.split()[1]))  # "row <i>"
    assert (every["label"] == row.map(lambda i: NAMES[i % 3])).all()  # each row keeps its label
    assert disjoint(all_groups(parts))
    m = manifest(params, "pets")
    assert m["unreadable"] == {"count": 1, "first": ["row 4"]}
    assert m["source"]["source"] == "hf" and m["source"]["name"] == str(saved)


def test_hf_string_labels_are_kept_as_they_are(tmp_path):
    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict(
        {"picture": [Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)) for _ in range(24)],
         "kind": ["left" if i % 2 else "right" for i in range(24)]},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    params = image_params(tmp_path, "lr", source="hf", size=6, color="gray",
                          hf={"name": str(tmp_path / "saved"), "image_column": "picture",
                              "label_column": "kind"})
    prepare.run(params, "lr")
    parts = tables(params, "lr")
    assert {s: set(t["label"]) for s, t in parts.items()} == {s: {"left", "right"} for s in SPLITS}
    assert images.shape_of(parts["train"]) == (6, 6, 1)


def test_a_split_the_saved_dataset_dict_lacks_is_an_error_naming_what_it_has(tmp_path):
    hf_dataset(tmp_path / "one", n=6)
    ds = datasets.load_from_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    params = image_params(tmp_path, "pets", source="hf",
                          hf={"name": str(tmp_path / "dict"), "split": "validation"})
    with pytest.raises(BigModelError) as err:
        prepare.run(params, "pets")
    assert str(err.value) == (f"data.pets.hf.split: 'validation' not in {tmp_path / 'dict'} "
                              f"(has ['test', 'train'])")


def test_a_saved_dataset_dict_with_its_own_splits_keeps_them(tmp_path):
    parts = {}
    for i, split in enumerate(("train", "validation", "test")):
        hf_dataset(tmp_path / split, n=12, seed=i)  # different pictures in each
        parts[split] = datasets.load_from_disk(str(tmp_path / split))
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dict"))
    params = image_params(tmp_path, "pets", source="hf", hf={"name": str(tmp_path / "dict")})
    prepare.run(params, "pets")
    got = tables(params, "pets")
    assert [len(got[s]) for s in SPLITS] == [12, 12, 12]


@pytest.mark.parametrize("key, column", [("label_column", "species"), ("image_column", "photo")])
def test_a_missing_hf_column_is_a_clear_error_naming_it(tmp_path, key, column):
    saved = hf_dataset(tmp_path / "pets", n=6)
    params = image_params(tmp_path, "pets", source="hf", hf={"name": str(saved), key: column})
    with pytest.raises(BigModelError) as err:
        prepare.run(params, "pets")
    message = str(err.value)
    assert message == f"data.pets.hf: column {column!r} not in {saved} (columns: image, label)"


# --- the built-in digits, the processor, the arrays -------------------------------------------

def digits_raw() -> dict:
    """Every section written out: the schema's defaults for an omitted one name the stdlib data
    run. Two ResNet runs beside the real one: one reading a processor of another size, one with
    a class the data does not have; and a finetune asking for a class train lacks."""
    resnet = {"family": "resnet", "objective": "image_cls", "corpus": "digits"}
    return {
        "data": {"digits": {"kind": "image"}},
        "tokenizer": {"pixels": {"kind": "image", "data": "digits", "text": "image_cls"},
                      "pixels16": {"kind": "image", "data": "digits", "text": "image_cls"}},
        "pretrain": {"resnet": {**resnet, "tokenizer": "pixels"},
                     "resnet16": {**resnet, "tokenizer": "pixels16"},
                     "resnet-x": {**resnet, "tokenizer": "pixels", "classes": ["0", "x"]}},
        "finetune": {"cls-11": {"base": "resnet", "task": "image_cls", "data": "digits",
                                "classes": ["0", "1", "11"]},
                     "cls-one": {"base": "resnet", "task": "image_cls", "data": "digits",
                                 "classes": ["3"]}},
    }


@pytest.fixture(scope="module")
def digits(tmp_path_factory):  # noqa: ANN201
    """The digits chain run once: source, prepare, the processor, tokenize@resnet."""
    params = config.validate(digits_raw())
    params._root = tmp_path_factory.mktemp("digits")
    source.run(params, "digits")
    prepare.run(params, "digits")
    tokenizer.run(params, "pixels")
    tokenize.run(params, "resnet")
    return params


def test_the_builtin_digits_are_1797_gray_8x8_uint8_images_of_10_classes(digits):
    from sklearn.datasets import load_digits

    parts = tables(digits, "digits")
    assert sum(len(t) for t in parts.values()) == 1797
    every = pd.concat(parts.values(), ignore_index=True)
    pixels = images.pixels_of(every, (8, 8, 1))
    assert pixels.dtype == np.uint8 and pixels.shape == (1797, 8, 8, 1)
    assert pixels.min() == 0 and pixels.max() == 255  # 0 … 16 scaled to the full byte
    assert sorted(every["label"].unique()) == [str(d) for d in range(10)]
    # the very images scikit-learn ships, each once, with its own label
    sk = load_digits()
    want = np.rint(sk.images * (255 / 16)).astype(np.uint8)
    got = dict(zip(every["group"], zip(pixels[..., 0], every["label"])))
    for i in (0, 1, 500, 1796):
        np.testing.assert_array_equal(got[f"digits/{i}"][0], want[i])
        assert got[f"digits/{i}"][1] == str(sk.target[i])
    m = manifest(digits, "digits")
    assert m["shape"] == [8, 8, 1] and m["unreadable"]["count"] == 0
    snap = json.loads((digits.path("data", "digits") / "source.json").read_text())
    assert snap["files"] == 1 and snap["entries"][0]["path"] == "digits.csv.gz"


def test_the_digits_resize_and_turn_rgb_when_asked(tmp_path):
    params = image_params(tmp_path, "big", size=12, color="rgb")
    assert prepare.run(params, "big") == "1797 images 12×12×3 in 10 classes"
    train = tables(params, "big")["train"]
    pixels = images.pixels_of(train, images.shape_of(train))
    assert pixels.shape[1:] == (12, 12, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_the_digits_splits_are_stratified_and_disjoint(digits):
    parts = tables(digits, "digits")
    counts = pd.DataFrame({s: t["label"].value_counts() for s, t in parts.items()}).fillna(0)
    assert (counts > 0).all().all()  # every class in every split
    share = counts.div(counts.sum(axis=1), axis=0)
    assert share["test"].between(0.18, 0.22).all()  # test_fraction 0.2, per class
    assert share["val"].between(0.13, 0.17).all()  # val_fraction 0.15
    assert disjoint(all_groups(parts))


def test_the_train_statistics_are_measured_on_train_images_only(digits):
    parts = tables(digits, "digits")
    m = manifest(digits, "digits")
    train = images.pixels_of(parts["train"], (8, 8, 1))
    mean, std = images.channel_stats(train)
    assert m["train_mean"] == pytest.approx(mean, abs=1e-12)
    assert m["train_std"] == pytest.approx(std, abs=1e-12)
    everything = np.concatenate([images.pixels_of(t, (8, 8, 1)) for t in parts.values()])
    all_mean, all_std = images.channel_stats(everything)
    assert abs(all_mean[0] - mean[0]) > 1e-4  # (0.3053 against 0.3044: val/test not mixed in)
    assert abs(all_std[0] - std[0]) > 1e-5


def test_the_processor_holds_the_manifests_train_statistics(digits):
    processor = json.loads((digits.path("tokenizer", "pixels") / "processor.json").read_text())
    m = manifest(digits, "digits")
    assert processor["kind"] == "image" and processor["size"] == 8 and processor["channels"] == 1
    assert processor["mean"] == pytest.approx(m["train_mean"], abs=1e-12)
    assert processor["std"] == pytest.approx(m["train_std"], abs=1e-12)
    assert processor["train_images"] == m["files"]["image_cls_train.parquet"]["rows"]
    metrics = json.loads(digits.metrics_file("tokenizer", "pixels").read_text())
    assert metrics["mean_0"] == pytest.approx(m["train_mean"][0])


def test_tokenize_writes_arrays_equal_to_the_prepared_tables(digits):
    tokens = digits.path("tokens", "resnet")
    meta = json.loads((tokens / "meta.json").read_text())
    assert meta["layout"] == "images" and meta["labels"] == [str(d) for d in range(10)]
    assert (meta["size"], meta["channels"]) == (8, 1)
    parts = tables(digits, "digits")
    for split, t in parts.items():
        x, y = np.load(tokens / f"{split}_images.npy"), np.load(tokens / f"{split}_labels.npy")
        assert x.dtype == np.uint8 and x.shape == (len(t), 8, 8, 1)
        np.testing.assert_array_equal(x, images.pixels_of(t, (8, 8, 1)))
        assert y.dtype == np.int64
        assert [meta["labels"][i] for i in y] == t["label"].tolist()
        assert meta["splits"][split]["images"] == len(t)


def write_processor(params: config.Params, run: str, **changes) -> None:
    good = json.loads((params.path("tokenizer", "pixels") / "processor.json").read_text())
    folder = params.path("tokenizer", run)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "processor.json").write_text(json.dumps({**good, **changes}))


@pytest.mark.parametrize("changes, shape", [({"size": 16}, "16×16×1"), ({"channels": 3}, "8×8×3")],
                         ids=["size", "channels"])
def test_tokenize_refuses_a_processor_of_another_shape(digits, changes, shape):
    write_processor(digits, "pixels16", **changes)
    with pytest.raises(BigModelError) as err:
        tokenize.run(digits, "resnet16")
    message = str(err.value)
    assert "\n" not in message
    assert f"images of (8, 8, 1) but the processor 'pixels16' was fitted on {shape}" in message
    assert not digits.path("tokens", "resnet16").exists()


def test_tokenizes_shape_error_names_the_split_file_that_does_not_fit(digits):
    write_processor(digits, "pixels16", size=16)
    with pytest.raises(BigModelError, match="image_cls_train.parquet"):
        tokenize.run(digits, "resnet16")  # train is the first split checked


def test_the_image_processor_needs_the_prepared_train_images(tmp_path):
    params = config.validate(digits_raw())
    params._root = tmp_path
    with pytest.raises(BigModelError, match=r"image_cls_train.parquet: not found \(run "
                                            r"`bigmodel prepare --name digits` first\)"):
        tokenizer.run(params, "pixels")


# --- config errors --------------------------------------------------------------------------

def text_and_images() -> dict:
    return {
        "data": {"stdlib": {}, "digits": {"kind": "image"}},
        "tokenizer": {"bpe": {"kind": "bpe", "data": "stdlib"},
                      "pixels": {"kind": "image", "data": "digits", "text": "image_cls"}},
        "pretrain": {"gpt": {"family": "gpt", "corpus": "stdlib", "tokenizer": "bpe"},
                     "resnet": {"family": "resnet", "corpus": "digits", "tokenizer": "pixels"}},
        "finetune": {},
    }


def test_the_text_and_image_runs_validate_together():
    params = config.validate(text_and_images())
    assert params.data["digits"].tasks() == {"image_cls"}


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["pretrain"]["resnet"].update(corpus="stdlib"),
     "pretrain.resnet.corpus = 'stdlib' is a text data run; a ResNet trains on images"),
    (lambda r: r["tokenizer"]["pixels"].update(data="stdlib"),
     "tokenizer.pixels: an? image tokenizer on data run 'stdlib' of kind text"),
    (lambda r: r["tokenizer"].update(wp={"kind": "wordpiece", "data": "digits"}),
     "tokenizer.wp: a wordpiece tokenizer on data run 'digits' of kind image"),
    (lambda r: r["finetune"].update(x={"base": "gpt", "task": "image_cls", "data": "digits"}),
     r"finetune.x: task 'image_cls' on pretrain.gpt, a gpt model: image_cls finetunes a ResNet"),
    (lambda r: r["finetune"].update(x={"base": "resnet", "task": "seq_cls", "data": "stdlib"}),
     "finetune.x: task 'seq_cls' on pretrain.resnet, a resnet model"),
    (lambda r: r["pretrain"]["resnet"].update(tokenizer="bpe"),
     "pretrain.resnet.tokenizer = 'bpe' is a bpe tokenizer; a resnet model reads image$"),
    (lambda r: r["data"]["digits"].update(color="blue"),
     "data.digits.color = 'blue'"),
    (lambda r: r["data"]["digits"].update(source="files"),
     r"data.digits: source 'files' needs files.glob \(or files.splits\)"),
])
def test_a_mismatched_image_run_is_one_clear_line_naming_the_key(change, expected):
    raw = text_and_images()
    change(raw)
    with pytest.raises(BigModelError) as err:
        config.validate(raw)
    message = str(err.value)
    assert "\n" not in message
    assert re.match(rf"params: {expected}", message), message


def test_pretrain_classes_not_in_train_are_refused_naming_the_key(digits):
    tokenize.run(digits, "resnet-x")
    with pytest.raises(BigModelError) as err:
        pretrain.run(digits, "resnet-x")
    assert str(err.value) == ("pretrain.resnet-x.classes: ['x'] not in the train split (it has: "
                              "0, 1, 2, 3, 4, 5, 6, 7, 8, 9)")
    assert not digits.path("pretrain", "resnet-x").exists()


@pytest.fixture
def saved_resnet(digits):  # noqa: ANN201
    """A tiny ResNet in models/pretrain/resnet, as the pretrain stage leaves it."""
    import torch

    from bigmodel.models import registry
    from bigmodel.models.resnet import ResNet, ResNetConfig

    torch.manual_seed(0)
    cfg = ResNetConfig(n_classes=10, layers=[1], width=4, stem="small", in_channels=1,
                       image_size=8)
    out = digits.path("pretrain", "resnet")
    registry.save(ResNet(cfg), out, "resnet", "image_cls", cfg,
                  {"labels": [str(d) for d in range(10)]})
    (out / "processor.json").write_text(
        (digits.path("tokenizer", "pixels") / "processor.json").read_text())
    return out


@pytest.mark.parametrize("run, expected", [
    ("cls-11", "finetune.cls-11.classes: ['11'] not in the train split (it has: 0, 1, 2, 3, 4, "
               "5, 6, 7, 8, 9)"),
    ("cls-one", "finetune.cls-one.classes: a classifier needs at least 2 classes, got ['3']"),
])
def test_finetune_classes_the_train_split_cannot_give_are_refused_naming_the_key(
        digits, saved_resnet, run, expected):
    with pytest.raises(BigModelError) as err:
        finetune.run(digits, run)
    assert str(err.value) == expected
    assert not digits.path("finetune", run).exists()


def test_selected_labels_are_sorted_and_default_to_all_of_train():
    train = pd.DataFrame({"label": ["b", "a", "c", "a"]})
    assert images.selected_labels(train, [], "k") == ["a", "b", "c"]
    assert images.selected_labels(train, ["c", "a", "c"], "k") == ["a", "c"]
