"""One settings object for dedup: the CLI's defaults are its defaults, it is validated when made,
its manifest form is what earlier releases wrote, and lmpipe's fixer and ftfy's give one output."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer

from lmpipe.cli.app import app
from lmpipe.dataprep.dedup import dedup
from lmpipe.dataprep.dedup_settings import DedupSettings
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
    "bad, named",
    [
        ({"threshold": 1.0}, "0 < threshold < 1"),
        ({"min_chars": -1}, "min_chars >= 0"),
        ({"keep": "last"}, "keep first or longest"),
        ({"hash_scheme": "md5"}, "hash scheme one of"),
        ({"engine": "spark"}, "engine one of local, ray"),
        ({"fixer": "fast"}, "fixer one of lmpipe, ftfy"),
        ({"workers": 0, "ngram": 0}, "ngram >= 1; workers >= 1"),
    ],
)
def test_bad_settings_are_one_line_naming_the_setting(bad, named):
    with pytest.raises(LmpipeError, match=named) as e:
        DedupSettings(**bad)
    assert "\n" not in str(e.value)


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
