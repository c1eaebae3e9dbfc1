"""`lmpipe generate`: text from a trained model, one token at a time over a KV cache.

    generate(GenerateSettings(model=Path("runs/tiny"), prompt="Once upon a time")) -> GenerateResult

MODEL is a run folder, a model folder (model.pt + recipe.yaml) or a Hugging Face folder in BTLM's
layout (one with config.json). Prompts, one given or one per line of a file, are encoded with the
GPT-2 BPE as `lmpipe tokenize` encodes documents (special-token text stays text) and run one at
a time: no padding, so every completion is what the model gives that prompt alone. The prompt
goes through the model once, filling the KV cache; each new token then costs one position. The
cache grows as the text does (doubling), so a large `max_new_tokens` reserves no memory for
tokens a completion never reaches. A prompts file holds one prompt per "\n"-ended line (a
trailing "\r" dropped): form feeds and other Unicode line breaks stay inside their prompt.

Sampling: temperature 0 is greedy (argmax); otherwise the next token is drawn from
softmax(logits / temperature), kept to the `top_k` most likely tokens (0: all) and then to the
smallest set of them whose probability reaches `top_p` (1: all), by a torch.Generator seeded
with `seed` afresh for each prompt: a prompt's text is the same alone or on any line of a file,
and the same settings give the same text. A temperature so small that logits /
temperature overflow float32 (1e-40, say) picks the argmax: the limit the tempered distribution
tends to. A completion ends after `max_new_tokens` or at the end-of-text token (50256, left out
of the text).

ALiBi position interpolation (seeds-spec 2) divides every slope by a scale s: `none` (s = 1), a
fixed FACTOR, or `dynamic` (the default for ALiBi models): s = max(1, S / L), S the key length
including the cached tokens (so s grows as the text does), L the training length (the recipe's
last stage seq_len). A model whose last stage trained with a fixed scale s0 reads s0 * max(1,
S / L) in dynamic mode, as `lmpipe eval` does. With the cache, each token's hidden states keep
the scale of the pass that computed them (the prompt's at the prompt's length, each new token's
at its own), as BTLM's Hugging Face code generates; recomputing everything at the newest scale
would cost a full forward pass per token. Learned-position models take no interpolation and
hold at most n_positions tokens, prompt and completion together.

Nothing is written: the result is returned (the CLI prints it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.tokenizer import EOT_ID, get_encoding
from lmpipe.train.checkpoint import model_source
from lmpipe.train.model import GPT, KVCache
from lmpipe.train.recipe import Recipe


@dataclass(frozen=True)
class GenerateSettings:
    """What to generate from, and how. Exactly one of `prompt` and `prompts_file` (one prompt a
    line). `alibi_scaling`: "none", "dynamic" or a factor >= 1 as text; None: dynamic for ALiBi
    models, none for learned positions. `device`: None picks cuda when there is one."""

    model: Path
    prompt: str | None = None
    prompts_file: Path | None = None
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 200
    top_p: float = 1.0
    seed: int = 0
    alibi_scaling: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class AlibiScaling:
    """The ALiBi scale at a key length: `factor`, times max(1, key_len / train_seq_len) when
    dynamic (`train_seq_len` set)."""

    factor: float = 1.0
    train_seq_len: int | None = None

    def scale(self, key_len: int) -> float:
        if self.train_seq_len is None:
            return self.factor
        return self.factor * max(1.0, key_len / self.train_seq_len)

    def describe(self) -> str:
        if self.train_seq_len is None:
            return "none" if self.factor == 1 else f"fixed factor {self.factor:g}"
        base = "" if self.factor == 1 else f"{self.factor:g} x "
        return f"dynamic ({base}max(1, keys / {self.train_seq_len}))"


@dataclass(frozen=True)
class Completion:
    prompt: str
    text: str  # the generated text alone, without the end-of-text token
    prompt_tokens: int
    tokens: list[int]  # the generated ids, ending with 50256 when the model ended the text
    stopped_at_eos: bool


@dataclass(frozen=True)
class GenerateResult:
    completions: list[Completion]
    new_tokens: int  # generated over all prompts
    seconds: float  # wall time of the forward passes and sampling, all prompts
    alibi_scaling: str  # as applied, e.g. "dynamic (max(1, keys / 8192))"
    device: str

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate(settings: GenerateSettings) -> GenerateResult:
    """Complete every prompt; every bad setting is one LmpipeError before any token is made."""
    check_sampling(settings)
    prompts = read_prompts(settings)
    device = pick_device(settings.device)
    enc = get_encoding()
    prompt_ids = [enc.encode_ordinary(p) for p in prompts]
    model, recipe = model_source(settings.model).load(device)
    model.eval()
    scaling = resolve_alibi_scaling(settings.alibi_scaling, recipe)
    check_lengths(prompt_ids, settings.max_new_tokens, recipe)

    completions = []
    start = time.perf_counter()
    for prompt, ids in zip(prompts, prompt_ids, strict=True):
        # One generator per prompt, from the seed alone: sharing one would make a prompt's
        # text depend on the draws of the prompts before it in the file.
        generator = torch.Generator(device=device).manual_seed(settings.seed)
        new = generate_tokens(model, ids, settings, scaling, generator)
        ended = new[-1] == EOT_ID
        text = enc.decode(new[:-1] if ended else new)
        completions.append(Completion(prompt, text, len(ids), new, ended))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    total = sum(len(c.tokens) for c in completions)
    return GenerateResult(completions, total, seconds, scaling.describe(), str(device))


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt_ids: list[int],
    settings: GenerateSettings,
    scaling: AlibiScaling,
    generator: torch.Generator,
) -> list[int]:
    """New token ids after the prompt: the prompt fills the cache in one pass, then one token a
    step, each pass at the ALiBi scale of its key length (cached tokens included)."""
    device = model.wte.weight.device
    most = len(prompt_ids) + settings.max_new_tokens
    cache = model.new_cache(min(most, len(prompt_ids) + FIRST_CACHE_TOKENS))
    idx_1T = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    while True:
        key_len = cache[0].length + idx_1T.shape[1]
        if key_len > cache[0].max_len:
            cache = grown_cache(model, cache, min(most, 2 * cache[0].max_len))
        x_1TD = model.hidden_states(idx_1T, scaling.scale(key_len), cache)
        logits_V = model.unembed(x_1TD[0, -1])
        token = next_token(logits_V, settings, generator)
        new.append(token)
        if token == EOT_ID or len(new) == settings.max_new_tokens:
            return new
        idx_1T = torch.tensor([[token]], dtype=torch.long, device=device)


# Positions the KV cache holds past the prompt before it first grows: a short completion never
# copies it, a long one copies each position about once more in all (doubling).
FIRST_CACHE_TOKENS = 256


def grown_cache(model: GPT, cache: list[KVCache], max_len: int) -> list[KVCache]:
    """A cache of `max_len` positions holding what `cache` holds: the same keys and values, so
    the tokens that follow are the ones a cache allocated whole at the start gives."""
    bigger = model.new_cache(max_len)
    for old, new in zip(cache, bigger, strict=True):
        if old.k_BHSd is not None and old.v_BHSd is not None:
            new.append(old.k_BHSd[:, :, : old.length], old.v_BHSd[:, :, : old.length])
    return bigger


def next_token(
    logits_V: torch.Tensor, settings: GenerateSettings, generator: torch.Generator
) -> int:
    """Greedy at temperature 0; else a draw from the tempered, top-k and top-p cut distribution."""
    if settings.temperature == 0:
        return int(logits_V.argmax())
    tempered_V = logits_V.float() / settings.temperature
    if not torch.isfinite(tempered_V).all():
        # A temperature that tiny overflows float32, and softmax of infinities is NaN; the
        # tempered distribution is all on the argmax by then.
        return int(logits_V.argmax())
    logits_V = tempered_V
    if 0 < settings.top_k < logits_V.numel():
        kth = torch.topk(logits_V, settings.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if settings.top_p < 1:
        sorted_V, order_V = probs_V.sort(descending=True)
        # A token stays if the tokens ranked above it hold less than top_p: the smallest set
        # that reaches top_p, never empty (the first token has nothing above it).
        sorted_V = sorted_V.masked_fill(sorted_V.cumsum(0) - sorted_V >= settings.top_p, 0.0)
        probs_V = torch.zeros_like(probs_V).scatter(0, order_V, sorted_V)
    return int(torch.multinomial(probs_V, 1, generator=generator))


# --- settings, checked before any work -------------------------------------------------------


def check_sampling(settings: GenerateSettings) -> None:
    if settings.max_new_tokens < 1:
        raise LmpipeError(f"--max-new-tokens must be at least 1, got {settings.max_new_tokens}")
    if not settings.temperature >= 0:  # written so that NaN fails too
        raise LmpipeError(f"--temperature must be >= 0 (0: greedy), got {settings.temperature:g}")
    if settings.top_k < 0:
        raise LmpipeError(f"--top-k must be >= 0 (0: no top-k cut), got {settings.top_k}")
    if not 0 < settings.top_p <= 1:
        raise LmpipeError(f"--top-p must be in (0, 1] (1: no nucleus cut), got {settings.top_p:g}")
    if not SEED_MIN <= settings.seed <= SEED_MAX:
        raise LmpipeError(
            f"--seed must be from -2**63 to 2**64 - 1 (a torch generator's seed), got {settings.seed}"
        )


# The seeds torch.Generator.manual_seed takes (int64 or uint64); others overflow in torch.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def read_prompts(settings: GenerateSettings) -> list[str]:
    """The prompt, or each line of the prompts file; an empty one is an error naming it."""
    path = settings.prompts_file
    if path is None:
        if settings.prompt is None:
            raise LmpipeError("no prompt: give --prompt TEXT or --prompts FILE")
        if not settings.prompt:
            raise LmpipeError("--prompt is empty: the model needs at least one token to continue")
        try:
            settings.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            # argv's bytes that are not UTF-8 arrive as lone surrogates, which the encoder would
            # turn into U+FFFD unseen; refused as the same bytes in a prompts file are.
            byte = len(settings.prompt[: e.start].encode("utf-8"))
            raise LmpipeError(f"--prompt: not UTF-8 text (byte {byte})") from None
        return [settings.prompt]
    if settings.prompt is not None:
        raise LmpipeError("give one of --prompt TEXT and --prompts FILE, not both")
    try:
        # utf-8-sig: a byte-order mark (Windows editors) is no part of the first prompt
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise LmpipeError(f"{path}: cannot read the prompts ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise LmpipeError(f"{path}: not UTF-8 text (byte {e.start})") from None
    # Lines end at "\n" alone (and "\r\n"): str.splitlines would also split at form feeds (in
    # many Python sources) and Unicode line breaks, making extra prompts and line numbers that
    # are not the file's.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":  # after the last line's newline
        lines.pop()
    if not lines:
        raise LmpipeError(f"{path}: no prompts (one per line)")
    for number, line in enumerate(lines, 1):
        if not line:
            raise LmpipeError(f"{path}:{number}: empty prompt (one non-empty prompt per line)")
    return lines


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmpipeError(f"--device {name!r}: expected cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmpipeError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise LmpipeError(f"--device {name!r}: expected cpu or cuda (cuda:N)")
    return device


def resolve_alibi_scaling(text: str | None, recipe: Recipe) -> AlibiScaling:
    """`--alibi-scale` against the model: dynamic by default for ALiBi, refused for learned."""
    alibi = recipe.model.position == "alibi"
    if text is None:
        text = "dynamic" if alibi else "none"
    if text == "none":
        return AlibiScaling()
    if not alibi:
        raise LmpipeError(
            f"--alibi-scale {text}: the model has learned positions, not ALiBi; use none"
        )
    if text == "dynamic":
        last = recipe.stages[-1]
        return AlibiScaling(factor=last.alibi_scale, train_seq_len=last.seq_len)
    try:
        factor = float(text)
    except ValueError:
        factor = float("nan")
    if not (factor >= 1 and math.isfinite(factor)):
        raise LmpipeError(f"--alibi-scale {text!r}: expected none, dynamic or a factor >= 1")
    return AlibiScaling(factor=factor)


def check_lengths(prompt_ids: list[list[int]], max_new_tokens: int, recipe: Recipe) -> None:
    """Learned positions end at n_positions: prompt and completion must fit in them."""
    model = recipe.model
    if model.position != "learned":
        return
    for number, ids in enumerate(prompt_ids, 1):
        if len(ids) + max_new_tokens > model.n_positions:
            raise LmpipeError(
                f"prompt {number}: {len(ids)} tokens + --max-new-tokens {max_new_tokens} exceed "
                f"the model's {model.n_positions} learned positions (model.n_positions)"
            )
