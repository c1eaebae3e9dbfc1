"""Generation: the KV cache equals the full forward, greedy equals the argmax of a recomputed
forward at every step (with dynamic and fixed ALiBi interpolation), seeded sampling, top-k/top-p,
EOS, one-line errors, and the CLI printing what the library returns."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmpipe.cli.app import app
from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.tokenizer import EOT_ID
from lmpipe.train.checkpoint import load_model, save_model
from lmpipe.train.generate import AlibiScaling, GenerateSettings, generate
from lmpipe.train.model import GPT
from lmpipe.train.recipe import load_recipe

TRAIN_SEQ_LEN = 16  # the ALiBi model's last stage: dynamic interpolation starts past 16 keys
ALIBI_SWIGLU = ["model.attn_impl=sdpa", f"stages.1.seq_len={TRAIN_SEQ_LEN}"]
LEARNED_GELU = [
    "model.attn_impl=sdpa",
    "model.position=learned",
    "model.n_positions=64",
    "model.mlp=gelu",
    "model.d_ff=256",
    "model.mup=null",
    "stages.1.seq_len=64",
]
PROMPT = "The quick brown fox"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding runs thousands of tiny ops; on 2 shared cores a second thread mostly waits for
    the first (about 25x slower per step here), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved_model(folder: Path, overrides: list[str], seed: int, boost: float = 1.0) -> Path:
    """A freshly initialised model, its attention and FFN matrices times `boost`. At init the
    residual stream is mostly the token's own embedding and greedy text repeats one token; a
    boost of 10 makes every next token depend on the context (and on the ALiBi scale), which the
    generation tests need. The logit comparisons use the plain init (boosted weights amplify
    fp32 rounding to about 1e-5)."""
    recipe = load_recipe("tiny", overrides)
    torch.manual_seed(seed)
    model = GPT(recipe.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_hidden(name):
                p.mul_(boost)
    save_model(model, recipe, folder / "model")
    return folder


@pytest.fixture(scope="module")
def alibi_init(tmp_path_factory) -> Path:
    return saved_model(tmp_path_factory.mktemp("alibi_init"), ALIBI_SWIGLU, seed=0)


@pytest.fixture(scope="module")
def learned_init(tmp_path_factory) -> Path:
    return saved_model(tmp_path_factory.mktemp("learned_init"), LEARNED_GELU, seed=1)


@pytest.fixture(scope="module")
def alibi_run(tmp_path_factory, gpt2) -> Path:
    return saved_model(tmp_path_factory.mktemp("alibi"), ALIBI_SWIGLU, seed=0, boost=10)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, gpt2) -> Path:
    return saved_model(tmp_path_factory.mktemp("learned"), LEARNED_GELU, seed=1, boost=10)


@pytest.fixture(params=["alibi", "learned"])
def run(request, alibi_run, learned_run) -> Path:
    return alibi_run if request.param == "alibi" else learned_run


@pytest.fixture(params=["alibi", "learned"])
def init(request, alibi_init, learned_init) -> Path:
    return alibi_init if request.param == "alibi" else learned_init


def settings(run: Path, **kw) -> GenerateSettings:
    fields = dict(prompt=PROMPT, max_new_tokens=8, temperature=0.0, device="cpu")
    fields.update(kw)
    return GenerateSettings(model=run, **fields)


def full_logits(model: GPT, ids: list[int], alibi_scale: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), alibi_scale=alibi_scale)
    return logits[0]


def cached_logits(model: GPT, chunks: list[list[int]], scaling: AlibiScaling) -> torch.Tensor:
    """Logits of every position, fed chunk by chunk through a KV cache, the ALiBi scale taken
    from the key length (cached plus new) at each pass."""
    cache = model.new_cache(sum(map(len, chunks)))
    out = []
    with torch.no_grad():
        for chunk in chunks:
            scale = scaling.scale(cache[0].length + len(chunk))
            out.append(model.unembed(model.hidden_states(torch.tensor([chunk]), scale, cache))[0])
    return torch.cat(out)


def test_cached_forward_equals_the_full_forward_at_every_step(init):
    model, _ = load_model(init)
    ids = torch.randint(0, 50257, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    # a prompt of 6, a chunk of 3 (several queries over a longer cache), then one token a step
    chunks = [ids[:6], ids[6:9]] + [[t] for t in ids[9:]]
    cached = cached_logits(model, chunks, AlibiScaling())
    full = full_logits(model, ids)
    assert cached.shape == full.shape == (20, 50257)
    assert torch.allclose(cached, full, atol=1e-5, rtol=0)
    assert cached.std() > 0.01  # logits with something in them to compare


def logits_with_a_scale_per_position(model: GPT, ids: list[int], scales: list[float]):
    """A plain ALiBi forward (no cache) in which query i reads every slope divided by
    scales[i]: what a cached generation computes when each position went through the model in
    a pass of its own scale."""
    T = len(ids)
    x = model.wte(torch.tensor([ids])) * model.alpha_in
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    slopes_HT = model.slopes[:, None] / torch.tensor(scales)[None, :]
    bias_HTT = (-slopes_HT[:, :, None] * (i - j)).masked_fill(j > i, float("-inf"))
    with torch.no_grad():
        for block in model.h:
            a = block.attn
            qkv = a.c_attn(block.ln_1(x)).split(model.cfg.d_model, dim=2)
            q, k, v = (t.view(1, T, a.n_heads, a.d_head).transpose(1, 2) for t in qkv)
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=bias_HTT, scale=a.scale
            )
            x = x + a.c_proj(y.transpose(1, 2).reshape(1, T, -1))
            x = x + block.mlp(block.ln_2(x))
        return model.unembed(model.ln_f(x) * (model.alpha_out / model.m_d))[0]


def test_dynamic_alibi_one_layer_cached_step_equals_full_forward_at_key_len_over_train_len(
    tmp_path,
):
    """With one layer the cached keys and values are the embeddings' projections, which no scale
    touches: each cached step equals a full forward at scale key_len / train_seq_len."""
    model, _ = load_model(saved_model(tmp_path, [*ALIBI_SWIGLU, "model.n_layers=1"], seed=2))
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    dynamic = AlibiScaling(train_seq_len=TRAIN_SEQ_LEN)
    cached = cached_logits(model, [ids[:10]] + [[t] for t in ids[10:]], dynamic)
    assert torch.allclose(cached[:10], full_logits(model, ids[:10]), atol=1e-5)
    for S in range(TRAIN_SEQ_LEN + 1, 41):
        scale = S / TRAIN_SEQ_LEN
        assert dynamic.scale(S) == scale
        assert torch.allclose(cached[S - 1], full_logits(model, ids[:S], scale)[-1], atol=1e-5)
    # the scale changes the answer, so the comparison above can fail
    assert not torch.allclose(cached[-1], full_logits(model, ids)[-1], atol=1e-3)
    assert dynamic.scale(TRAIN_SEQ_LEN) == 1.0  # no interpolation up to the training length


def test_dynamic_alibi_deeper_layers_keep_the_scale_each_token_was_made_with(alibi_init):
    """Past the first layer the cached keys come from hidden states computed in an earlier pass,
    at that pass's scale (as in BTLM's Hugging Face code with a cache): each position keeps the
    scale of its own step. The full forward at today's scale recomputes them all, so differs."""
    model, _ = load_model(alibi_init)
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    dynamic = AlibiScaling(train_seq_len=TRAIN_SEQ_LEN)
    cached = cached_logits(model, [ids[:20]] + [[t] for t in ids[20:]], dynamic)
    scales = [dynamic.scale(20)] * 20 + [dynamic.scale(S) for S in range(21, 41)]
    assert scales[0] == 1.25 and scales[-1] == 2.5
    reference = logits_with_a_scale_per_position(model, ids, scales)
    assert torch.allclose(cached, reference, atol=1e-5)
    # the reference is the model's forward when every position has one scale
    same = logits_with_a_scale_per_position(model, ids, [2.5] * 40)
    assert torch.allclose(same, full_logits(model, ids, 2.5), atol=1e-5)
    assert not torch.allclose(cached[-1], same[-1], atol=1e-4)


