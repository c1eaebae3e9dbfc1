"""One settings object for dedup: the CLI's defaults are its defaults, it is validated when made,
its manifest form is what earlier releases wrote, and lmpipe's fixer and ftfy's give one output."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.dedup_settings import HASH_NAMES, DedupSettings
from lmpipe.dataprep.errors import LmpipeError

# CLI option -> settings field, where the names differ.
CLI_NAMES = {"fix_text": "fix"}
NOT_SETTINGS = {"inputs", "out", "decontaminate", "overwrite"}  # inputs and run options

# The manifest's settings of a default run, as lmpipe wrote them before the settings object.
DEFAULT_MANIFEST = {
    "min_chars": 200, "threshold": 0.8, "num_perm": 128, "ngram": 13, "bands": 18, "rows": 7,
    "lsh_threshold": 0.6000000000000001, "verify": True, "hash": "fnv1a64+fmix64",
    "hash_scheme": "oph", "seed": 1, "exact": True, "near": True, "keep": "first",
    "strict": False, "fix_text": "ftfy.fix_text(normalization='NFC')", "holdout": 0.0,
    "holdout_seed": 42, "decontaminate_field": "text", "decontaminate_ngrams": 0,
    "source_field": None, "text_hash": "sha256(fixed text, utf-8)",
}  # fmt: skip


def test_cli_defaults_are_the_settings_defaults():
    command = typer.main.get_command(app).commands["dedup"]
    fields = {f.name: f.default for f in dataclasses.fields(DedupSettings)}
    seen = set()
    for param in command.params:
        if param.name in NOT_SETTINGS:
            continue
        name = CLI_NAMES.get(param.name, param.name)
        assert name in fields, f"--{param.name} is not a DedupSettings field"
        assert param.default == fields[name], name
        seen.add(name)
    # every setting but the partition size (a test knob) is a CLI option
    assert set(fields) - seen == {"part_entries"}


def test_manifest_form_is_unchanged():
    assert DedupSettings().manifest() == DEFAULT_MANIFEST
    assert list(DedupSettings().manifest()) == list(DEFAULT_MANIFEST)  # same order in the file
    no_near = DedupSettings(near=False).manifest()
    assert no_near["bands"] is None and no_near["threshold"] is None and not no_near["near"]
    assert DedupSettings(hash_scheme="legacy", verify=False).manifest()["lsh_threshold"] == 0.8


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"threshold": 1.0}, "--threshold 1.0: between 0 and 1"),
        ({"lsh_threshold": 2.0}, "--lsh-threshold 2.0: between 0 and 1"),
        ({"min_chars": -1}, "--min-chars -1: 0 or more"),
        ({"keep": "last"}, "--keep 'last': first or longest"),
        ({"hash_scheme": "md5"}, "--hash 'md5': oph, sha1 or affine32"),
        ({"engine": "spark"}, "--engine 'spark': local or ray"),
        ({"fixer": "fast"}, "--fixer 'fast': lmpipe or ftfy"),
        ({"source_field": ""}, "--source-field '': a field name"),
        ({"workers": 0, "ngram": 0}, "--ngram 0: at least 1; -j 0: at least 1"),
    ],
)
def test_bad_settings_are_one_line_naming_the_flag(bad, message):
    """In the words of `lmpipe dedup`'s flags, which is where a user's values come from."""
    with pytest.raises(LmpipeError) as e:
        DedupSettings(**bad)
    assert str(e.value) == message


def test_hash_names_are_the_clis_and_minhashs():
    """--hash sha1 is minhash.py's legacy scheme, from the CLI and from Python alike."""
    from lmpipe.dataprep.minhash import SCHEMES

    assert sorted(HASH_NAMES.values()) == sorted(SCHEMES)
    assert DedupSettings(hash_scheme="sha1") == DedupSettings(hash_scheme="legacy")
    assert DedupSettings(hash_scheme="sha1").manifest()["hash_scheme"] == "legacy"


def test_the_command_reports_bad_values_by_flag(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    args = ["dedup", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(
        app, [*args, "--hash", "foo", "--keep", "y", "--lsh-threshold", "2"]
    )
    assert result.exit_code == 2
    assert result.output == (
        "error: --lsh-threshold 2.0: between 0 and 1; --hash 'foo': oph, sha1 or affine32; "
        "--keep 'y': first or longest\n"
    )


def test_settings_are_frozen_and_unknown_options_refused(tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError):
        DedupSettings().min_chars = 3  # type: ignore[misc]
    with pytest.raises(LmpipeError, match="min_char"):
        dedup([tmp_path], tmp_path / "out", min_char=3, progress=False)


def test_ftfy_fixer_gives_the_same_output(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = [
        "The caf\u00c3\u00a9 \u201cquoted\u201d text &amp; more, line\r\nbreaks \ufb01ne. " * 8,
        "\uff21\uff22 fullwidth and \x1b[1mbold\x1b[0m and Gr\u00fc\u00dfe aus K\u00f6ln. " * 8,
        "plain ASCII text that no fixer touches at all, repeated for length. " * 8,
        "e\u0301 decomposed and \u65e5\u672c\u8a9e text beside it, Ã  la carte. " * 8,
    ]
    (raw / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = dedup([raw], tmp_path / "ours", progress=False)
    ftfys = dedup([raw], tmp_path / "ftfy", DedupSettings(fixer="ftfy"), progress=False)
    assert ours["outputs"] == ftfys["outputs"] and ours["settings"] == ftfys["settings"]
    assert ours["counts"]["total"]["kept"]["documents"] == 4
