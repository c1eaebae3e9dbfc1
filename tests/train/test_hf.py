"""Hugging Face interop: `lmpipe export` folders load in transformers (trust_remote_code) and
compute lmpipe's logits, with padding, with a KV cache and through `generate`; `lmpipe import`
round-trips the weights bit for bit; what lmpipe cannot run is refused in one line; `train
--init-from` starts from imported weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.train.checkpoint import load_model, save_model
from lmpipe.train.hf import export_model, import_model, load_hf_model
from lmpipe.train.model import GPT, alibi_slopes
from lmpipe.train.recipe import Recipe, load_recipe

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4  # fp32: lmpipe and the exported model differ only in the order of float operations
ALIBI = ["model.mup.d_model_base=32", "model.mup.d_ff_base=85"]  # m_d = 2: width scale 0.5
LEARNED = ["model.position=learned", "model.n_positions=256", "model.mlp=gelu", "model.d_ff=256"]
VARIANTS = {
    "alibi_swiglu_mup": ALIBI,
    "alibi_sparse": [*ALIBI, "model.density=0.5"],
    "learned_gelu_sp": [*LEARNED, "model.mup=null", "model.init_std=0.02"],
    # Cerebras-GPT-muP's shape: its intermediate checkpoints are BTLM-layout, learned + GELU
    "learned_gelu_mup": [
        *LEARNED,
        "model.mup.d_model_base=32",
        "model.mup.d_ff_base=128",
        "model.mup.sigma_base=0.08",
        "model.mup.alpha_in=10.0",
        "model.mup.alpha_out=1.0",
    ],
    "alibi_scale_2": [*ALIBI, "stages.1.alibi_scale=2.0"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread beats two that wait on each other (and on the rest of
    a busy machine) several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model_folder(folder: Path, overrides: list[str], seed: int = 0) -> tuple[GPT, Recipe]:
    """A tiny model of the `tiny` recipe whose every weight (biases and norms too) is moved off
    its initial value, so that a wrong wiring anywhere shows in the logits; sparse weights keep
    their zeros."""
    recipe = load_recipe("tiny", ["model.attn_impl=sdpa", *overrides])
    torch.manual_seed(seed)
    model = GPT(recipe.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            sparse = recipe.model.density < 1 and model.is_hidden(name)
            p.add_(0.05 * torch.randn_like(p) * ((p != 0) if sparse else 1))
    save_model(model, recipe, folder)
    return model.eval(), recipe


def load_hf(folder: Path, dtype: torch.dtype | None = None):
    # transformers 5 calls it `dtype`, earlier releases `torch_dtype`
    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, local_files_only=True, **({name: dtype} if dtype else {})
    ).eval()


def lmpipe_logits(model: GPT, ids: list[int] | torch.Tensor, scale: float) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(ids)[None], alibi_scale=scale)
    return logits[0]


def padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of unequal rows padded to the longest (pad id 50256) and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 50256)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[b, where], mask[b, where] = row, 1
    return ids, mask


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model, recipe = make_model_folder(root / "model", VARIANTS[request.param])
    export_model(root / "model", root / "hf")
    return model, recipe, root, load_hf(root / "hf")


def test_export_computes_lmpipes_logits_with_padding_and_a_kv_cache(exported):
    model, recipe, _, hf = exported
    scale = recipe.stages[-1].alibi_scale
    torch.manual_seed(1)
    rows = [torch.randint(0, 50257, (n,)) for n in (12, 7, 3)]
    for side in ("right", "left"):
        ids, mask = padded(rows, side)
        with torch.no_grad():
            logits = hf(ids, attention_mask=mask).logits
        for b, row in enumerate(rows):
            real = mask[b].bool()
            assert (logits[b, real] - lmpipe_logits(model, row, scale)).abs().max() < TOL, side

    # Incremental decoding of a left-padded batch: a prefill, then one token at a time, each
    # step's logits equal to lmpipe's full forward over that row's real tokens.
    extra = torch.randint(0, 50257, (3, 4))
    ids, mask = padded(rows, "left")
    cache = transformers.DynamicCache()
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(extra.shape[1]):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            out = hf(extra[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)  # fmt: skip
            steps.append(out.logits[:, -1])
    assert cache.get_seq_length() == ids.shape[1] + extra.shape[1]
    for b, row in enumerate(rows):
        full = lmpipe_logits(model, torch.cat([row, extra[b]]), scale)
        for t, step in enumerate(steps):
            assert (step[b] - full[len(row) - 1 + t]).abs().max() < TOL, (b, t)


def test_generate_greedy_and_sampling_follow_lmpipes_argmax(exported):
    model, recipe, _, hf = exported
    scale = recipe.stages[-1].alibi_scale
    torch.manual_seed(2)
    rows = [torch.randint(0, 50257, (n,)) for n in (6, 3)]
    ids, mask = padded(rows, "left")
    want = []
    for row in rows:  # lmpipe's own greedy decoding, one full forward per token
        seq = row.tolist()
        for _ in range(5):
            seq.append(int(lmpipe_logits(model, seq, scale)[-1].argmax()))
        want.append(seq[len(row) :])
    common = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=50256, eos_token_id=None)
    greedy = hf.generate(ids, do_sample=False, **common)[:, ids.shape[1] :]
    sampled = hf.generate(ids, do_sample=True, top_k=1, **common)[:, ids.shape[1] :]
    assert greedy.tolist() == want
    assert sampled.tolist() == want


def test_export_then_import_gives_bit_identical_weights(exported, tmp_path):
    model, recipe, root, _ = exported
    import_model(root / "hf", tmp_path / "imported")
    back, back_recipe = load_model(tmp_path / "imported")
    original = model.state_dict()
    assert back.state_dict().keys() == original.keys()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    # the same model, dense (its zeros are in the weights), ALiBi's unused n_positions aside
    skip = {"density", "attn_impl"} | ({"n_positions"} if recipe.model.position == "alibi" else set())  # fmt: skip
    got, want = back_recipe.model.model_dump(exclude=skip), recipe.model.model_dump(exclude=skip)
    assert (got.pop("mup") or {}) == pytest.approx(want.pop("mup") or {})
    assert got == want
    assert back_recipe.stages[-1].alibi_scale == recipe.stages[-1].alibi_scale
    if recipe.model.density < 1:  # exported dense, zeros included
        c_fc = back.state_dict()["h.0.mlp.c_fc.weight"]
        assert (c_fc == 0).sum().item() == c_fc.numel() - round(0.5 * c_fc.numel())
    assert json.loads((tmp_path / "imported" / "manifest.json").read_text())["stage"] == "import"


@pytest.fixture(scope="module")
def alibi(tmp_path_factory):
    root = tmp_path_factory.mktemp("alibi")
    model, recipe = make_model_folder(root / "model", VARIANTS["alibi_swiglu_mup"])
    export_model(root / "model", root / "hf")
    return model, recipe, root


def test_safetensors_hold_btlms_names_and_shapes_and_the_config_btlms_fields(alibi):
    model, _, root = alibi
    tensors = safetensors_torch.load_file(root / "hf" / "model.safetensors")
    d, f = 64, 170
    want = {"transformer.wte.weight": [50257, d], "transformer.relative_pe.slopes": [4, 1]}
    want |= {"transformer.ln_f.weight": [d], "transformer.ln_f.bias": [d]}
    for i in range(2):
        layer = {
            "ln_1.weight": [d], "ln_1.bias": [d], "ln_2.weight": [d], "ln_2.bias": [d],
            "attn.c_attn.weight": [d, 3 * d], "attn.c_attn.bias": [3 * d],
            "attn.c_proj.weight": [d, d], "attn.c_proj.bias": [d],
            "mlp.c_fc.weight": [d, f], "mlp.c_fc.bias": [f],
            "mlp.c_fc2.weight": [d, f], "mlp.c_fc2.bias": [f],
            "mlp.c_proj.weight": [f, d], "mlp.c_proj.bias": [d],
        }  # fmt: skip
        want |= {f"transformer.h.{i}.{k}": v for k, v in layer.items()}
    assert {k: list(t.shape) for k, t in tensors.items()} == want
    assert torch.equal(tensors["transformer.relative_pe.slopes"][:, 0], alibi_slopes(4))
    # Conv1D orientation: y = x @ W, W [in, out], the transpose of lmpipe's nn.Linear weight
    square = tensors["transformer.h.1.attn.c_proj.weight"]
    assert torch.equal(square, model.h[1].attn.c_proj.weight.detach().t())
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["model_type"] == "btlm" and config["n_inner"] == f
    assert config["mup_width_scale"] == 0.5 and config["mup_embeddings_scale"] == 14.6
    assert config["mup_output_alpha"] == 2.22 and config["mup_scale_qk_dot_by_d"] is True
    assert config["n_positions"] == 256 and config["alibi_scaling"] is None  # the last stage's
    hf = load_hf(root / "hf")
    assert hf.config.hidden_size == d and hf.config.num_hidden_layers == 2
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied


def test_bf16_export_is_within_bf16_noise_and_keeps_the_slopes_fp32(alibi, tmp_path):
    model, _, root = alibi
    export_model(root / "model", tmp_path / "bf16", dtype="bf16")
    tensors = safetensors_torch.load_file(tmp_path / "bf16" / "model.safetensors")
    assert tensors["transformer.wte.weight"].dtype == torch.bfloat16
    assert tensors["transformer.relative_pe.slopes"].dtype == torch.float32
    ids = torch.randint(0, 50257, (1, 16))
    want = lmpipe_logits(model, ids[0], 1.0)
    # fp32 arithmetic on the bf16 weights: lmpipe's model with its weights rounded the same way
    rounded = GPT(model.cfg).eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        fp32 = load_hf(tmp_path / "bf16", dtype=torch.float32)(ids).logits[0]
        bf16_model = load_hf(tmp_path / "bf16", dtype=torch.bfloat16)
        bf16 = bf16_model(ids).logits[0].float()
    assert (fp32 - lmpipe_logits(rounded, ids[0], 1.0)).abs().max() < TOL
    assert bf16_model.transformer.relative_pe.slopes.dtype == torch.float32
    noise = (bf16 - want).abs().max().item()
    assert noise < 0.02 * want.abs().max().item(), noise  # bf16's 8 bits, not a wiring error
    back, _ = load_hf_model(tmp_path / "bf16")
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name].bfloat16().float()), name


def test_sharded_export_loads_in_transformers_and_lmpipe(alibi, tmp_path):
    model, _, root = alibi
    export_model(root / "model", tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ids = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        logits = load_hf(tmp_path / "sharded")(ids).logits[0]
    assert (logits - lmpipe_logits(model, ids[0], 1.0)).abs().max() < TOL
    back, _ = load_hf_model(tmp_path / "sharded")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_the_folders_tokenizer_encodes_as_tiktoken_gpt2(alibi, gpt2):
    _, _, root = alibi
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        root / "hf", trust_remote_code=True, local_files_only=True
    )
    text = "Hello world!  The café’s naïve   résumé\n\n\tcosts $3.50 — 12,345 tokens.<|endoftext|>"
    ids = tokenizer(text)["input_ids"]
    assert ids == gpt2.encode(text, allowed_special="all")
    assert ids[-1] == tokenizer.eos_token_id == 50256
    assert tokenizer.decode(ids) == text


def test_dynamic_alibi_scaling_divides_slopes_by_key_length_over_train_length(tmp_path):
    """alibi_scaling {train_seq_len: 8}: a forward over S > 8 keys uses slopes / (S / 8), and
    during decoding the scale grows with the cache. One layer, so that the cached keys (computed
    from the embeddings alone) do not depend on the scale of the step that made them."""
    model, _ = make_model_folder(tmp_path / "model", [*ALIBI, "model.n_layers=1"])
    export_model(tmp_path / "model", tmp_path / "hf")
    edit_config(tmp_path / "hf", alibi_scaling={"type": "linear", "train_seq_len": 8})
    hf = load_hf(tmp_path / "hf")
    ids = torch.randint(0, 50257, (14,))
    with torch.no_grad():
        full = hf(ids[None]).logits[0]
    assert (full - lmpipe_logits(model, ids, 14 / 8)).abs().max() < TOL
    assert (full - lmpipe_logits(model, ids, 1.0)).abs().max() > 100 * TOL  # it matters
    cache = transformers.DynamicCache()
    with torch.no_grad():
        hf(ids[None, :4], past_key_values=cache, use_cache=True)
        for t in range(4, 14):
            step = hf(ids[None, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            want = lmpipe_logits(model, ids[: t + 1], max(1.0, (t + 1) / 8))[-1]
            assert (step - want).abs().max() < TOL, t
    # lmpipe reads it as a model trained at 8 tokens (eval applies the dynamic rule by length)
    _, recipe = load_hf_model(tmp_path / "hf")
    assert recipe.stages[-1].seq_len == 8 and recipe.stages[-1].alibi_scale == 1.0


def test_import_notes_that_a_dynamic_alibi_scaling_is_not_kept(tmp_path, capsys):
    """No recipe field holds the dynamic rule, so an export of the import writes alibi_scaling
    null: the import says so in one line (and says nothing for a config without the rule)."""
    make_model_folder(tmp_path / "model", ALIBI)
    export_model(tmp_path / "model", tmp_path / "hf")
    capsys.readouterr()
    import_model(tmp_path / "hf", tmp_path / "plain")
    assert capsys.readouterr().err == ""
    edit_config(tmp_path / "hf", alibi_scaling={"type": "linear", "train_seq_len": 8})
    import_model(tmp_path / "hf", tmp_path / "lm")
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"note: {tmp_path / 'hf' / 'config.json'}: alibi_scaling's dynamic rule "
        "(train_seq_len 8) is not kept: the model is imported as trained at 8 tokens;"
    ), err
    assert f"`lmpipe export` of {tmp_path / 'lm'} writes alibi_scaling null" in err
    export_model(tmp_path / "lm", tmp_path / "hf2")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (config["alibi_scaling"], config["n_positions"]) == (None, 8)


def test_btlms_first_upload_field_names_are_read(alibi, tmp_path):
    """The released BTLM config's first version: width_scale, embeddings_scale,
    output_logits_scale (= alpha_out * width_scale) and scale_qk_dot_by_d."""
    model, _, root = alibi
    folder = tmp_path / "old"
    shutil.copytree(root / "hf", folder)
    config = json.loads((folder / "config.json").read_text())
    width = config.pop("mup_width_scale")
    config["width_scale"] = width
    config["embeddings_scale"] = config.pop("mup_embeddings_scale")
    config["output_logits_scale"] = config.pop("mup_output_alpha") * width
    config["scale_qk_dot_by_d"] = config.pop("mup_scale_qk_dot_by_d")
    (folder / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 50257, (9,))
    back, recipe = load_hf_model(folder)
    assert recipe.model.mup.alpha_out == pytest.approx(2.22)
    assert (lmpipe_logits(back, ids, 1.0) - lmpipe_logits(model, ids, 1.0)).abs().max() < TOL
    with torch.no_grad():
        logits = load_hf(folder)(ids[None]).logits[0]
    assert (logits - lmpipe_logits(model, ids, 1.0)).abs().max() < TOL


def test_gpt2_layout_cerebras_gpt_sp_reads_as_transformers_gpt2_computes_it(tmp_path):
    """A GPT-2-layout folder (Cerebras-GPT's SP models) made by transformers' own GPT2LMHeadModel,
    as safetensors and as a weights-only pytorch_model.bin with GPT-2's mask buffers."""
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=128, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(3)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gpt2.save_pretrained(tmp_path / "st")
    ids = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        want = gpt2(ids).logits[0]
    model, recipe = load_hf_model(tmp_path / "st")
    assert recipe.model.position == "learned" and recipe.model.mlp == "gelu"
    assert recipe.model.mup is None and recipe.model.n_positions == 128
    assert (lmpipe_logits(model, ids[0], 1.0) - want).abs().max() < TOL

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", bin_folder)
    state = {k: v.clone() for k, v in gpt2.state_dict().items()}  # lm_head.weight included
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    torch.save(state, bin_folder / "pytorch_model.bin")
    model, _ = load_hf_model(bin_folder)
    assert (lmpipe_logits(model, ids[0], 1.0) - want).abs().max() < TOL


# --- refused input: one line naming the field or the tensor --------------------------------


def one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(error.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = safetensors_torch.load_file(path)
    change(tensors)
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})