def test_fixed_factor_cached_steps_equal_the_full_forward_at_that_factor(alibi_init):
    model, _ = load_model(alibi_init)
    ids = torch.randint(0, 50257, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    cached = cached_logits(model, [ids[:4]] + [[t] for t in ids[4:]], AlibiScaling(factor=2.5))
    assert torch.allclose(cached, full_logits(model, ids, 2.5), atol=1e-5)
    assert not torch.allclose(cached, full_logits(model, ids), atol=1e-3)


def greedy_by_recomputing(model: GPT, prompt: list[int], n: int, scale_at) -> list[int]:
    """Greedy tokens with no cache: the whole sequence through the model at every step, each
    position at the ALiBi scale of the pass that would have cached it (the prompt's all at the
    prompt's key length, then each new token's at its own)."""
    ids = list(prompt)
    scales = [scale_at(len(prompt))] * len(prompt)
    for _ in range(n):
        if len(set(scales)) == 1:  # one scale: the model's own forward
            logits = full_logits(model, ids, scales[0])
        else:
            logits = logits_with_a_scale_per_position(model, ids, scales)
        ids.append(int(logits[-1].argmax()))
        scales.append(scale_at(len(ids)))
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "alibi_scaling, scale_at",
    [
        (None, lambda S: max(1.0, S / TRAIN_SEQ_LEN)),  # the default for ALiBi: dynamic
        ("dynamic", lambda S: max(1.0, S / TRAIN_SEQ_LEN)),
        ("2.5", lambda S: 2.5),
        ("none", lambda S: 1.0),
    ],
)
def test_greedy_generation_equals_argmax_of_a_full_forward_alibi(
    alibi_run, gpt2, alibi_scaling, scale_at
):
    result = generate(settings(alibi_run, max_new_tokens=24, alibi_scaling=alibi_scaling))
    (c,) = result.completions
    prompt = gpt2.encode_ordinary(PROMPT)
    assert c.prompt_tokens == len(prompt) and len(prompt) + 24 > TRAIN_SEQ_LEN
    model, _ = load_model(alibi_run)
    assert c.tokens == greedy_by_recomputing(model, prompt, 24, scale_at)
    assert c.text == gpt2.decode(c.tokens) and not c.stopped_at_eos
    assert result.new_tokens == 24 and result.tokens_per_second > 0


