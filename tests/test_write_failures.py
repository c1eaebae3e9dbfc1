"""Writes that fail, and what they leave: a full disk or a file-size limit (RLIMIT_FSIZE in a
subprocess: Python ignores SIGXFSZ, so a write past the limit is EFBIG), standard output on a full
device, a name too long for the file system, a file name that is not UTF-8, the mode of the files
written and the temporary files of single-file writes. Each is one line naming the path, and
nothing half-written is left behind."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import zstandard
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import check_output, staged_output, write_json_atomic
from lmpipe.train import hf, transfer
from lmpipe.train.checkpoint import save_checkpoint
from lmpipe.train.plot import plot
from lmpipe.train.recipe import load_recipe
from tests.test_faults import docs, write_lines
from tests.train.test_plot import synthetic_rows, write_run


def limited(
    limit: int,
    *args: str,
    cwd: Path,
    stdout: Any = subprocess.PIPE,
    env: dict[str, str] | None = None,
):
    """Run `lmpipe args` with a file-size limit of `limit` bytes (0: none) and one thread."""
    script = (
        "import resource, runpy, sys\n"
        f"if {limit}: resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", script, "lmpipe.cli.app", *args],
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=300,
    )


def test_a_file_name_that_is_not_utf8_is_listed_and_dedup_finishes(tmp_path):
    """A Latin-1 `é` in a file name reaches dedup as a surrogate escape: the removed listing
    writes it as a JSON escape that reads back as the same name (it was a crash, every rerun)."""
    name = os.fsdecode(b"part\xe9.jsonl")
    src = write_lines(tmp_path / "raw" / name, docs(3) + docs(3))  # each document twice
    dedup([tmp_path / "raw"], tmp_path / "out", progress=False)
    with zstandard.open(tmp_path / "out" / "removed.ndjson.zst", "rt", encoding="utf-8") as f:
        removed = [json.loads(line) for line in f]
    assert [(r["file"], r["line"], r["reason"]) for r in removed] == [
        (str(src), line, "exact duplicate") for line in (4, 5, 6)
    ]
    assert {r["duplicate_of"]["file"] for r in removed} == {str(src)}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert [i["path"] for i in manifest["inputs"]] == [str(src)]


def test_a_source_name_that_is_not_utf8_is_printed_escaped_under_a_strict_locale(tmp_path):
    """Under a strict UTF-8 stdout (en_US.UTF-8) the report's source column was a crash."""
    write_lines(tmp_path / "raw" / os.fsdecode(b"src\xe9") / "a.jsonl", docs(3))
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    done = limited(0, "dedup", "raw", "-o", "out", cwd=tmp_path, env=strict)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^  src\\udce9 +3 +3 ", done.stdout, re.M)


@pytest.mark.parametrize("umask", [0o022, 0o002])
@pytest.mark.parametrize("shard_bytes", [10**9, 40])
def test_exported_weights_get_the_mode_the_umask_gives(tmp_path, umask, shard_bytes):
    """safetensors creates its file 0600 whatever the umask: an export nobody else could read."""
    old = os.umask(umask)
    try:
        hf.write_safetensors(tmp_path, {"a": torch.zeros(8), "b": torch.ones(8)}, shard_bytes)
    finally:
        os.umask(old)
    written = sorted(tmp_path.glob("*.safetensors"))
    assert len(written) == (1 if shard_bytes == 10**9 else 2)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}