def swap_two_tokens(folder: Path, name: str) -> None:
    vocab = json.loads((folder / name).read_text())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (folder / name).write_text(json.dumps(vocab))


def bad_tokenizer_json(folder: Path) -> None:
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    merges = [m for m in (folder / "merges.txt").read_text().splitlines()[1:] if m]
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": []}
    (folder / "tokenizer.json").write_text(json.dumps(data))


BAD = {
    "llama": (lambda f: edit_config(f, model_type="llama"), ["config.json", "model_type", "llama"]),
    "gelu_new": (lambda f: edit_config(f, activation_function="gelu_new"), ["activation_function", "gelu_new"]),
    "layer_idx": (lambda f: edit_config(f, scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx"]),
    "reorder": (lambda f: edit_config(f, reorder_and_upcast_attn=True), ["reorder_and_upcast_attn"]),
    "untied_config": (lambda f: edit_config(f, tie_word_embeddings=False), ["tie_word_embeddings"]),
    "vocab_size": (lambda f: edit_config(f, vocab_size=50304), ["vocab_size", "50304"]),
    "bad_scaling": (lambda f: edit_config(f, alibi_scaling={"type": "linear", "factor": 0.5}), ["alibi_scaling"]),
    "untied_head": (
        lambda f: edit_tensors(f, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1})),
        ["lm_head.weight", "untied"],
    ),
    "slopes": (
        lambda f: edit_tensors(f, lambda t: t["transformer.relative_pe.slopes"].mul_(2)),
        ["transformer.relative_pe.slopes"],
    ),
    "missing": (
        lambda f: edit_tensors(f, lambda t: t.pop("transformer.h.1.mlp.c_fc2.bias")),
        ["transformer.h.1.mlp.c_fc2.bias", "missing"],
    ),
    "extra": (
        lambda f: edit_tensors(f, lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(64)})),
        ["h.2.ln_1.weight"],
    ),
    "shape": (lambda f: edit_config(f, n_inner=128), ["transformer.h.0.mlp.c_fc.weight", "[64, 170]", "[64, 128]"]),  # fmt: skip
    "vocab_json": (lambda f: swap_two_tokens(f, "vocab.json"), ["vocab.json", "GPT-2"]),
    "tokenizer_json": (bad_tokenizer_json, ["tokenizer.json", "GPT-2"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_what_lmpipe_cannot_run_is_refused_in_one_line(alibi, tmp_path, case):
    _, _, root = alibi
    folder = tmp_path / "bad"
    shutil.copytree(root / "hf", folder)
    spoil, parts = BAD[case]
    spoil(folder)
    with pytest.raises(LmpipeError) as error:
        load_hf_model(folder)
    one_line(error, *parts)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LmpipeError):
        import_model(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_refuses_an_output_inside_the_model_folder_and_a_bad_dtype(alibi):
    _, _, root = alibi
    with pytest.raises(LmpipeError) as error:
        export_model(root / "model", root / "model" / "hf")
    one_line(error, "reads")
    with pytest.raises(LmpipeError) as error:
        export_model(root / "model", root / "hf16", dtype="fp16")
    one_line(error, "fp16")


def test_cli_export_and_import(alibi, tmp_path):
    from typer.testing import CliRunner

    from lmpipe.cli.app import app

    _, _, root = alibi
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(root / "model"), "-o", str(tmp_path / "hf"), "--dtype", "bf16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    result = runner.invoke(app, ["import", str(tmp_path / "hf"), "-o", str(tmp_path / "lm")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "lm" / "model").iterdir()} == {"model.pt", "recipe.yaml"}
    result = runner.invoke(app, ["import", str(tmp_path / "hf"), "-o", str(tmp_path / "lm")])
    assert result.exit_code == 2 and "--overwrite" in result.output


# --- lmpipe train --init-from ------------------------------------------------------------------

# The test_loop model (d_model 32), two steps of 512 tokens: the first at learning rate 0
TRAIN = [
    "model.d_model=32", "model.d_ff=85", "model.n_heads=2", "model.mup.d_model_base=32",
    "model.mup.d_ff_base=85", "tokens_per_step=512", "micro_batch_tokens=512",
    "stages.0.tokens=512", "stages.1.tokens=512", "schedule.warmup_tokens=1024",
    "checkpoint_every_tokens=1024", "precision=fp32",
]  # fmt: skip


def test_init_from_a_mismatched_recipe_names_the_field(tmp_path, pattern_tokens):
    from lmpipe.train.loop import train

    make_model_folder(tmp_path / "model", TRAIN[:5])
    export_model(tmp_path / "model", tmp_path / "hf")
    recipe = load_recipe("tiny", [*TRAIN, "model.n_layers=3"])
    with pytest.raises(LmpipeError) as error:
        train(recipe, pattern_tokens, tmp_path / "run", init_from=tmp_path / "hf")
    one_line(error, "model.n_layers", "3", "2")
    recipe = load_recipe("tiny", [*TRAIN, "model.mup.alpha_in=10.0"])
    with pytest.raises(LmpipeError) as error:
        train(recipe, pattern_tokens, tmp_path / "run", init_from=tmp_path / "hf")
    one_line(error, "model.mup.alpha_in")
    assert not (tmp_path / "run").exists()


def test_init_from_starts_training_from_the_imported_weights(tmp_path, pattern_tokens, monkeypatch):  # fmt: skip
    from lmpipe.train import model as model_module
    from lmpipe.train.loop import train

    make_model_folder(tmp_path / "model", TRAIN[:5], seed=7)
    export_model(tmp_path / "model", tmp_path / "hf")
    imported, _ = load_hf_model(tmp_path / "hf")
    first: list = []
    forward = model_module.GPT.forward

    def spy(self, *args, **kwargs):  # the first training forward: its batch and weights
        if not first:
            first.append((args, {k: v.detach().clone() for k, v in self.state_dict().items()}))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.GPT, "forward", spy)
    recipe = load_recipe("tiny", TRAIN)
    train(recipe, pattern_tokens, tmp_path / "run", init_from=tmp_path / "hf")
    (idx, targets, *_), weights = first[0]
    for name, tensor in imported.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    with torch.no_grad():
        _, loss = forward(imported, idx.cpu(), targets.cpu())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert rows[0]["loss"] == pytest.approx(loss.item(), abs=2e-6)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["init_from"] == str(tmp_path / "hf")


def test_a_learned_model_trained_shorter_than_its_positions_is_read_at_its_training_length(tmp_path):  # fmt: skip
    """n_positions 256, last stage 128: the export carries 128 (lmpipe_train_seq_len), so
    `eval hf:EXPORT` and an import read windows of 128 as `eval RUN` does; a folder exported
    before the field existed reads n_positions as it did; a length past the table is refused."""
    from lmpipe.evals.run import evaluate

    overrides = [*LEARNED, "model.mup=null", "model.init_std=0.02", "stages.1.seq_len=128"]
    make_model_folder(tmp_path / "model", overrides)
    export_model(tmp_path / "model", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_positions"], config["lmpipe_train_seq_len"]) == (256, 128)
    _, recipe = load_hf_model(tmp_path / "hf")
    assert (recipe.model.n_positions, recipe.stages[-1].seq_len) == (256, 128)
    import_model(tmp_path / "hf", tmp_path / "imported")
    assert load_model(tmp_path / "imported")[1].stages[-1].seq_len == 128

    (tmp_path / "tasks" / "arc_easy").mkdir(parents=True)
    row = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}  # fmt: skip
    (tmp_path / "tasks" / "arc_easy" / "test.jsonl").write_text(json.dumps(row) + "\n")
    kw = dict(tasks=["arc_easy"], data=None, task_data=tmp_path / "tasks", limit=1)
    lengths = [
        evaluate(model, tmp_path / out, **kw)["max_length"]
        for model, out in ((tmp_path / "model", "e1"), (f"hf:{tmp_path / 'hf'}", "e2"))
    ]
    assert lengths == [128, 128]

    config.pop("lmpipe_train_seq_len")  # as exported before the field existed
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert load_hf_model(tmp_path / "hf")[1].stages[-1].seq_len == 256
    edit_config(tmp_path / "hf", lmpipe_train_seq_len=512)
    with pytest.raises(LmpipeError) as error:
        load_hf_model(tmp_path / "hf")
    one_line(error, "config.json", "lmpipe_train_seq_len 512", "256 learned positions")