def test_greedy_generation_equals_argmax_of_a_full_forward_learned(learned_run, gpt2):
    result = generate(settings(learned_run, max_new_tokens=30))
    (c,) = result.completions
    model, _ = load_model(learned_run)
    prompt = gpt2.encode_ordinary(PROMPT)
    assert c.tokens == greedy_by_recomputing(model, prompt, 30, lambda S: 1.0)
    assert result.alibi_scaling == "none"


def test_dynamic_scaling_changes_the_greedy_text(alibi_run):
    """Past the training length, dynamic interpolation must change what the model says."""
    s = settings(alibi_run, max_new_tokens=40)
    dynamic = generate(replace(s, alibi_scaling="dynamic")).completions[0].tokens
    none = generate(replace(s, alibi_scaling="none")).completions[0].tokens
    assert dynamic != none


def test_same_seed_same_text_other_seed_other_text(run):
    s = settings(run, temperature=2.0, top_k=0, max_new_tokens=20, seed=7)
    a, b = generate(s).completions[0], generate(s).completions[0]
    c = generate(replace(s, seed=8)).completions[0]
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_top_k_1_and_a_tiny_top_p_are_greedy(run):
    greedy = generate(settings(run, max_new_tokens=12)).completions[0].tokens
    sampled = generate(settings(run, max_new_tokens=12, temperature=2.0, top_k=0)).completions
    assert sampled[0].tokens != greedy  # sampling at this temperature does differ
    for seed in (0, 1):
        top_k = settings(run, max_new_tokens=12, temperature=1.5, top_k=1, seed=seed)
        top_p = settings(run, max_new_tokens=12, temperature=1.5, top_k=0, top_p=1e-6, seed=seed)
        assert generate(top_k).completions[0].tokens == greedy
        assert generate(top_p).completions[0].tokens == greedy


