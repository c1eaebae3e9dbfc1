"""Format versions: every stage manifest and checkpoint marker records the `format_version` it is
written in; a folder of an earlier lmpipe (no version: 1) reads as before, and one of a newer
lmpipe (a higher version) is refused in one line instead of being misread."""

from __future__ import annotations

import json

import pytest

from lmpipe.dataprep.documents import find_inputs
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import check_not_newer, made_by, read_manifest, write_manifest
from lmpipe.dataprep.shards import FORMAT_VERSION, TokenShards, write_shard_folder
from lmpipe.train.checkpoint import MARKER, read_marker

STAGES = (
    "dedup",
    "train",
    "sweep",
    "export",
    "import",
    "eval",
    "scaling",
    "scaling-family",
    "coord-check",
)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_manifest_records_version_1_after_the_lmpipe_version(tmp_path, stage):
    manifest = write_manifest(tmp_path, stage, counts={"kept": 3})
    assert list(manifest) == ["stage", "lmpipe_version", "format_version", "counts"]
    assert manifest["format_version"] == 1
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert read_manifest(tmp_path, stage) == manifest


def test_the_token_manifest_keeps_its_own_version_where_it_was(tmp_path, gpt2):
    """tokenize's version is the shard format's, in the place token manifests always had it."""
    manifest = write_shard_folder(tmp_path / "tokens", {"train": [[1, 2, 3]]})
    assert list(manifest)[:4] == ["stage", "lmpipe_version", "format", "format_version"]
    assert list(manifest).count("format_version") == 1
    assert manifest["format_version"] == FORMAT_VERSION == 1


def write_raw_manifest(folder, manifest):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_of_an_earlier_lmpipe_reads_and_unknown_keys_are_ignored(tmp_path):
    earlier = {"stage": "dedup", "lmpipe_version": "0.1.0", "counts": {"kept": 3}}
    write_raw_manifest(tmp_path / "old", earlier)
    assert read_manifest(tmp_path / "old", "dedup") == earlier
    later = {**earlier, "format_version": 1, "loader_state": {"a": 1}}
    write_raw_manifest(tmp_path / "added", later)
    assert read_manifest(tmp_path / "added", "dedup") == later


@pytest.mark.parametrize("stage", ["dedup", "tokenize", "train", "sweep"])
def test_a_manifest_of_a_newer_format_is_refused_in_one_line(tmp_path, stage):
    write_raw_manifest(
        tmp_path / "new", {"stage": stage, "lmpipe_version": "9", "format_version": 2}
    )
    with pytest.raises(LmpipeError) as e:
        read_manifest(tmp_path / "new", stage)
    assert str(e.value) == (
        f"{tmp_path / 'new' / 'manifest.json'}: written by a newer lmpipe (format_version 2; "
        "this one reads 1): upgrade lmpipe"
    )


@pytest.mark.parametrize("version", ["2", True, 0, 1.5])
def test_a_version_that_is_not_a_whole_number_is_refused(tmp_path, version):
    write_raw_manifest(
        tmp_path / "odd", {"stage": "dedup", "lmpipe_version": "9", "format_version": version}
    )
    with pytest.raises(LmpipeError) as e:
        read_manifest(tmp_path / "odd")
    assert str(e.value) == (
        f"{tmp_path / 'odd' / 'manifest.json'}: format_version is {version!r}, not a whole "
        "number >= 1"
    )


def test_a_newer_token_folder_is_refused_by_its_reader(tmp_path, gpt2):
    folder = tmp_path / "tokens"
    manifest = write_shard_folder(folder, {"train": [[1, 2, 3]]})
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(LmpipeError, match=r"tokens/manifest\.json: written by a newer lmpipe \(format_version 2; this one reads 1\): upgrade lmpipe$"):  # fmt: skip
        TokenShards(folder, "train", verify=False)


def test_a_newer_dedup_output_given_to_tokenize_is_refused_not_read_as_documents(tmp_path):
    """Its files would otherwise be read as the input's own documents."""
    folder = tmp_path / "clean"
    write_raw_manifest(folder, {"stage": "dedup", "lmpipe_version": "9", "format_version": 2})
    (folder / "part-00000.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(LmpipeError, match=r"clean/manifest\.json: written by a newer lmpipe"):
        find_inputs([folder])
    (folder / "manifest.json").write_text(json.dumps({"stage": "dedup", "lmpipe_version": "0"}))
    assert find_inputs([folder]) == [folder / "part-00000.jsonl"]


def write_marker(folder, marker):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps(marker))


def test_a_checkpoint_marker_of_a_newer_format_is_refused_in_one_line(tmp_path):
    marker = {"step": 4, "tokens": 2048, "data": {"data": "ab"}, "files": {"x.pt": "00"}}
    write_marker(tmp_path / "earlier", marker)  # no version: 1
    assert read_marker(tmp_path / "earlier")["step"] == 4
    write_marker(tmp_path / "same", {**marker, "format_version": 1, "loader_state": [1]})
    assert read_marker(tmp_path / "same")["files"] == {"x.pt": "00"}  # unknown keys ignored
    write_marker(tmp_path / "newer", {**marker, "format_version": 2})
    with pytest.raises(LmpipeError) as e:
        read_marker(tmp_path / "newer")
    assert str(e.value) == (
        f"{tmp_path / 'newer' / MARKER}: written by a newer lmpipe (format_version 2; this one "
        "reads 1): upgrade lmpipe"
    )


def test_overwrite_replaces_a_newer_lmpipes_output_of_the_same_stage_only(tmp_path):
    write_raw_manifest(tmp_path / "clean", {"stage": "dedup", "format_version": 2})
    assert made_by(tmp_path / "clean", "dedup")
    assert not made_by(tmp_path / "clean", "tokenize")


def test_another_tools_manifest_with_its_own_format_version_is_input_not_refused(tmp_path):
    """A dataset's own manifest.json (no lmpipe stage) is no lmpipe folder of a newer format."""
    folder = tmp_path / "dataset"
    write_raw_manifest(folder, {"dataset": "web", "format_version": 2})
    (folder / "part-00000.jsonl").write_text('{"text": "a"}\n')
    assert find_inputs([folder]) == [folder / "part-00000.jsonl"]
    check_not_newer(folder)  # nothing to refuse


def test_a_run_or_export_of_a_newer_format_is_refused_by_every_model_reader(tmp_path):
    """eval, generate, export and --init-from open a run through `model_folder`, an HF export
    through `load_hf_model`, plot through `read_curves`, eval --compare an eval folder through
    `read_results`: none needs the manifest, each checks it."""
    from lmpipe.evals.compare import read_results
    from lmpipe.train.checkpoint import model_folder
    from lmpipe.train.hf import load_hf_model
    from lmpipe.train.plot import read_curves

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text('{"model": "m", "tasks": {}}')

    for stage, read in [("train", model_folder), ("export", load_hf_model), ("train", lambda f: read_curves(f, "run")), ("eval", read_results)]:  # fmt: skip
        folder = tmp_path / stage
        write_raw_manifest(folder, {"stage": stage, "lmpipe_version": "9", "format_version": 2})
        with pytest.raises(LmpipeError) as e:
            read(folder)
        assert str(e.value) == (
            f"{folder / 'manifest.json'}: written by a newer lmpipe (format_version 2; this one "
            "reads 1): upgrade lmpipe"
        )
