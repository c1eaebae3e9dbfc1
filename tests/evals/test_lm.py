"""GPTLM scores as lm-evaluation-harness's HF model does: token boundary, truncation, rolling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmpipe.evals.lm import GPTLM, encode_pair, rolling_windows

EOT = 50256


def harness_rolling_windows(token_list, prefix_token, max_seq_len, context_len=1):
    """lm_eval.utils.get_rolling_token_windows + make_disjoint_window, transcribed as the oracle."""
    if not token_list:
        return []
    out = []
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    out.append(([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]))
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        out.append(
            (
                token_list[window_end - max_seq_len - 1 : window_end - 1],
                token_list[window_end - window_pred_len : window_end],
            )
        )
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in out]


@torch.no_grad()
def hand_loglikelihood(model, context_enc, continuation_enc, max_length):
    """One full forward pass over the (left-truncated) request; log_softmax gathered by hand."""
    full = (context_enc + continuation_enc)[-(max_length + 1) :]
    logits = model(torch.tensor([full[:-1]]))[0][0]
    logprobs = F.log_softmax(logits, dim=-1)
    n = len(continuation_enc)
    positions = range(len(full) - 1 - n, len(full) - 1)
    return sum(float(logprobs[p, full[p + 1]]) for p in positions)


# --- the token boundary rule --------------------------------------------------------------


def test_trailing_whitespace_of_the_context_moves_to_the_continuation(gpt2):
    ctx, cont = encode_pair(gpt2.encode, "Question: Capital of France?\nAnswer: ", "Paris", EOT)
    assert ctx == gpt2.encode("Question: Capital of France?\nAnswer:")
    assert cont == gpt2.encode(" Paris")  # one token, not a lone space and then "Paris"
    assert len(cont) == 1

    ctx, cont = encode_pair(gpt2.encode, "A:\n\n", " yes", EOT)
    assert ctx == gpt2.encode("A:")
    assert gpt2.decode(cont) == "\n\n yes"


def test_continuation_is_cut_from_the_whole_encoding(gpt2):
    # "hel" + "lo world": encoded whole, "hello" is one token, so the context's length in tokens
    # (1) cuts it and the continuation is only " world" - the harness's rule, kept on purpose.
    ctx, cont = encode_pair(gpt2.encode, "hel", "lo world", EOT)
    assert ctx == gpt2.encode("hel")
    assert cont == gpt2.encode("hello world")[len(ctx) :]
    assert cont != gpt2.encode("lo world")


def test_empty_context_is_end_of_text(gpt2):
    assert encode_pair(gpt2.encode, "", "Hello there", EOT) == ([EOT], gpt2.encode("Hello there"))


def test_empty_context_before_an_end_of_text_continuation_is_not_doubled(gpt2):
    # TemplateLM.loglikelihood (lm-eval 0.4.13): when the continuation's first token is already
    # the prefix token, that token is the context and is not scored; it is not prefixed twice.
    lm = GPTLM(torch.nn.Identity(), gpt2, max_length=16)
    ctx, cont = lm.encode_pair("", "<|endoftext|>Hello there")
    assert ctx == [EOT]
    assert cont == gpt2.encode("Hello there")


def test_a_context_of_only_whitespace_leaves_no_context_token_and_is_refused(tiny_gpt, gpt2):
    # The whitespace moves whole into the continuation (the harness's rule); its first token would
    # be predicted at position -1, another row's padding, so the score would depend on the batch.
    # The harness fails on such a request (an AssertionError); GPTLM refuses it by name.
    lm = GPTLM(tiny_gpt, gpt2, max_length=24, batch_size=3)
    assert lm.encode_pair("   ", " x") == ([], gpt2.encode("    x"))
    with pytest.raises(ValueError, match="^a request has no context token to predict its continuation from$"):  # fmt: skip
        lm.loglikelihood([("Question: a\nAnswer:", " b"), ("   ", " x")])


# --- loglikelihood ----------------------------------------------------------------------


REQUESTS = [
    ("Question: Which gas do plants take in?\nAnswer:", " Carbon dioxide"),
    ("The river ran ", "quickly under the stone bridge and out to the sea."),
    ("", "A sentence with no context at all."),
    ("Short", " one"),
    ("A much longer context that goes on and on, well past the model's short window, " * 2, " end"),
]


def test_loglikelihood_equals_a_hand_computation(tiny_gpt, gpt2):
    lm = GPTLM(tiny_gpt, gpt2, max_length=24, batch_size=2)
    got = lm.loglikelihood(REQUESTS)
    for (context, continuation), (ll, _) in zip(REQUESTS, got, strict=True):
        ctx_enc, cont_enc = lm.encode_pair(context, continuation)
        want = hand_loglikelihood(tiny_gpt, ctx_enc, cont_enc, 24)
        assert ll == pytest.approx(want, abs=1e-4)
    assert len(lm.encode_pair(*REQUESTS[-1])[0]) > 24  # the last one was left-truncated


def test_results_do_not_depend_on_the_batch_size(tiny_gpt, gpt2):
    reference = GPTLM(tiny_gpt, gpt2, max_length=24, batch_size=1).loglikelihood(REQUESTS)
    for batch_size in (2, 3, 16):
        got = GPTLM(tiny_gpt, gpt2, max_length=24, batch_size=batch_size).loglikelihood(REQUESTS)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, reference, strict=True):
            assert ll == pytest.approx(ll_ref, abs=1e-4)
            assert greedy == greedy_ref


@torch.no_grad()
def test_greedy_flag(tiny_gpt, gpt2):
    lm = GPTLM(tiny_gpt, gpt2, max_length=32)
    context = gpt2.encode("The garden in winter")
    # Build the model's own greedy continuation of three tokens, one forward pass per token.
    greedy = []
    for _ in range(3):
        logits = tiny_gpt(torch.tensor([context + greedy]))[0][0, -1]
        greedy.append(int(logits.argmax()))
    wrong_last = greedy[:2] + [(greedy[2] + 1) % gpt2.n_vocab]
    (ll_g, is_g), (ll_w, is_w) = lm.loglikelihood_tokens([(context, greedy), (context, wrong_last)])
    assert is_g is True
    assert is_w is False
    assert ll_g > ll_w


def test_rolling_windows_match_the_harness():
    tokens = list(range(1000, 1037))
    for max_length in (1, 2, 5, 8, 36, 37, 40):
        for n in (0, 1, 7, 8, 9, 16, 17, 37):
            got = list(rolling_windows(tokens[:n], EOT, max_length))
            assert got == harness_rolling_windows(tokens[:n], EOT, max_length), (max_length, n)
            scored = [t for _, cont in got for t in cont]
            assert scored == tokens[:n]  # every token scored exactly once, in order


@torch.no_grad()
def test_rolling_loglikelihood_sums_per_token_logprobs_over_windows(tiny_gpt, gpt2):
    L = 8
    text = "The engine builds a window between the island and the market, often after winter, and runs slowly."
    tokens = gpt2.encode(text)
    assert len(tokens) > 2 * L
    # By hand: token i sits in the window of predictions that ends at e = min(k L + L, n); that
    # window's input is the L tokens before e - 1 (end-of-text first for the first window).
    stream = [EOT] + tokens
    want = 0.0
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))
        inp = stream[max(0, end - L) : end]  # stream is shifted by one: stream[j] = tokens[j - 1]
        logprobs = F.log_softmax(tiny_gpt(torch.tensor([inp]))[0][0], dim=-1)
        offset = max(0, end - L)
        for i in range(start, end):
            want += float(logprobs[i - offset, tokens[i]])
    lm = GPTLM(tiny_gpt, gpt2, max_length=L, batch_size=3)
    (got,) = lm.loglikelihood_rolling([text])
    assert got == pytest.approx(want, abs=1e-4)
    # Token-level rolling of the same tokens gives the same sum.
    assert lm.loglikelihood_rolling_tokens([tokens])[0] == pytest.approx(got, abs=1e-6)


def test_alibi_scale_reaches_the_model(tiny_gpt, gpt2):
    request = [("The river ran quickly under the stone bridge and", " out to the sea.")]
    plain = GPTLM(tiny_gpt, gpt2, max_length=32).loglikelihood(request)[0][0]
    scaled = GPTLM(tiny_gpt, gpt2, max_length=32, alibi_scale=4.0).loglikelihood(request)[0][0]
    assert plain != pytest.approx(scaled, abs=1e-6)


def test_a_continuation_longer_than_the_window_is_refused(tiny_gpt, gpt2):
    from lmpipe.dataprep.errors import LmpipeError

    lm = GPTLM(tiny_gpt, gpt2, max_length=4)
    with pytest.raises(LmpipeError, match="longer than the model's max_length"):
        lm.loglikelihood_tokens([([EOT], [1, 2, 3, 4, 5])])


def test_progress_reports_every_request(tiny_gpt, gpt2):
    seen = []
    lm = GPTLM(
        tiny_gpt, gpt2, max_length=24, batch_size=2, progress=lambda d, t: seen.append((d, t))
    )
    lm.loglikelihood(REQUESTS)
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_any_model_with_the_forward_signature_works(tiny_gpt, gpt2):
    # The fast path (hidden states, unembedding only scored positions) equals the full logits.
    class Wrapped(torch.nn.Module):  # not an lmpipe GPT: scored through its full logits
        def __init__(self):
            super().__init__()
            self.inner = tiny_gpt

        def forward(self, idx, alibi_scale=1.0):
            return self.inner(idx, alibi_scale=alibi_scale)

    fast = GPTLM(tiny_gpt, gpt2, max_length=24, batch_size=2).loglikelihood(REQUESTS)
    slow = GPTLM(Wrapped(), gpt2, max_length=24, batch_size=2).loglikelihood(REQUESTS)
    for (a, ga), (b, gb) in zip(fast, slow, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


# --- shared contexts: one row, the context once, a branch per continuation ------------------


def model_variants():
    from lmpipe.train.model import GPT
    from lmpipe.train.recipe import ModelConfig, MupConfig

    torch.manual_seed(0)
    small = dict(n_layers=2, n_heads=4, d_model=32)
    yield "alibi-swiglu-mup", GPT(ModelConfig(**small, d_ff=84, mup=MupConfig(d_model_base=16, d_ff_base=42))), 1.0  # fmt: skip
    yield "alibi-swiglu-sp-scaled", GPT(ModelConfig(**small, d_ff=85, mup=None)), 2.0
    learned = ModelConfig(**small, d_ff=128, position="learned", n_positions=64, mlp="gelu", mup=None)  # fmt: skip
    yield "learned-gelu-sp", GPT(learned), 1.0


@torch.no_grad()
def alone(model, context, continuation, max_length, alibi_scale):
    """(sum log p, greedy) of one request through the model's plain forward pass."""
    full = (list(context) + list(continuation))[-(max_length + 1) :]
    logits = model(torch.tensor([full[:-1]]), alibi_scale=alibi_scale)[0][0]
    n = len(continuation)
    scored = logits[len(full) - 1 - n :]
    target = torch.tensor(full[-n:])
    ll = float(F.log_softmax(scored, dim=-1).gather(1, target[:, None]).sum())
    return ll, bool((scored.argmax(dim=-1) == target).all())