def test_generation_stops_at_end_of_text(alibi_run, gpt2, tmp_path):
    """Swap the embedding rows of a token the model would say at step k and of end-of-text (tied
    embeddings: an exact relabelling); the swapped model then says end-of-text at step k."""
    free = generate(settings(alibi_run, max_new_tokens=8)).completions[0]
    prompt = gpt2.encode_ordinary(PROMPT)
    k = next(i for i, t in enumerate(free.tokens) if t not in prompt + free.tokens[:i] + [EOT_ID])
    assert EOT_ID not in prompt + free.tokens
    model, recipe = load_model(alibi_run)
    state = model.state_dict()
    t = free.tokens[k]
    state["wte.weight"][[t, EOT_ID]] = state["wte.weight"][[EOT_ID, t]]
    save_model(model, recipe, tmp_path / "swapped", state)

    ended = generate(settings(tmp_path / "swapped", max_new_tokens=8)).completions[0]
    assert ended.tokens == free.tokens[:k] + [EOT_ID]
    assert ended.stopped_at_eos and ended.text == gpt2.decode(free.tokens[:k])


def test_a_prompts_file_runs_each_prompt_alone(alibi_run, tmp_path):
    (tmp_path / "prompts.txt").write_text("Hello world\n" + PROMPT + "\n", encoding="utf-8")
    both = generate(settings(alibi_run, prompt=None, prompts_file=tmp_path / "prompts.txt"))
    alone = [
        generate(settings(alibi_run, prompt=p)).completions[0] for p in ("Hello world", PROMPT)
    ]
    assert [c.prompt for c in both.completions] == ["Hello world", PROMPT]
    assert [c.tokens for c in both.completions] == [c.tokens for c in alone]
    assert both.new_tokens == 16


def test_a_sampled_prompt_gets_the_same_text_alone_or_after_others(run, tmp_path):
    """Each prompt draws from its own generator seeded with --seed: a prompt's sampled text does
    not depend on the prompts before it, so --prompt X gives line X's text."""
    sampled = dict(temperature=2.0, top_k=0, max_new_tokens=12, seed=3)
    (tmp_path / "prompts.txt").write_text(f"Hello world\n{PROMPT}\n", encoding="utf-8")
    both = generate(settings(run, prompt=None, prompts_file=tmp_path / "prompts.txt", **sampled))
    alone = [
        generate(settings(run, prompt=p, **sampled)).completions[0].tokens
        for p in ("Hello world", PROMPT)
    ]
    assert [c.tokens for c in both.completions] == alone
    # the seed does decide the text: another seed, other tokens
    assert generate(settings(run, **{**sampled, "seed": 4})).completions[0].tokens != alone[1]


def test_every_seed_torch_takes_generates(alibi_run):
    """-2**63 and 2**64 - 1 are the ends of the seeds torch takes (the next ones beyond are one
    line each, in test_bad_inputs_are_one_line_errors)."""
    for seed in (-(2**63), 2**64 - 1):
        s = settings(alibi_run, max_new_tokens=3, temperature=1.0, seed=seed)
        assert len(generate(s).completions[0].tokens) == 3


runner = CliRunner()


