"""Images for the `image_cls` task: read a source, decode every picture once, keep it as uint8
pixels.

Sources (`data.<run>.source` of a data run with `kind: image`):
- builtin: scikit-learn's handwritten digits (1,797 gray 8 × 8 images, ten classes), a file
  inside the scikit-learn package this project installs anyway: no download;
- files: an image folder: every PNG / JPEG the glob matches is labelled with the name of the
  folder it is in (`pets/cat/1.jpg` is a `cat`); `files.splits` keeps the user's own
  train / val / test folders as given;
- hf: a Hugging Face image dataset (a local folder in the tests): an Image feature (or PNG /
  JPEG bytes) and a label column (a ClassLabel's names become the labels).

Decoding (Pillow): converted to gray (L) or RGB, resized to one size × size. A file Pillow
cannot read is counted and listed in the manifest; it never stops the run (all of them
unreadable does). A prepared split is a parquet table `image_cls_<split>.parquet` of
`pixels` (the H × W × C uint8 bytes), `label` and `group` (where the image came from), which
`pixels_of` turns back into one (N, H, W, C) array.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bigmodel.config import ImageDataRun
from bigmodel.data import sources
from bigmodel.errors import BigModelError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_SIZE = 32  # files and hf images without a `size`: the CIFAR side
MAX_LISTED = 20  # unreadable files named in the manifest (all are counted)
# an hf dataset with all three of these splits keeps them (the names it may use for each)
HF_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}


@dataclass
class Images:
    """Decoded images (N, H, W, C) uint8 with their labels and groups; `split` is the user's
    fixed split (None: to be assigned)."""

    pixels: np.ndarray
    labels: list[str]
    groups: list[str]
    split: list[str] | None
    description: dict[str, object]
    unreadable: list[str] = field(default_factory=list)
    n_unreadable: int = 0


def builtin_file() -> Path:
    """The digits file inside scikit-learn (what the source stage snapshots), found without
    importing scikit-learn (a second of the source stage's start-up)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise BigModelError("scikit-learn is not installed: the built-in digits come with it")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


def load(cfg: ImageDataRun, root: Path, key: str) -> Images:
    if cfg.source == "builtin":
        digits = load_digits(cfg.size)
        if cfg.color == "rgb":
            digits.pixels = np.repeat(digits.pixels, 3, axis=-1)
        return digits
    if cfg.source == "files":
        return load_folder(cfg, root, f"{key}.files")
    return load_hf(cfg, f"{key}.hf")


def load_digits(size: int) -> Images:
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    if size and size != pixels.shape[1]:
        pixels = np.stack([resize(p, size) for p in pixels])
    return Images(pixels, [str(t) for t in digits.target],
                  [f"digits/{i}" for i in range(len(pixels))], None,
                  {"source": "builtin", "name": "scikit-learn digits",
                   "file": builtin_file().name})


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    out = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return out[..., None] if mode == "L" else out


def decode(data: bytes | Path | Any, size: int, gray: bool) -> np.ndarray | None:
    """One image → (size, size, C) uint8, or None when Pillow cannot read it. `data` is a file,
    PNG / JPEG bytes, or an already open PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(data, Image.Image):
            img = data
        else:
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()  # a truncated file fails here, not later
        if img.mode.startswith("I"):  # 16/32-bit gray: scale to 8 bits (convert would clip)
            wide = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
            img = Image.fromarray(np.clip(np.rint(wide / top * 255), 0, 255).astype(np.uint8), "L")
        img = img.convert("L" if gray else "RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if gray else out


def load_folder(cfg: ImageDataRun, root: Path, key: str) -> Images:
    size, gray = cfg.size or DEFAULT_SIZE, cfg.color == "gray"
    pixels, labels, groups, split, bad = [], [], [], [], []
    for which, paths in sources.split_files(cfg.files, root, key):
        paths = [p for p in paths if p.suffix.lower() in SUFFIXES]
        if not paths:
            raise BigModelError(f"{key}: no {'/'.join(s[1:] for s in SUFFIXES[:3])} files match "
                                f"{cfg.files.glob or cfg.files.splits[which]!r}")  # type: ignore[index]
        for path in paths:
            img = decode(path, size, gray)
            if img is None:
                bad.append(_relative(path, root))
                continue
            pixels.append(img)
            labels.append(path.parent.name)
            groups.append(_relative(path, root))
            split.append(which or "")
    return _collected(pixels, labels, groups, split if cfg.files.splits else None, bad,
                      {"source": "files", "glob": cfg.files.glob,
                       "splits": dict(cfg.files.splits)}, key)


def load_hf(cfg: ImageDataRun, key: str) -> Images:
    """A datasets image dataset; the image column holds PIL images (an Image feature) or dicts
    with PNG / JPEG `bytes` (or a `path`)."""
    import datasets

    spec, size, gray = cfg.hf, cfg.size or DEFAULT_SIZE, cfg.color == "gray"
    local = Path(spec.name)
    try:
        if local.is_dir() and any((local / f).exists() for f in ("dataset_info.json", "state.json",
                                                                  "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(spec.name, spec.config, revision=spec.revision)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise BigModelError(f"{key}: cannot load {spec.name!r}: {e}".splitlines()[0]) from None
    fixed = None
    if isinstance(ds, datasets.DatasetDict):
        own = {s: next((n for n in names if n in ds), None) for s, names in HF_SPLITS.items()}
        if all(own.values()):  # the dataset's own train / validation / test, kept as given
            fixed = [s for s, n in own.items() for _ in range(len(ds[n]))]
            ds = datasets.concatenate_datasets([ds[n] for n in own.values()])  # type: ignore[misc]
        elif spec.split not in ds:
            raise BigModelError(f"{key}.split: {spec.split!r} not in {spec.name} "
                                f"(has {sorted(ds)})")
        else:
            ds = ds[spec.split]
    for column in (spec.image_column, spec.label_column):
        if column not in ds.column_names:
            raise BigModelError(f"{key}: column {column!r} not in {spec.name} "
                                f"(columns: {', '.join(ds.column_names)})")
    feature = ds.features[spec.label_column]
    names = getattr(feature, "names", None)  # a ClassLabel: its names are the labels
    if isinstance(ds.features[spec.image_column], datasets.Image):
        ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))  # decode here, counted
    pixels, labels, groups, bad, split = [], [], [], [], []
    for i, row in enumerate(ds):
        value = row[spec.image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or (Path(value["path"]) if value.get("path") else None)
        img = None if value is None else decode(value, size, gray)
        if img is None:
            bad.append(f"row {i}")
            continue
        label = row[spec.label_column]
        pixels.append(img)
        labels.append(str(names[label]) if names is not None else str(label))
        groups.append(f"row {i}")
        if fixed is not None:
            split.append(fixed[i])
    return _collected(pixels, labels, groups, split if fixed is not None else None, bad,
                      {"source": "hf", "name": spec.name, "config": spec.config,
                       "revision": spec.revision, "split": spec.split,
                       "fingerprint": getattr(ds, "_fingerprint", "")}, key)


def _collected(pixels: list[np.ndarray], labels: list[str], groups: list[str],
               split: list[str] | None, bad: list[str], desc: dict[str, object],
               key: str) -> Images:
    if not pixels:
        raise BigModelError(f"{key}: none of the {len(bad)} images could be read "
                            f"(first: {bad[0] if bad else '-'})")
    return Images(np.stack(pixels), labels, groups, split, desc, bad[:MAX_LISTED], len(bad))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


# --- the prepared table -----------------------------------------------------------------------

def table(images: Images) -> pd.DataFrame:
    """One row per image: pixels (bytes), label, group, channels (and split, when fixed); exact
    duplicates dropped (the first in group order stays), so a copy cannot sit in two splits."""
    out = pd.DataFrame({"pixels": [p.tobytes() for p in images.pixels], "label": images.labels,
                        "group": images.groups,
                        "channels": np.full(len(images.labels), images.pixels.shape[-1], np.int8)})
    if images.split is not None:
        out["split"] = images.split
    out["_k"] = [hashlib.sha256(b).hexdigest() for b in out["pixels"]]
    out = out.sort_values("group", kind="stable").drop_duplicates("_k", keep="first")
    return out.drop(columns="_k").reset_index(drop=True)


def pixels_of(part: pd.DataFrame, shape: tuple[int, int, int]) -> np.ndarray:
    """A prepared table's pixels as one (N, H, W, C) uint8 array."""
    flat = np.frombuffer(b"".join(part["pixels"]), dtype=np.uint8)
    return flat.reshape(len(part), *shape)


def shape_of(part: pd.DataFrame) -> tuple[int, int, int]:
    """(H, W, C) of a prepared table's square images, from its first row's byte count and the
    `channels` column."""
    c = int(part["channels"].iloc[0])
    side = int(round((len(part["pixels"].iloc[0]) / c) ** 0.5))
    return side, side, c


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of (N, H, W, C) uint8 pixels, in [0, 1] units."""
    x = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255
    return [float(v) for v in x.mean(0)], [float(max(v, 1e-3)) for v in x.std(0)]


def processor_of(train: pd.DataFrame) -> dict[str, Any]:
    """The image processor fitted on a prepared train table: what a model of it reads."""
    shape = shape_of(train)
    mean, std = channel_stats(pixels_of(train, shape))
    return {"kind": "image", "size": shape[0], "channels": shape[2], "mean": mean, "std": std,
            "train_images": len(train)}


def read_processor(directory: Path) -> dict[str, Any]:
    import json

    file = directory / "processor.json"
    if not file.is_file():
        raise BigModelError(f"{file}: not found (run `bigmodel tokenizer --name {directory.name}`: "
                            f"an image processor run)")
    return json.loads(file.read_text())


def selected_labels(train: pd.DataFrame, classes: list[str], key: str) -> list[str]:
    """The labels a run trains on: `classes` (each must occur in the train split), or all of
    the train split's; sorted, so a label's index does not depend on row order."""
    have = sorted(train["label"].unique())
    if not classes:
        return have
    missing = [c for c in classes if c not in have]
    if missing:
        raise BigModelError(f"{key}: {missing[:5]} not in the train split (it has: "
                            f"{', '.join(have[:20])})")
    if len(set(classes)) < 2:
        raise BigModelError(f"{key}: a classifier needs at least 2 classes, got {classes}")
    return sorted(set(classes))
