"""tiktoken's GPT-2 files: a download is said on stderr and ends (a server that never answers is
the one-line error naming TIKTOKEN_CACHE_DIR, not a hang); files in the cache are read with no
network and no output."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from lmpipe.dataprep import tokenizer

# A fresh process (tiktoken keeps a loaded encoding for the life of one) with the download's
# time limit cut to half a second, running the CLI.
CLI = """
import sys
import lmpipe.dataprep.tokenizer as t
t.DOWNLOAD_TIMEOUT_S = 0.5
from lmpipe.cli.app import main
sys.argv = ["lmpipe", *sys.argv[1:]]
main()
"""

# The same, with every connection refused: a cached tokenizer must not need one.
OFFLINE = """
import socket
def refuse(*args, **kwargs):
    raise AssertionError("network access")
socket.socket.connect = refuse
socket.create_connection = refuse
from lmpipe.dataprep.tokenizer import get_encoding
print(get_encoding().encode_ordinary("hello world"))
"""


def environment(cache: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return {**env, "TIKTOKEN_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", **more}


def test_a_proxy_that_never_answers_ends_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "hello world"}\n')
    with socket.socket() as proxy:
        # Listening is enough: the kernel accepts the connection, and nothing ever answers.
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(8)
        address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-c", CLI, "tokenize", "in", "-o", "out"],
            cwd=tmp_path,
            env=environment(tmp_path / "empty", HTTPS_PROXY=address, https_proxy=address),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"tokenizer 'gpt2': downloading its files into {tmp_path / 'empty'}; with no internet, "
        "set TIKTOKEN_CACHE_DIR to a folder that holds them (README, 'Offline')",
        "error: tokenizer 'gpt2': its files could not be loaded (ReadTimeout); with no internet, "
        "set TIKTOKEN_CACHE_DIR to a folder that holds them (README, 'Offline')",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no cache folder


def test_cached_files_are_read_with_no_network_and_no_output(gpt2, tmp_path: Path) -> None:
    # Seeded under tiktoken's own names: a wrong name or address would mean a download here.
    folder, _ = tokenizer.cache_dir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for url in tokenizer.FILES:
        shutil.copy(tokenizer.cache_path(folder, url), tokenizer.cache_path(str(cache), url))
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE],
        env=environment(cache),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "[31373, 995]\n", "")
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        Path(tokenizer.cache_path("", url)).name for url in tokenizer.FILES
    )