def test_weights_that_cannot_be_opened_are_one_line_with_the_reason(tmp_path, monkeypatch):
    """safetensors says "No such file or directory" of a file it may not open: the real reason
    (here Permission denied, as for a file another user wrote 0600) is named instead."""
    hf.write_safetensors(tmp_path, {"a": torch.zeros(8)}, 10**9)
    path = tmp_path / "model.safetensors"

    def refused(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    if os.geteuid() == 0:  # root opens a file of mode 0: refuse the open lmpipe makes itself
        monkeypatch.setattr(hf, "open", refused, raising=False)
    else:
        path.chmod(0)
    with pytest.raises(LmpipeError) as e:
        with hf.contextlib.ExitStack() as stack:
            hf.open_tensors(tmp_path, stack)
    assert str(e.value) == f"{path}: cannot be read (Permission denied)"


SAVE_UNDER_LIMIT = """
    import resource, sys
    from pathlib import Path
    import torch
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    from lmpipe.dataprep.errors import LmpipeError
    from lmpipe.train.checkpoint import save_model
    from lmpipe.train.hf import write_safetensors
    from lmpipe.train.recipe import load_recipe
    out, state = Path(sys.argv[1]), {"w": torch.zeros(10000)}
    for write in (
        lambda: save_model(None, load_recipe("tiny"), out / "m", state),
        lambda: write_safetensors(out, state, 10**9),
    ):
        try:
            write()
            print("written")
        except LmpipeError as e:
            print(e)
"""


def test_saves_past_a_file_size_limit_name_the_file(tmp_path):
    """torch.save ("unexpected pos") and safetensors ("File too large") name no file of their own."""
    script = textwrap.dedent(SAVE_UNDER_LIMIT)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    torch_line, safetensors_line = done.stdout.splitlines()
    assert torch_line.startswith(f"{tmp_path}/m/model.pt.tmp: cannot be written (")
    assert "unexpected pos" in torch_line
    assert safetensors_line.startswith(f"{tmp_path}/model.safetensors: cannot be written (")
    assert "File too large" in safetensors_line


def test_a_checkpoint_torch_cannot_write_names_its_folder(tmp_path):
    def short_write(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 3008 vs 2902"
        )

    engine = SimpleNamespace(save_checkpoint=short_write)
    run = SimpleNamespace(run_dir=tmp_path, recipe=None, rank=0, world=1, data={})
    with pytest.raises(LmpipeError) as e:
        save_checkpoint(engine, run, step=2, tokens=512)
    assert str(e.value) == (
        f"{tmp_path}/checkpoints/step00000002: cannot be written "
        "([enforce fail at inline_container.cc:672] . unexpected pos 3008 vs 2902)"
    )


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_lines(tmp_path / "raw" / "a.jsonl", docs(400))


def test_dedup_past_a_file_size_limit_is_one_line_naming_its_work_folder(corpus, tmp_path):
    done = limited(20_000, "dedup", "raw", "-o", "out", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    # (the progress display leaves a blank line on stderr before it)
    assert re.fullmatch(r"error: out\.partial: cannot be written \(.+\)", done.stderr.strip())
    assert not (tmp_path / "out").exists()
    done = limited(0, "dedup", "raw", "-o", "out", cwd=tmp_path)  # the rerun finishes
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_a_failed_write_in_training_is_one_line_naming_the_run_folder(
    pattern_tokens, tmp_path, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")  # as metrics.jsonl's write: no file name

    monkeypatch.setattr("lmpipe.train.loop.train", full)
    run = tmp_path / "run"
    args = ["train", "--recipe", "tiny", "--data", str(pattern_tokens), "--run-dir", str(run)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {run}: cannot be written (File too large)\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("args", [["recipes"], ["--help"]])
def test_stdout_on_a_full_device_is_one_line(tmp_path, args):
    """`recipes` prints inside its stage (run_stage), `--help` in click (cli/app.py's main)."""
    with open("/dev/full", "w") as full:
        done = limited(0, *args, cwd=tmp_path, stdout=full)
    assert done.returncode == 2
    assert done.stderr == "error: output cannot be written (No space left on device)\n"


def test_a_name_too_long_for_the_work_folder_is_one_line(tmp_path):
    """Names up to 255 bytes fit the file system, but `.replaced` is added to them."""
    check_output(tmp_path / ("x" * 246), [])
    out = tmp_path / ("x" * 247)
    with pytest.raises(LmpipeError) as e:
        with staged_output(out, stage="test", reads=[]):
            pass
    assert str(e.value) == (
        f"{out}: its last part is 247 bytes; at most 246 here (the file system's 255, less "
        "'.replaced', which lmpipe adds to it)"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def run(tmp_path) -> Path:
    pytest.importorskip("matplotlib")
    return write_run(tmp_path / "run", synthetic_rows())


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_plot_replaces_only_its_own_picture_without_overwrite(run, tmp_path, suffix):
    out = tmp_path / f"fig.{suffix}"
    plot([run], out)
    first = out.stat().st_ino
    plot([run], out)  # its own picture: replaced without a flag (as ./loss.png by default)
    assert out.stat().st_ino != first
    mine = tmp_path / f"mine.{suffix}"
    mine.write_bytes(out.read_bytes().replace(b"lmpipe plot", b"someone els"))
    with pytest.raises(LmpipeError) as e:
        plot([run], mine)
    assert str(e.value) == (
        f"-o {mine}: exists and is not a picture `lmpipe plot` drew; pass --overwrite to replace it"
    )
    assert b"someone els" in mine.read_bytes()
    plot([run], mine, overwrite=True)
    assert b"lmpipe plot" in mine.read_bytes()


def test_plot_refuses_a_symbolic_link_without_overwrite(run, tmp_path):
    target = tmp_path / "target.png"
    plot([run], target)
    link = tmp_path / "link.png"
    link.symlink_to(target)
    with pytest.raises(LmpipeError) as e:
        plot([run], link)
    assert str(e.value) == f"-o {link}: is a symbolic link; pass --overwrite to replace the link"
    assert link.is_symlink()
    plot([run], link, overwrite=True)
    assert not link.is_symlink() and link.is_file()


def failing_replace(src, dst):
    raise OSError(28, "No space left on device", str(dst))


def test_a_failed_plot_leaves_no_temporary_file(run, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(LmpipeError, match="cannot be written"):
        plot([run], tmp_path / "pictures" / "loss.png")
    assert list((tmp_path / "pictures").iterdir()) == []


def test_a_failed_recipe_file_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", failing_replace)
    path = tmp_path / "best.yaml"
    with pytest.raises(LmpipeError, match="cannot be written"):
        transfer.write_recipe_file(
            path, load_recipe("tiny"), tmp_path / "sweep", {"point": 0}, "tiny", overwrite=False
        )
    assert list(tmp_path.iterdir()) == []


def test_a_failed_json_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "manifest.json", {"a": 1, "b": object()})  # fails midway
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_names_the_folder_and_standard_output_when_that_is_a_file(
    tmp_path, monkeypatch
):
    """The block's error has no file name, so it may be standard output's when that is a file
    (a job's log on the same full disk); a read error (EIO) is not called a write."""
    from lmpipe.dataprep.folders import writing_into

    def fail(err: int) -> OSError:
        with pytest.raises(OSError) as caught, writing_into(tmp_path / "out.partial"):
            raise OSError(err, os.strerror(err))
        return caught.value

    monkeypatch.setattr(sys, "stdout", io.StringIO())  # no descriptor: not a file
    assert fail(errno.ENOSPC).filename == str(tmp_path / "out.partial")
    with open(tmp_path / "log.txt", "w") as log:
        monkeypatch.setattr(sys, "stdout", log)
        assert fail(errno.ENOSPC).filename == f"{tmp_path / 'out.partial'} (or standard output)"
        assert fail(errno.EIO).filename is None


def test_a_failed_decode_names_its_file(tmp_path, pattern_tokens, monkeypatch):
    """`inspect --decode` writes through an open file: its error names that file."""

    def full(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr("lmpipe.dataprep.inspection.json.dumps", full)
    # the pattern tokens are not text; any decoding will do for a write that fails
    text = SimpleNamespace(
        decode=lambda tokens, errors: "text", decode_bytes=lambda tokens: b"text"
    )
    monkeypatch.setattr("lmpipe.dataprep.tokenizer.get_encoding", lambda name: text)
    out = tmp_path / "docs.jsonl"
    result = CliRunner().invoke(app, ["inspect", str(pattern_tokens), "--decode", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.endswith("docs.jsonl.partial: cannot be written (File too large)\n")
    assert not out.exists()