def one_line_error(args: list[str], *fragments: str) -> None:
    result = runner.invoke(app, ["generate", *args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_bad_inputs_are_one_line_errors(alibi_run, learned_run, tmp_path):
    a, learned = str(alibi_run), str(learned_run)
    one_line_error([a, "--prompt", ""], "--prompt is empty")
    one_line_error([a], "no prompt")
    (tmp_path / "p.txt").write_text("first\n\nthird\n", encoding="utf-8")
    one_line_error([a, "--prompts", str(tmp_path / "p.txt")], "p.txt:2: empty prompt")
    one_line_error([a, "--prompts", str(tmp_path / "nope.txt")], "nope.txt", "cannot read")
    one_line_error([a, "--prompt", "x", "--temperature", "-0.5"], "--temperature", "-0.5")
    one_line_error([a, "--prompt", "x", "--top-p", "0"], "--top-p", "(0, 1]")
    one_line_error([a, "--prompt", "x", "--top-p", "1.5"], "--top-p", "1.5")
    one_line_error([a, "--prompt", "x", "--top-k", "-1"], "--top-k", "-1")
    one_line_error([a, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens")
    one_line_error([a, "--prompt", "x", "--seed", str(2**64)], "--seed", str(2**64))
    one_line_error([a, "--prompt", "x", "--seed", str(-(2**63) - 1)], "--seed", str(-(2**63) - 1))
    # argv's bytes that are not UTF-8 come as lone surrogates ("caf\xff" -> "caf\udcff"),
    # refused as the same bytes in a prompts file are, not turned into U+FFFD
    one_line_error([a, "--prompt", "caf\udcff"], "--prompt: not UTF-8 text (byte 3)")
    one_line_error([a, "--prompt", "caf\u00e9\udcffx"], "--prompt: not UTF-8 text (byte 5)")
    (tmp_path / "bad.txt").write_bytes(b"caf\xff\n")
    one_line_error([a, "--prompts", str(tmp_path / "bad.txt")], "bad.txt: not UTF-8 text (byte 3)")
    one_line_error([a, "--prompt", "x", "--alibi-scale", "0.5"], "--alibi-scale '0.5'")
    # --alibi-scaling, generate's first name for eval's --alibi-scale, still reads the same
    one_line_error([a, "--prompt", "x", "--alibi-scaling", "fast"], "--alibi-scale 'fast'")
    one_line_error([learned, "--prompt", "x", "--alibi-scale", "dynamic"], "learned positions")
    long = " ".join(["word"] * 40)  # 40 tokens + 30 new > 64 learned positions
    one_line_error(
        [learned, "--prompt", long, "--max-new-tokens", "30"],
        "prompt 1: 40 tokens",
        "64 learned positions",
    )
    one_line_error([str(tmp_path), "--prompt", "x"], str(tmp_path), "no trained model")
    with pytest.raises(LmpipeError, match="not both"):
        generate(settings(alibi_run, prompts_file=tmp_path / "p.txt"))


def test_the_cli_prints_the_completion_and_tokens_per_second(run):
    library = generate(settings(run, max_new_tokens=10)).completions[0]
    result = runner.invoke(
        app,
        ["generate", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "10"]
        + ["--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert PROMPT + library.text in result.output
    rate = re.search(r"^10 new tokens in [\d.]+ s: ([\d.]+) tokens/s on cpu", result.output, re.M)
    assert rate and float(rate.group(1)) > 0, result.output


def test_a_hugging_face_folder_generates_what_its_run_folder_generates(run, tmp_path):
    from lmpipe.train.hf import export_model

    export_model(run, tmp_path / "hf")
    s = settings(run, max_new_tokens=24)
    from_run = generate(s)
    from_hf = generate(replace(s, model=tmp_path / "hf"))
    assert from_hf.completions == from_run.completions
    assert from_hf.alibi_scaling == from_run.alibi_scaling


def test_transformers_generate_on_the_export_gives_the_same_greedy_tokens(run, gpt2, tmp_path):
    """An independent KV-cache implementation (lmpipe's Hugging Face modeling code, run by
    transformers' generate) agrees token for token, with BTLM's dynamic alibi_scaling for ALiBi."""
    import json

    transformers = pytest.importorskip("transformers")
    from lmpipe.train.hf import export_model

    export_model(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    if config["position_embedding_type"] == "alibi":
        config["alibi_scaling"] = {"type": "linear", "train_seq_len": TRAIN_SEQ_LEN}
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", trust_remote_code=True, local_files_only=True
    ).eval()
    prompt = gpt2.encode_ordinary(PROMPT)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=EOT_ID
        )
    s = settings(tmp_path / "hf", max_new_tokens=40)
    ours = generate(s).completions[0]
    assert out[0, len(prompt) :].tolist() == ours.tokens
    if config["position_embedding_type"] == "alibi":  # where the dynamic scale shows
        assert generate(replace(s, alibi_scaling="none")).completions[0].tokens != ours.tokens


def test_a_byte_order_mark_is_no_part_of_the_first_prompt(tmp_path):
    from lmpipe.train.generate import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\r\nWorld\r\n")  # as Windows editors save UTF-8
    assert read_prompts(GenerateSettings(model=tmp_path, prompts_file=path)) == ["Hello", "World"]


def test_a_growing_cache_gives_the_tokens_of_one_allocated_whole(alibi_run, gpt2, monkeypatch):
    """The KV cache starts at the prompt plus FIRST_CACHE_TOKENS and doubles: with one token
    past the prompt at first it grows three times over 24 tokens, and the greedy text is the one
    a cache allocated whole gives, the recomputed argmax."""
    from lmpipe.train import generate as generate_module

    sizes = []
    new_cache = GPT.new_cache

    def spy(self, max_len):
        sizes.append(max_len)
        return new_cache(self, max_len)

    monkeypatch.setattr(GPT, "new_cache", spy)
    whole = generate(settings(alibi_run, max_new_tokens=24)).completions[0].tokens
    prompt = gpt2.encode_ordinary(PROMPT)
    assert sizes == [len(prompt) + 24]
    monkeypatch.setattr(generate_module, "FIRST_CACHE_TOKENS", 1)
    sizes.clear()
    grown = generate(settings(alibi_run, max_new_tokens=24)).completions[0].tokens
    want = [len(prompt) + 1]
    while want[-1] < len(prompt) + 24:
        want.append(min(2 * want[-1], len(prompt) + 24))
    assert sizes == want and len(want) == 4
    assert grown == whole
    model, _ = load_model(alibi_run)
    assert grown == greedy_by_recomputing(model, prompt, 24, lambda S: max(1.0, S / TRAIN_SEQ_LEN))


def test_a_huge_max_new_tokens_reserves_nothing_up_front(alibi_run, monkeypatch):
    """--max-new-tokens 10**12 with a text that ends after five tokens: the cache holds what the
    text needs, not 10**12 positions (which no machine could allocate)."""
    from lmpipe.train import generate as generate_module

    calls = []
    next_token = generate_module.next_token

    def ends_at_five(logits_V, s, generator):
        calls.append(1)
        return EOT_ID if len(calls) == 5 else next_token(logits_V, s, generator)

    monkeypatch.setattr(generate_module, "next_token", ends_at_five)
    (c,) = generate(settings(alibi_run, max_new_tokens=10**12)).completions
    assert len(c.tokens) == 5 and c.stopped_at_eos


def test_a_temperature_too_small_for_float32_is_greedy(run):
    """logits / 1e-40 overflow float32 to infinity (softmax: NaN); such a temperature is the
    limit of the tempered distribution, the argmax."""
    greedy = generate(settings(run, max_new_tokens=12)).completions[0].tokens
    for temperature in (1e-40, 1e-300, 5e-324):
        for top_k, top_p in ((200, 1.0), (0, 0.5)):
            s = settings(run, max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p)
            assert generate(s).completions[0].tokens == greedy


def test_a_prompts_file_splits_at_newlines_only(tmp_path):
    """A form feed, a lone carriage return and Unicode line breaks (U+2028, U+0085, ...) stay
    inside their prompt, so prompt N is line N of the file, as its errors say."""
    from lmpipe.train.generate import read_prompts

    path = tmp_path / "p.txt"
    lines = ["first with\x0cform feed", "second \u2028 with LS\u2029\x85\x1c\x1d\x1e", "a\rb"]
    path.write_text("\n".join(lines) + "\r\n", encoding="utf-8", newline="")
    assert read_prompts(GenerateSettings(model=tmp_path, prompts_file=path)) == lines
    path.write_bytes(b"a\n\x0c\n")
    assert read_prompts(GenerateSettings(model=tmp_path, prompts_file=path)) == ["a", "\x0c"]
    path.write_bytes(b"a\n\x0c\n\nd")
    with pytest.raises(LmpipeError, match=r"p\.txt:3: empty prompt"):
        read_prompts(GenerateSettings(model=tmp_path, prompts_file=path))
    path.write_bytes(b"")
    with pytest.raises(LmpipeError, match="no prompts"):
        read_prompts(GenerateSettings(model=tmp_path, prompts_file=path))