def shared_requests(gpt2):
    question = gpt2.encode("Question: Which of these floats on water?\nAnswer:")
    choices = [" a stone", " a piece of dry wood", " iron", " a stone", " lead and a long tail"]
    requests = [(question, gpt2.encode(c)) for c in choices]  # " a stone" twice
    requests.append((question, gpt2.encode(" and on and on" * 4)))  # too long: truncated, alone
    requests.append((gpt2.encode("Another context"), gpt2.encode(" alone")))
    requests.append(([EOT], gpt2.encode("No context")))
    requests.append(([EOT], gpt2.encode("No context at all")))
    return requests


@pytest.mark.parametrize("variant", range(3))
def test_shared_context_rows_score_each_request_as_alone(variant, gpt2):
    from lmpipe.evals.lm import plan_rows

    name, model, scale = list(model_variants())[variant]
    model.eval()
    requests = shared_requests(gpt2)
    max_length = 24
    rows = plan_rows(requests, max_length, share=True)
    assert sum(r.branched for r in rows) == 1, name  # the question's choices
    assert sum(len(r.requests) for r in rows) == len(requests)  # the repeat is in the request list
    (truncated,) = [r for r in rows if r.requests == [5]]  # too long to share its context
    assert len(truncated.tokens) == max_length and not truncated.branched
    lm = GPTLM(model, gpt2, max_length=max_length, batch_size=3, alibi_scale=scale)
    got = lm.loglikelihood_tokens(requests)
    for request, (ll, greedy) in zip(requests, got, strict=True):
        want_ll, want_greedy = alone(model, *request, max_length, scale)
        assert ll == pytest.approx(want_ll, abs=1e-4), name
        assert greedy == want_greedy, name
    assert got[0] == got[3]  # the repeated request: scored once, the same numbers exactly


