"""Stage `source@<data run>`: a snapshot of the raw data source, so that DVC can tell when it
changed.

The raw data lives outside DVC's view (the stdlib of this Python, a glob of local files, a hub
dataset). This stage lists it — every file with its size and SHA-256, or the hub dataset's
resolved revision — into `data/<run>/source.json`, which `prepare@<run>` depends on. Refreshing
the snapshots (`dvc repro -f -s source@<run>`, done by both flows) therefore reruns `prepare`
and everything after it exactly when the data changed, and nothing when it did not.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from bigmodel import tracking
from bigmodel.config import HFSource, ImageHF, Params
from bigmodel.data import images, sources
from bigmodel.errors import BigModelError
from bigmodel.io import sha256_file, write_json
from bigmodel.stages import param_keys


def source_file(params: Params, name: str) -> Path:
    return params.path("data", name) / "source.json"


def run(params: Params, name: str) -> str:
    snap = snapshot(params, name)
    with tracking.stage_run(f"source@{name}", params, param_keys(params, "source", name)) as mlrun:
        write_json(source_file(params, name), snap)
        counts = {"files": snap["files"], "bytes": snap["bytes"]}
        write_json(params.metrics_file("source", name), counts)
        mlrun.metrics(counts)
        mlrun.tags({"bigmodel.source_digest": snap["digest"]})
    return f"{snap['source']}: {snap['files']} files, {snap['bytes']:,} bytes, digest {snap['digest'][:12]}"


def snapshot(params: Params, name: str) -> dict[str, object]:
    cfg = params.data[name]
    if cfg.kind == "image" and cfg.source == "builtin":
        file = images.builtin_file()
        entries = file_entries(file.parent, [file])
        where: dict[str, object] = {"builtin": "scikit-learn digits", "file": str(file)}
    elif cfg.source == "builtin":
        root, files = sources.builtin_files()
        entries = file_entries(root, files)
        where = {"stdlib": str(root), "python": sys.version.split()[0]}
    elif cfg.source == "files":
        files = sources.matching_files(cfg.files, params.root, f"data.{name}.files")
        entries = file_entries(params.root, files)
        where = {"glob": cfg.files.glob, "splits": dict(cfg.files.splits)}
    else:
        entries, where = hf_entries(cfg.hf, f"data.{name}.hf")
    stable = {k: v for k, v in where.items() if k != "resolved_error"}  # not part of the data
    blob = json.dumps({"where": stable, "entries": entries}, sort_keys=True).encode()
    return {
        "source": cfg.source,
        **where,
        "files": len(entries),
        "bytes": sum(int(e.get("bytes", 0)) for e in entries),
        "digest": hashlib.sha256(blob).hexdigest(),
        "entries": entries,
    }


def file_entries(root: Path, files: list[Path]) -> list[dict[str, object]]:
    out = []
    for path in files:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        out.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return out


def hf_entries(spec: HFSource | ImageHF, key: str) -> tuple[list[dict[str, object]], dict[str, object]]:
    """A local dataset folder: its files. A hub id: the commit its revision resolves to now
    (needs network; offline, the requested revision is all there is to record)."""
    if not spec.name:
        raise BigModelError(f"{key}.name: empty (a hub dataset id or a local dataset folder)")
    where: dict[str, object] = {"name": spec.name, "config": spec.config,
                                "revision": spec.revision, "split": spec.split}
    local = Path(spec.name)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        return file_entries(local, files), where
    where["resolved"] = None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true", "True"):
        try:
            from huggingface_hub import HfApi

            where["resolved"] = HfApi().dataset_info(spec.name, revision=spec.revision).sha
        except Exception as e:  # noqa: BLE001 - offline or unknown: recorded, not fatal
            where["resolved_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return [], where
