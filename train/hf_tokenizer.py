"""GPT-2's tokenizer files for Hugging Face folders: written into exports (vocab.json and
merges.txt are GPT-2's encoder.json and vocab.bpe, got through tiktoken's cache) and checked in
imports (vocab.json, merges.txt, tokenizer.json must be GPT-2's own when present).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.tokenizer import EOT_ID, GPT2_FILES, fetch_files

EOT = "<|endoftext|>"


def gpt2_tokenizer_files() -> tuple[bytes, bytes]:
    """GPT-2's encoder.json and vocab.bpe (HF's vocab.json and merges.txt), through tiktoken's
    cache: downloaded once with internet, read from TIKTOKEN_CACHE_DIR without."""
    from tiktoken.load import read_file_cached

    try:
        fetch_files()  # a download announced on stderr, with a time limit (tiktoken's has none)
        return (
            read_file_cached(GPT2_FILES + "encoder.json"),
            read_file_cached(GPT2_FILES + "vocab.bpe"),
        )
    except LmpipeError:
        raise
    except Exception as e:  # network errors come in many types; all mean "files unavailable"
        raise LmpipeError(
            f"GPT-2 tokenizer files (encoder.json, vocab.bpe) could not be loaded "
            f"({type(e).__name__}); with no internet, set TIKTOKEN_CACHE_DIR to a folder that "
            "holds them (README, 'Offline')"
        ) from None


def write_tokenizer(folder: Path, max_length: int) -> None:
    encoder, merges = gpt2_tokenizer_files()
    (folder / "vocab.json").write_bytes(encoder)
    (folder / "merges.txt").write_bytes(merges)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_prefix_space": False,
        "add_bos_token": False,
        "model_max_length": max_length,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_tokenizer(folder: Path) -> None:
    """vocab.json / merges.txt / tokenizer.json, when present, must be GPT-2's own."""
    present = [n for n in ("vocab.json", "merges.txt", "tokenizer.json") if (folder / n).is_file()]
    if not present:
        return
    encoder_bytes, bpe_bytes = gpt2_tokenizer_files()
    encoder = json.loads(encoder_bytes)
    merges = [m for m in bpe_bytes.decode("utf-8").splitlines()[1:] if m]  # past "#version"

    def read(name: str) -> Any:
        try:
            text = (folder / name).read_text(encoding="utf-8")
            return json.loads(text) if name.endswith(".json") else text
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmpipeError(f"{folder / name}: unreadable ({e})") from None

    def same_vocab(vocab: Any, name: str) -> None:
        if vocab != encoder:
            differ = next(
                (t for t in encoder if not isinstance(vocab, dict) or vocab.get(t) != encoder[t]),
                None,
            )
            where = f"token {differ!r}" if differ is not None else "extra tokens"
            raise LmpipeError(f"{folder / name}: not GPT-2's vocabulary ({where} differs)")

    def same_merges(found: list[str], name: str) -> None:
        if found != merges:
            i = next(
                (i for i, (a, b) in enumerate(zip(found, merges, strict=False)) if a != b), None
            )
            where = f"merge {i}" if i is not None else f"{len(found)} merges, not {len(merges)}"
            raise LmpipeError(f"{folder / name}: not GPT-2's merges ({where} differs)")

    if "vocab.json" in present:
        same_vocab(read("vocab.json"), "vocab.json")
    if "merges.txt" in present:
        lines = read("merges.txt").splitlines()
        same_merges([m for m in lines if m and not m.startswith("#version")], "merges.txt")
    if "tokenizer.json" in present:
        data = read("tokenizer.json")
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise LmpipeError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer (GPT-2's is)")
        same_vocab(model.get("vocab"), "tokenizer.json")
        found = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        same_merges(found, "tokenizer.json")
        for token in data.get("added_tokens") or []:
            found_token = (token.get("content"), token.get("id")) if isinstance(token, dict) else token  # fmt: skip
            if found_token != (EOT, EOT_ID):
                raise LmpipeError(
                    f"{folder / 'tokenizer.json'}: added token {found_token!r} is not GPT-2's "
                    f"only one, {EOT} = {EOT_ID}"
                )