def test_a_context_shared_by_greedy_continuations(gpt2):
    """Greedy flags through branches: the model's own argmax continuations are greedy."""
    _, model, _ = next(model_variants())
    model.eval()
    context = gpt2.encode("The market by the river")
    ids: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([context + ids]))[0][0, -1].argmax()))
    requests = [(context, ids[:1]), (context, ids[:2]), (context, ids), (context, ids[:2][::-1])]
    got = GPTLM(model, gpt2, max_length=32).loglikelihood_tokens(requests)
    assert [g for _, g in got][:3] == [True, True, True]
    assert got[3][1] == (ids[1] == ids[0])


def test_batches_of_branched_rows_shrink_to_the_mask_budget(gpt2, monkeypatch):
    from lmpipe.evals import lm as lm_module

    _, model, _ = next(model_variants())
    model.eval()
    requests = shared_requests(gpt2)
    reference = GPTLM(model, gpt2, max_length=24, batch_size=8).loglikelihood_tokens(requests)
    batches, score_rows = [], lm_module.GPTLM._score_rows

    def spy(self, rows):
        batches.append([r.branched for r in rows])
        return score_rows(self, rows)

    monkeypatch.setattr(lm_module.GPTLM, "_score_rows", spy)
    monkeypatch.setattr(lm_module, "MASK_ELEMENTS", 1)
    got = GPTLM(model, gpt2, max_length=24, batch_size=8).loglikelihood_tokens(requests)
    assert [True] in batches  # the branched row went alone
    assert all(len(b) == 1 for b in batches if any(b)) and any(len(b) > 1 for b in batches)
    for (a, ga), (b, gb) in zip(got, reference, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_shared_rows_stay_within_the_window_and_rolling_windows_stay_alone():
    from lmpipe.evals.lm import plan_rows

    context = list(range(100, 106))
    long_choices = [(context, list(range(k, k + 7))) for k in range(0, 70, 7)]  # 10 branches of 6
    rows = plan_rows(long_choices, max_length=20, share=True)
    assert [len(r.requests) for r in rows] == [2, 2, 2, 2, 2]  # 6 + 2 x 6 <= 20 < 6 + 3 x 6
    assert all(len(r.tokens) <= 20 and r.branched for r in rows)
    assert sorted(i for r in rows for i in r.requests) == list(range(10))
    windows = [([EOT], list(range(k, k + 5))) for k in range(0, 50, 5)]  # first rolling windows
    assert not any(r.branched or len(r.requests) > 1 for r in plan_rows(windows, 20, share=True))
    assert not any(r.branched for r in plan_rows(long_choices, 20, share=False))
