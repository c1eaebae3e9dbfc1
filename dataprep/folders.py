"""Stage folders: each stage reads a folder and writes a folder, `manifest.json` last.

A stage writes into `<out>.partial/` beside the requested output and renames it to `<out>` only
after the manifest is in place, so a folder named `<out>` is always finished, and an interrupted
run leaves only a `.partial` folder that the next run clears (or, for stages that resume, reuses).
The manifest records what was made, from what, with which settings and lmpipe version, counts and
checksums; it holds no timestamp, so data stages are reproducible byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError

MANIFEST = "manifest.json"


def lmpipe_version() -> str:
    try:
        return metadata.version("lmpipe")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(folder: Path, stage: str, **fields: Any) -> dict[str, Any]:
    # No timestamp: the same input and settings give a byte-identical manifest, so a rerun after
    # a crash can be compared with (and is indistinguishable from) an uninterrupted run.
    manifest = {
        "stage": stage,
        "lmpipe_version": lmpipe_version(),
        **fields,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a finished stage folder; a clear error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmpipeError(f"{folder}: no such folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise LmpipeError(f"{folder}: no {MANIFEST}, so it is unfinished or not an lmpipe output")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmpipeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if stage is not None and manifest.get("stage") != stage:
        raise LmpipeError(
            f"{folder}: is the output of `lmpipe {manifest.get('stage')}`, expected `lmpipe {stage}`"
        )
    return manifest


def is_finished(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a work folder for a stage's output; publish it as `out` when the block succeeds.

    The block must write the manifest last (`write_manifest`). On an exception the work folder is
    removed, unless `resume` is set, in which case it stays for the next run to pick up. Either way
    `out` itself never appears unfinished.
    """
    out = Path(out)
    if out.exists():
        if not overwrite:
            what = "a finished lmpipe output" if is_finished(out) else "in the way"
            raise LmpipeError(f"{out}: already exists ({what}); pass --overwrite to replace it")
    work = partial_path(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if not is_finished(work):
        raise RuntimeError(f"stage wrote no {MANIFEST} into {work}")  # a bug, not user input
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
