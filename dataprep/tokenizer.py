"""The tokenizer of BTLM and Cerebras-GPT: tiktoken's GPT-2 BPE (50,257 ids, end-of-text 50256).

tiktoken downloads its GPT-2 files at first use and caches them (`TIKTOKEN_CACHE_DIR`); offline,
point that variable at a folder seeded with the files. `ranks_sha256` fingerprints the vocabulary
so a shard folder made with another tokenizer is refused.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING

from lmpipe.dataprep.errors import LmpipeError

if TYPE_CHECKING:  # for annotations only: `get_encoding` imports tiktoken at first use
    import tiktoken

NAME = "gpt2"
VOCAB_SIZE = 50257
EOT_ID = 50256


@functools.cache
def get_encoding(name: str = NAME) -> tiktoken.Encoding:
    import tiktoken

    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # network errors come in many types; all mean "files unavailable"
        raise LmpipeError(
            f"tokenizer {name!r}: its files could not be loaded ({type(e).__name__}); with no "
            "internet, set TIKTOKEN_CACHE_DIR to a folder that holds them (README, 'Offline')"
        ) from None
    if name == NAME and (enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_ID):
        raise LmpipeError(f"tokenizer {name!r}: unexpected vocabulary ({enc.n_vocab} ids)")
    return enc


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
