"""Atomic writes: an output either exists whole or not at all."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bigmodel.errors import BigModelError, DiskFull


# A replaced folder waits here, beside the new one, until the new one is in place: a run killed
# at any point leaves either the old output or the new one (`recover` puts back whichever is
# whole), never neither.
ASIDE = ".bigmodel-old"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto `path` only if the block succeeds.

    Works for files and directories alike (whatever the block creates at the temp path). A file
    is replaced by one rename. A folder cannot be, so the old one is renamed aside first, the
    new one renamed in, and only then is the old one deleted; `recover` (run here first, and by
    stages at start-up) finishes or undoes a replacement a kill interrupted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        try:
            yield tmp
        except Exception as e:
            if refused_write(e):
                raise DiskFull(f"{path}: the filesystem refused the write ({refused_write(e)}); "
                               f"free some space and run again (the previous {path.name}, if "
                               f"any, is kept)") from None
            raise
        if path.is_dir() and not path.is_symlink():
            aside = aside_of(path)
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


# what torch (a RuntimeError) and safetensors (its own error) say when a write is refused
REFUSED = {"No space left": "no space left on the device", "StorageFull": "no space left on the "
           "device", "File too large": "over the file-size limit", "FileTooLarge": "over the "
           "file-size limit", "file write failed": "a write failed"}


def refused_write(e: BaseException) -> str:
    """Why the filesystem refused a write, when `e` (or an error it was raised while handling)
    says it did; "" otherwise."""
    seen = e.__cause__ or e.__context__
    if seen is not None and seen is not e:
        why = refused_write(seen)
        if why:
            return why
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return "over the file-size limit"
    text = str(e)
    return next((why for needle, why in REFUSED.items() if needle in text), "")


def aside_of(path: Path) -> Path:
    return path.with_name(f".{path.name}{ASIDE}")


def recover(path: str | Path) -> str:
    """Tidy what an interrupted `atomic_path(path)` left; return what was done ("" for nothing).

    A folder renamed aside comes back when nothing took its place (killed between the two
    renames), and is deleted when the new one is in place (killed before or while deleting it);
    temporary folders (a write that never finished) are deleted.
    """
    path = Path(path)
    done = ""
    aside = aside_of(path)
    if aside.exists():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
            done = f"removed the replaced copy of {path.name}"
        else:
            os.replace(aside, path)
            done = f"restored {path.name} from an interrupted replacement"
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*"):
        if is_temporary(stale, path.name):
            shutil.rmtree(stale, ignore_errors=True)
    return done


def is_temporary(candidate: Path, name: str) -> bool:
    """Whether `candidate` is one of atomic_path's temporary folders for `name`: a folder named
    `.{name}.` and 8 of the characters tempfile.mkdtemp draws from."""
    suffix = candidate.name[len(name) + 2:]
    return (candidate.is_dir() and not candidate.is_symlink()
            and re.fullmatch(r"[a-z0-9_]{8}", suffix) is not None)


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    """A JSON file an earlier stage (or the user) wrote; a missing or damaged one is a
    BigModelError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BigModelError(f"{path}: missing (run the stage that writes it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BigModelError(f"{path}: not valid JSON ({e}); rerun the stage that writes it, "
                            f"or restore it") from None


@contextmanager
def reading_parquet(path: str | Path) -> Iterator[Path]:
    """Around code that reads a parquet table with pyarrow: a missing or damaged one is a
    BigModelError naming it."""
    import pyarrow

    path = Path(path)
    if not path.is_file():
        raise BigModelError(f"{path}: missing (run the stage that writes it)")
    try:
        yield path
    except (pyarrow.ArrowException, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # a real I/O error (a full disk, say)
            raise
        raise BigModelError(f"{path}: not a readable parquet table ({e}); rerun the stage that "
                            f"writes it") from None


def read_parquet(path: str | Path, **kwargs: Any) -> Any:
    """A parquet table an earlier stage wrote; a missing or damaged one is a BigModelError."""
    import pandas as pd

    with reading_parquet(path):
        return pd.read_parquet(path, **kwargs)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
