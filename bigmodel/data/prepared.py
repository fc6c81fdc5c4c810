"""Reading what `prepare` wrote: `data/<run>/prepared/<kind>_<split>.parquet`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bigmodel.errors import BigModelError


def read_split(prepared: Path, task: str, split: str, name: str) -> pd.DataFrame:
    path = prepared / f"{task}_{split}.parquet"
    if not path.is_file():
        raise BigModelError(f"{path}: not found (finetune.{name} needs its data run's {task} "
                            f"set; run `bigmodel prepare` for it first)")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a corrupt file
        raise BigModelError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
