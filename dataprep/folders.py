"""Stage folders: each stage reads a folder and writes a folder, `manifest.json` last.

A stage writes into `<out>.partial/` beside the requested output and renames it to `<out>` only
after the manifest is in place, so a folder named `<out>` is always finished, and an interrupted
run leaves only a `.partial` folder that the next run clears (or, for stages that resume, reuses).
The manifest records what was made, from what, with which settings and lmpipe version, counts and
checksums; it holds no timestamp, so data stages are reproducible byte for byte. Its
`format_version` (`FORMAT_VERSIONS`; missing in folders of lmpipe before 2026-12-08: version 1)
lets `read_manifest` refuse a newer lmpipe's folder in one line instead of misreading it.

A stage never writes into what it reads: an output that is, contains or lies inside an input is
refused before anything is touched (`check_output`), and `--overwrite` only ever deletes an empty
folder or an earlier output of the same stage (`made_by`: its manifest names the stage); a
`.partial` work folder is only deleted when its `.lmpipe-owner` file names the stage (`owned_by`).
A run holds an exclusive lock on its `.partial` folder (`.lmpipe-lock`, flock) from before it
clears it until it is published: a second run for the same output (a double launch, a retry of a
job still running) stops with one line instead of deleting the first one's files under it.
`--overwrite` moves the old output aside (`<out>.replaced`) before the new one is renamed in, so a
kill at any moment leaves either output whole, never a manifest beside missing parts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TypeGuard

from lmpipe.dataprep.errors import WRITE_ERRNOS, LmpipeError

MANIFEST = "manifest.json"
# The version of the manifest format (and of what the folder holds) that each stage writes, in
# the manifest's `format_version`. This lmpipe reads its own and every earlier one (a manifest
# without the key is version 1: every lmpipe before it wrote none, and wrote version 1), and
# refuses a higher one (`read_manifest`). A stage's number goes up when a reader of the old one
# would misread the new folder; a key added that an older reader may ignore keeps it (unknown
# keys are ignored). tokenize's is the token shard format's (`shards.FORMAT_VERSION`), which its
# manifests recorded first.
FORMAT_VERSION = 1
FORMAT_VERSIONS = {"tokenize": 1}


def format_version(stage: Any) -> int:
    """The manifest format version this lmpipe writes (and reads up to) for `stage`."""
    return FORMAT_VERSIONS.get(stage, FORMAT_VERSION) if isinstance(stage, str) else FORMAT_VERSION


class NewerFormat(LmpipeError):
    """A folder or file written by a newer lmpipe, in a format this one does not read."""


def check_format_version(path: Path, found: Any, known: int) -> None:
    """Refuse, in one line naming `path`, a `format_version` above `known` (a newer lmpipe's
    file) or one that is not a whole number; a missing one (None) is version 1."""
    version = 1 if found is None else found
    if not is_int(version) or version < 1:
        raise LmpipeError(f"{path}: format_version is {found!r}, not a whole number >= 1")
    if version > known:
        raise NewerFormat(
            f"{path}: written by a newer lmpipe (format_version {version}; this one reads "
            f"{known}): upgrade lmpipe"
        )


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


def umask_mode() -> int:
    """The mode the umask gives a new file (0o666 less it), for a file a library creates with a
    mode of its own (safetensors: 0600 whatever the umask)."""
    mask = os.umask(0)  # the only way to read it; set back at once (lmpipe writes on one thread)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def removed_on_error(tmp: Path) -> Iterator[Path]:
    """For a file written whole to `tmp`, then renamed into place: a write that fails (a full
    disk) or is interrupted leaves no `tmp` behind."""
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that a reader sees the old file or the new one, never half of one. The
    temporary file is made new (a leftover one, or a symbolic link planted at its name in a
    folder someone else made, is removed first, never written through), and the rename replaces
    a link at `path` itself, not the file it points to."""
    with removed_on_error(path.with_name(path.name + ".tmp")) as tmp:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON whole, as `write_text_atomic` writes text."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_manifest(folder: Path, stage: str, **fields: Any) -> dict[str, Any]:
    # No timestamp: the same input and settings give a byte-identical manifest, so a rerun after
    # a crash can be compared with (and is indistinguishable from) an uninterrupted run.
    # A stage with a format of its own (the token shards) passes its `format_version` in
    # `fields`, where its manifests always had it.
    version = {} if "format_version" in fields else {"format_version": format_version(stage)}
    manifest = {
        "stage": stage,
        "lmpipe_version": lmpipe_version(),
        **version,
        **fields,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a finished stage folder; a clear error for anything else, and for a
    manifest of a newer format than this lmpipe reads for its stage (`NewerFormat`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmpipeError(f"{folder}: no such folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise LmpipeError(f"{folder}: no {MANIFEST}, so it is unfinished or not an lmpipe output")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise LmpipeError(f"{path}: not a manifest (a JSON object)")
    check_manifest_version(path, manifest)
    if stage is not None and manifest.get("stage") != stage:
        raise LmpipeError(
            f"{folder}: is the output of `lmpipe {manifest.get('stage')}`, expected `lmpipe {stage}`"
        )
    return manifest


def is_lmpipe_manifest(manifest: Any) -> TypeGuard[dict[str, Any]]:
    """Whether a manifest.json's value is an lmpipe stage's: other tools (a dataset's own files,
    a model download) write files of that name too."""
    return isinstance(manifest, dict) and {"stage", "lmpipe_version"} <= manifest.keys()


def check_not_newer(folder: Path) -> None:
    """Refuse in one line a folder an lmpipe stage wrote in a newer format than this one reads,
    for a reader that needs no manifest (a run's model, metrics or export, which an unfinished
    run or another tool's folder lacks): a manifest that is missing, unreadable or not lmpipe's
    is left to the reader's own checks."""
    path = Path(folder) / MANIFEST
    try:
        manifest = read_json(path) if path.is_file() else None
    except LmpipeError:
        return
    check_manifest_version(path, manifest)


def check_manifest_version(path: Path, manifest: Any) -> None:
    """`check_format_version` for an lmpipe manifest, at its stage's version; another tool's
    manifest.json (a dataset's) has versions of its own and is not checked."""
    if is_lmpipe_manifest(manifest):
        check_format_version(
            path, manifest.get("format_version"), format_version(manifest.get("stage"))
        )


def read_json(path: Path) -> Any:
    """A JSON file's value (NaN and Infinity read as floats). What Python's json cannot read is one
    line naming the file, as are OSErrors' own (a missing file, a folder)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmpipeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise LmpipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError:  # Python's json reads an integer of at most 4,300 digits
        raise LmpipeError(f"{path}: not valid JSON (a number too long to read)") from None
    except RecursionError:
        raise LmpipeError(f"{path}: not valid JSON (nested too deeply to read)") from None


def is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, and a file saying `true` where a count belongs is
    another tool's file, not the count 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number (an integer or a float, never a bool: see `is_int`)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finished(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


REPLACED = ".replaced"  # the longest suffix lmpipe adds to an output's name (check_output)


def replaced_path(out: Path) -> Path:
    """Where `--overwrite` moves the old output while the new one is renamed in."""
    return out.with_name(out.name + REPLACED)


# --- outputs never touch inputs --------------------------------------------------------------

# A folder lmpipe creates for work in progress (`<out>.partial/`, the demo's folder) holds this
# file naming the stage, so that lmpipe only ever deletes a folder it made itself.
OWNER = ".lmpipe-owner"
# The file a running stage holds an flock on, in its `.partial` folder (`lock_folder`).
LOCK = ".lmpipe-lock"


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also right on case-insensitive file systems
    except OSError:
        return False


def _self_and_parents(path: Path) -> list[Path]:
    path = path.resolve()
    return [path, *path.parents]


def relation(out: Path, read: Path) -> str | None:
    """'is', 'lies inside' or 'contains' when the path `out` overlaps the path `read`, else None.
    Paths are compared resolved (symbolic links followed), and existing ones by identity."""
    out, read = Path(out), Path(read)
    if any(p == read.resolve() or _same(p, read) for p in _self_and_parents(out)):
        return "is" if out.resolve() == read.resolve() or _same(out, read) else "lies inside"
    if any(p == out.resolve() or _same(p, out) for p in _self_and_parents(read)):
        return "contains"
    return None


def check_output(out: Path, reads: Iterable[Path | None], what: str = "output folder") -> None:
    """Refuse, before anything is touched, an output (or its `.partial` work folder) that is,
    contains or lies inside anything the stage reads: with `--overwrite` that would delete the
    input, and without it the output would be written into the input. Also refused: an output
    not named by its last part (`.`, `..`, `/`: `new/..` would be a folder that exists only once
    `new` is made), one under a file, and one whose last part is too long for the file system
    once `.partial` or `.replaced` is added to it."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise LmpipeError(f"{out}: name the {what} itself (a path that does not end in . or ..)")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if existing != out.absolute() and not existing.is_dir():
        raise LmpipeError(f"{out}: {existing} is a file, so no {what} can be made under it")
    # A name that fits the file system's limit only without the suffix of the work folder, or of
    # the folder --overwrite uses, would fail on its first stat, as a traceback (Errno 36).
    name_max = _name_max(existing if existing.is_dir() else existing.parent)
    longest = name_max - len(REPLACED)
    if name_max > 0 and len(os.fsencode(out.name)) > longest:
        raise LmpipeError(
            f"{out}: its last part is {len(os.fsencode(out.name))} bytes; at most {longest} here "
            f"(the file system's {name_max}, less {REPLACED!r}, which lmpipe adds to it)"
        )
    for target, name in (
        (out, what),
        (partial_path(out), f"work folder {partial_path(out)} of the {what}"),
        (replaced_path(out), f"folder {replaced_path(out)} that --overwrite uses"),
    ):
        for read in reads:
            if read is None:
                continue
            how = relation(target, Path(read))
            if how is not None:
                raise LmpipeError(
                    f"{out}: the {name} {how} {read}, which this stage reads; "
                    "choose an output outside everything it reads"
                )


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system holding `folder` takes; -1 for none."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except OSError:  # a file system that does not say: the common limit
        return 255


def claim_folder(folder: Path, stage: str) -> None:
    """Create `folder` (if needed) and mark it as made by `stage`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmpipeError(f"{folder}: cannot be created ({e.strerror})") from None
    (folder / OWNER).write_text(stage + "\n", encoding="utf-8")


def owned_by(folder: Path, stage: str) -> bool:
    """Whether `folder` is a real folder marked by `claim_folder` for `stage` (or empty): work in
    progress that lmpipe may delete."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    owner = folder / OWNER
    if owner.is_file() and not owner.is_symlink():
        return owner.read_text(encoding="utf-8", errors="replace").strip() == stage
    return all(p.name == LOCK for p in folder.iterdir())  # empty, or a run's lock before its mark


def clear_folder(folder: Path) -> None:
    """Empty a work folder, keeping lmpipe's marks (its owner, and the lock a run holds)."""
    for entry in folder.iterdir():
        if entry.name not in (OWNER, LOCK):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def remove_owned(folder: Path) -> None:
    """Delete a folder marked by `claim_folder`, its mark last: a deletion cut short leaves a
    folder still marked (or empty), which the next run may delete, never one it must refuse."""
    clear_folder(folder)
    for mark in (LOCK, OWNER):
        (folder / mark).unlink(missing_ok=True)
    folder.rmdir()


@contextlib.contextmanager
def lock_folder(folder: Path, stage: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the block; another holder
    (a second run for the same output) is one line. flock: released by the kernel when the
    process dies, so a killed run leaves no stale lock. Where the file system refuses flock
    (Lustre mounted without `flock`), the block runs unlocked, as before locks existed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LmpipeError(f"{folder}: cannot be created ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LmpipeError(
                f"{folder}: another `lmpipe {stage}` is writing to it now; wait for it or stop "
                "it first"
            ) from None
        except OSError:
            pass  # a file system without flock (Lustre mounted without it): run unlocked
        yield
    finally:
        os.close(fd)


def made_by(folder: Path, stage: str) -> bool:
    """Whether `--overwrite` may delete `folder` for `stage`: an empty real folder, or a finished
    output whose manifest names the stage (of any format version: a newer lmpipe's output of the
    stage is replaced as any other)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        return read_manifest(folder).get("stage") == stage
    except NewerFormat:
        return read_json(folder / MANIFEST).get("stage") == stage  # read whole just before
    except (LmpipeError, AttributeError):
        return False


def check_replaceable(folder: Path, stage: str) -> None:
    """The error for `--overwrite` of a folder that this stage did not make."""
    if not made_by(folder, stage):
        kind = "a file" if folder.is_file() or folder.is_symlink() else "a folder"
        raise LmpipeError(
            f"{folder}: --overwrite only replaces an empty folder or an output of "
            f"`lmpipe {stage}`, and this is {kind} that is neither; remove it yourself or "
            "choose another output"
        )


@contextlib.contextmanager
def writing_into(folder: Path) -> Iterator[None]:
    """A write error without a file name in the block (a write through an open file: json,
    zstd, numpy's short write "N requested and M written") is given `folder`'s name, so that its
    one-line error (cli/stage.py) says where the write failed. Standard output redirected to a
    file fails the same way and cannot be told apart, so it is named too when it is a file;
    other errors (a read's EIO) are left as they are."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or (e.errno is not None and e.errno not in WRITE_ERRNOS):
            raise
        where = f"{folder} (or standard output)" if _stdout_is_a_file() else str(folder)
        raise OSError(e.errno, e.strerror or str(e), where) from e


def _stdout_is_a_file() -> bool:
    """Whether standard output can fail as a file does (a regular file, or a device such as
    /dev/full); a terminal or a pipe cannot give a full disk's error."""
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, ValueError, OSError):  # replaced by an object without a descriptor
        return False
    return stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not sys.stdout.isatty())


@contextlib.contextmanager
def staged_output(
    out: Path,
    *,
    stage: str,
    reads: Iterable[Path | None],
    overwrite: bool = False,
    resume: bool = False,
) -> Iterator[Path]:
    """Yield a work folder for a stage's output; publish it as `out` when the block succeeds.

    Refused before anything is touched: an `out` that is, contains or lies inside a path in
    `reads`; an existing `out` without `overwrite`, or with it when `out` is neither empty nor an
    output of `stage`; a `.partial` folder that this stage did not make. The block must write the
    manifest last (`write_manifest`). On an exception the work folder is removed, unless `resume`
    is set, in which case it stays for the next run to pick up. Either way `out` itself never
    appears unfinished. The work folder is locked for the block (`lock_folder`: a second run for
    the same `out` is refused), and an old `out` moves to `<out>.replaced` whole before the new
    one takes its name.
    """
    out = Path(out)
    check_output(out, reads)
    if out.exists() or out.is_symlink():
        if not overwrite:
            what = "a finished lmpipe output" if is_finished(out) else "in the way"
            raise LmpipeError(f"{out}: already exists ({what}); pass --overwrite to replace it")
        check_replaceable(out, stage)
    aside = replaced_path(out)
    if (aside.exists() or aside.is_symlink()) and not owned_by(aside, stage):
        raise LmpipeError(
            f"{aside}: exists and was not made by `lmpipe {stage}`; remove or rename it"
        )
    work = partial_path(out)
    if (work.exists() or work.is_symlink()) and not owned_by(work, stage):
        raise LmpipeError(
            f"{work}: exists and was not made by `lmpipe {stage}`; remove or rename it"
        )
    with lock_folder(work, stage):
        if not resume:
            clear_folder(work)
        claim_folder(work, stage)
        try:
            with writing_into(work):
                yield work
        except BaseException:
            if not resume:
                shutil.rmtree(work, ignore_errors=True)
            raise
        if not is_finished(work):
            raise RuntimeError(f"stage wrote no {MANIFEST} into {work}")  # a bug, not user input
        # The old output goes aside whole, then the new one takes its name: at no moment is there
        # a folder `out` with a manifest and missing parts (deleting it in place would be one).
        # Marked first, so that an `aside` left by a kill is known as this stage's to delete.
        if aside.exists():
            remove_owned(aside)  # an earlier replacement's, cut short (owned_by checked above)
        if out.exists():
            claim_folder(out, stage)
            os.replace(out, aside)
        os.replace(work, out)
        # After the rename: until then the work folder is marked as lmpipe's, whatever happens.
        (out / OWNER).unlink(missing_ok=True)
        (out / LOCK).unlink(missing_ok=True)
    if aside.exists():
        remove_owned(aside)
