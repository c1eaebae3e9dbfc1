"""The tokenizer of BTLM and Cerebras-GPT: tiktoken's GPT-2 BPE (50,257 ids, end-of-text 50256).

tiktoken downloads its GPT-2 files at first use and caches them (`TIKTOKEN_CACHE_DIR`); offline,
point that variable at a folder seeded with the files. A download is announced on stderr and made
here, with a time limit, into tiktoken's cache: tiktoken's own has none, and a proxy that accepts
the connection and never answers would hang the command. `ranks_sha256` fingerprints the vocabulary
so a shard folder made with another tokenizer is refused.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import uuid
from typing import TYPE_CHECKING

from lmpipe.dataprep.errors import LmpipeError

if TYPE_CHECKING:  # for annotations only: `get_encoding` imports tiktoken at first use
    import tiktoken

NAME = "gpt2"
VOCAB_SIZE = 50257
EOT_ID = 50256

# GPT-2's files as tiktoken_ext/openai_public.py names them (address, sha256 of the content):
# tiktoken caches each under the sha1 of its address and checks the sha256 when it reads it.
GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
FILES = {
    GPT2_FILES + "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    GPT2_FILES + "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# Seconds a download may wait for the server to connect or to send more (requests' timeout).
DOWNLOAD_TIMEOUT_S = 30.0


@functools.cache
def get_encoding(name: str = NAME) -> tiktoken.Encoding:
    import tiktoken

    try:
        if name == NAME:
            fetch_files()
        enc = tiktoken.get_encoding(name)
    except LmpipeError:
        raise
    except Exception as e:  # network errors come in many types; all mean "files unavailable"
        raise LmpipeError(
            f"tokenizer {name!r}: its files could not be loaded ({type(e).__name__}); with no "
            "internet, set TIKTOKEN_CACHE_DIR to a folder that holds them (README, 'Offline')"
        ) from None
    if name == NAME and (enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_ID):
        raise LmpipeError(f"tokenizer {name!r}: unexpected vocabulary ({enc.n_vocab} ids)")
    return enc


def cache_dir() -> tuple[str, bool]:
    """tiktoken's cache folder ("" turns caching off) and whether the user chose it (tiktoken
    ignores a failed write to its default one), as tiktoken/load.py `read_file_cached` finds it."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable], True
    return os.path.join(tempfile.gettempdir(), "data-gym-cache"), False


def cache_path(folder: str, url: str) -> str:
    return os.path.join(folder, hashlib.sha1(url.encode()).hexdigest())


def cached(path: str, sha256: str) -> bool:
    """The file is there with the right content (tiktoken would download a wrong one again)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == sha256
    except FileNotFoundError:
        return False


def fetch_files() -> None:
    """Download the GPT-2 files missing from tiktoken's cache into it, as tiktoken would (same
    names, same content check), but with `DOWNLOAD_TIMEOUT_S`. A cached file is only read: no
    network, no output. With caching off ("") or a default folder that cannot be written,
    tiktoken downloads the files again itself; this download has shown that the server answers."""
    folder, chosen = cache_dir()
    missing = {
        url: sha256
        for url, sha256 in FILES.items()
        if not folder or not cached(cache_path(folder, url), sha256)
    }
    if not missing:
        return
    import requests  # tiktoken's own dependency

    print(
        f"tokenizer {NAME!r}: downloading its files into {folder or '(no cache)'}; with no "
        "internet, set TIKTOKEN_CACHE_DIR to a folder that holds them (README, 'Offline')",
        file=sys.stderr,
        flush=True,
    )
    for url, sha256 in missing.items():
        response = requests.get(url, timeout=DOWNLOAD_TIMEOUT_S)
        response.raise_for_status()
        if hashlib.sha256(response.content).hexdigest() != sha256:
            raise LmpipeError(f"tokenizer {NAME!r}: {url} downloaded with other content; try again")
        if not folder:
            continue
        path = cache_path(folder, url)
        tmp = f"{path}.{uuid.uuid4()}.tmp"  # ranks and sweep workers may download at once
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(response.content)
            os.replace(tmp, path)
        except OSError as e:
            if chosen:
                raise LmpipeError(
                    f"{path}: cannot be written ({e.strerror}); set TIKTOKEN_CACHE_DIR to a "
                    "folder that can be"
                ) from None


@functools.cache
def ranks_sha256(name: str = NAME) -> str:
    """A hash of the tokenizer's merge ranks and special tokens (stable across tiktoken versions)."""
    enc = get_encoding(name)
    digest = hashlib.sha256()
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    for special, rank in sorted(enc._special_tokens.items()):
        digest.update(special.encode() + rank.to_bytes(4, "little"))
    return digest.hexdigest()
