"""Reading what `prepare` wrote: `data/<run>/prepared/<kind>_<split>.parquet`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bigmodel.errors import BigModelError
from bigmodel.io import read_parquet


def read_split(prepared: Path, task: str, split: str, name: str) -> pd.DataFrame:
    path = prepared / f"{task}_{split}.parquet"
    if not path.is_file():
        raise BigModelError(f"{path}: not found (finetune.{name} needs its data run's {task} "
                            f"set; run `bigmodel prepare` for it first)")
    return read_parquet(path)
