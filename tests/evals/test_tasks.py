"""Task prompts against the real files, the harness's metrics, and the held-out continuation task."""

from __future__ import annotations

import json
import math
import random
import re
import warnings

import pytest

from lmpipe.evals.tasks import (
    EXTERNAL_TASKS,
    Choice,
    Cloze,
    choice_item,
    continuation_items,
    load_items,
    mean_stderr,
    score_items,
    wikitext_detokenize,
)


class StubLM:
    """Fixed log-likelihoods per request, to test the metric code without a model."""

    def __init__(self, table: dict[tuple[str, str], tuple[float, bool]]):
        self.table = table
        self.seen: list[tuple[str, str]] = []

    def loglikelihood(self, requests):
        self.seen.extend(requests)
        return [self.table[r] for r in requests]

    def loglikelihood_rolling(self, texts):
        raise NotImplementedError


# --- metrics ----------------------------------------------------------------------------


def test_acc_and_acc_norm_choose_differently():
    # "a" is likelier in total; per character "abc" is (-2.5 / 3 > -1 / 1). Dividing by the
    # length with the leading space (2 and 4) would pick "a" again: the harness does not.
    item = choice_item("Q:", ["a", "abc"], gold=1)
    lm = StubLM({("Q:", " a"): (-1.0, False), ("Q:", " abc"): (-2.5, False)})
    scores = score_items(lm, [item])
    assert scores["acc"]["value"] == 0.0
    assert scores["acc_norm"]["value"] == 1.0
    assert scores["n"] == 1
    assert lm.seen == [("Q:", " a"), ("Q:", " abc")]


def test_an_empty_choice_is_scored_as_the_harness_scores_it_without_a_warning():
    # lm-eval 0.4.13 keeps a row with an empty choice: acc_norm divides its log-likelihood by a
    # length of 0 (-inf: never the pick) and numpy warns of the division; here the same pick,
    # and no warning in the middle of the progress bars.
    item = choice_item("Q:", ["", "abc"], gold=1)
    lm = StubLM({("Q:", " "): (-0.5, False), ("Q:", " abc"): (-3.0, False)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = score_items(lm, [item])
    assert scores["acc"]["value"] == 0.0  # -0.5 > -3.0: the empty choice
    assert scores["acc_norm"]["value"] == 1.0  # -0.5 / 0 = -inf < -3.0 / 3


def test_ties_go_to_the_first_choice_and_stderr_is_the_harness_mean_stderr():
    items = [choice_item(f"q{i}", ["x", "y"], gold=i % 2) for i in range(4)]
    table = {(f"q{i}", c): (-1.0, False) for i in range(4) for c in (" x", " y")}
    scores = score_items(StubLM(table), items)
    assert scores["acc"]["value"] == 0.5  # argmax of a tie is choice 0: right for gold 0 only
    # sample std of [1, 0, 1, 0] is sqrt(1/3); / sqrt(4)
    assert scores["acc"]["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)
    assert mean_stderr([1.0]) is None


def test_cloze_metrics_are_greedy_accuracy_and_perplexity():
    items = [Cloze("ctx one", " word"), Cloze("ctx two", " other")]
    lm = StubLM({("ctx one", " word"): (-1.0, True), ("ctx two", " other"): (-3.0, False)})
    scores = score_items(lm, items, ("perplexity", "acc"))
    assert scores["acc"]["value"] == 0.5
    assert scores["perplexity"]["value"] == pytest.approx(math.exp(2.0))
    assert scores["perplexity"]["stderr"] > 0


def test_only_the_stock_metrics_are_kept():
    item = choice_item("Q:", ["no", "yes"], gold=1)
    lm = StubLM({("Q:", " no"): (-2.0, False), ("Q:", " yes"): (-1.0, False)})
    assert set(score_items(lm, [item], EXTERNAL_TASKS["boolq"].metrics)) == {"acc", "n"}


# --- prompts, against rows of the real files ---------------------------------------------


def first(eval_assets, task: str, limit: int = 1):
    return load_items(EXTERNAL_TASKS[task], eval_assets, limit)


def test_arc_prompt(eval_assets):
    (item,) = first(eval_assets, "arc_easy")
    question = (
        "Which statement best explains why photosynthesis is the foundation of most food webs?"
    )
    assert item.requests[0] == (
        f"Question: {question}\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert len(item.requests) == 4 and item.gold == 0
    # Every row agrees with MosaicML's independently processed copy ("Question: ..." queries).
    for task, source in (
        ("arc_easy", "llmfoundry_arc_easy.jsonl"),
        ("arc_challenge", "llmfoundry_arc_challenge.jsonl"),
    ):
        items = load_items(EXTERNAL_TASKS[task], eval_assets)
        rows = [json.loads(line) for line in open(eval_assets / task / source, encoding="utf-8")]
        assert len(items) == len(rows) > 1000
        for item, row in zip(items, rows, strict=True):
            assert item.requests == tuple(
                (row["query"] + "\nAnswer:", " " + c) for c in row["choices"]
            )
            assert item.gold == row["gold"]


def test_piqa_prompt(eval_assets):
    items = load_items(EXTERNAL_TASKS["piqa"], eval_assets)
    raw = [
        json.loads(line) for line in open(eval_assets / "piqa" / "valid.jsonl", encoding="utf-8")
    ]
    labels = (eval_assets / "piqa" / "valid-labels.lst").read_text().split()
    assert len(items) == len(raw) == len(labels) == 1838
    for item, row, label in zip(items, raw, labels, strict=True):
        assert item.requests == (
            (f"Question: {row['goal']}\nAnswer:", " " + row["sol1"]),
            (f"Question: {row['goal']}\nAnswer:", " " + row["sol2"]),
        )
        assert item.gold == int(label)


def test_winogrande_partial_scoring(eval_assets):
    items = load_items(EXTERNAL_TASKS["winogrande"], eval_assets)
    (first_item,) = items[:1]
    assert first_item.requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert first_item.gold == 1
    # MosaicML's copy is already split this way: all 1267 rows give the same requests.
    rows = [
        json.loads(line)
        for line in open(
            eval_assets / "winogrande" / "llmfoundry_winogrande.jsonl", encoding="utf-8"
        )
    ]
    assert len(items) == len(rows) == 1267
    for item, row in zip(items, rows, strict=True):
        assert item.requests == tuple(
            (c, " " + row["continuation"]) for c in row["context_options"]
        )
        assert item.gold == row["gold"]


def test_other_prompts(eval_assets):
    (obqa,) = first(eval_assets, "openbookqa")
    assert obqa.requests[1][0].startswith("A person wants to start saving money") and obqa.requests[
        1
    ][0].endswith("save money is to")
    assert obqa.requests[1][1] == " quit eating lunch out" and obqa.gold == 1

    (boolq,) = first(eval_assets, "boolq")
    row = json.loads(open(eval_assets / "boolq" / "validation.jsonl", encoding="utf-8").readline())
    assert boolq.requests == tuple(
        (f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", a) for a in (" no", " yes")
    )
    assert boolq.gold == 0

    (siqa,) = first(eval_assets, "social_iqa")
    assert siqa.requests[2] == (
        "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\nA:",
        " Find somewhere to go",
    )
    assert siqa.gold == 2

    (hella,) = first(eval_assets, "hellaswag")
    assert hella.requests[3] == (
        # ctx_b "he" capitalised, as the stock query's ctx_b.capitalize() has it
        "Roof shingle removal: A man is sitting on a roof. He",
        " starts pulling up roofing on a roof.",
    )
    assert hella.gold == 3 and len(hella.choices) == 4

    (lambada,) = first(eval_assets, "lambada_openai")
    assert isinstance(lambada, Cloze)
    assert lambada.continuation == " signs"
    assert lambada.context.endswith("I don't care about")


def test_hellaswag_capitalises_the_visible_ctx_b():
    from lmpipe.evals.tasks import hellaswag_capitalize_ctx_b

    # ActivityNet: ctx_a + " " + ctx_b, ctx_b a lower-case sentence start
    assert hellaswag_capitalize_ctx_b("Discus throw: A man throws a rock. people") == (
        "Discus throw: A man throws a rock. People"
    )
    assert hellaswag_capitalize_ctx_b("X: One. Two. the two") == "X: One. Two. The two"
    # WikiHow (ctx_b empty: the text ends in a whole sentence) and a tail that is no sentence start
    for text in ("Health: How to calm oneself. Breathe. Slowly.", "Sax: 1 a guy plays. 2 a guy"):
        assert hellaswag_capitalize_ctx_b(text) == text


def test_every_task_file_loads_whole(eval_assets):
    counts = {t: len(load_items(s, eval_assets)) for t, s in EXTERNAL_TASKS.items()}
    assert counts == {
        "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "openbookqa": 500, "boolq": 3270,
        "winogrande": 1267, "social_iqa": 1954, "hellaswag": 10042, "lambada_openai": 5153,
        "wikitext": 62,
    }  # fmt: skip


def test_a_bad_row_names_file_and_line(tmp_path):
    from lmpipe.dataprep.errors import LmpipeError

    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "validation.jsonl").write_text(
        '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g"}\n'
    )
    with pytest.raises(LmpipeError, match=r"validation.jsonl:2: not a piqa row"):
        load_items(EXTERNAL_TASKS["piqa"], tmp_path)
    with pytest.raises(LmpipeError, match="no such file"):
        load_items(EXTERNAL_TASKS["arc_easy"], tmp_path)


# One valid row per task, and a field of it made something other than a string: the harness would
# paste a number into the prompt, and fail on a non-string choice only while scoring it.
VALID_ROWS = {
    "arc_easy": {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
    "openbookqa": {"question_stem": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"},
    "piqa": {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
    "boolq": {"passage": "p", "question": "q", "label": 0},
    "social_iqa": {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"},
    "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"},
    "lambada_openai": {"text": "a b"},
    "wikitext": {"page": "p"},
}  # fmt: skip


@pytest.mark.parametrize(
    ("task", "change", "message"),
    [
        ("arc_easy", {"choices": {"text": [1, 2], "label": ["A", "B"]}}, "choices.text[0] is 1"),
        ("arc_easy", {"question": 5}, "question is 5"),
        ("openbookqa", {"choices": {"text": "ab", "label": ["A", "B"]}}, 'choices.text is "ab"'),
        ("openbookqa", {"question_stem": None}, "question_stem is null"),
        ("piqa", {"sol2": 7}, "sol2 is 7"),
        ("boolq", {"passage": ["p"]}, 'passage is ["p"]'),
        ("social_iqa", {"answerB": None}, "answerB is null"),
        ("winogrande", {"option1": 1}, "option1 is 1"),
        ("lambada_openai", {"text": 3}, "text is 3"),
        ("wikitext", {"page": 3}, "page is 3"),
    ],
)
def test_a_field_that_is_not_a_string_names_file_line_and_field(tmp_path, task, change, message):
    from lmpipe.dataprep.errors import LmpipeError

    spec = EXTERNAL_TASKS[task]
    path = tmp_path / spec.path
    path.parent.mkdir()
    rows = [VALID_ROWS[task], {**VALID_ROWS[task], **change}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_items(spec, tmp_path, limit=1)) == 1  # the first row is a valid one
    with pytest.raises(LmpipeError, match=f"^{re.escape(f'{path}:2: {message}, not a')}"):
        load_items(spec, tmp_path)


# --- the held-out continuation task ------------------------------------------------------


def test_continuation_items_are_deterministic_with_the_gold_among_four(random_text):
    rng = random.Random(3)
    texts = [random_text(rng, rng.randint(30, 200)) for _ in range(10)]
    items = continuation_items(texts, seed=1)
    assert items == continuation_items(texts, seed=1)
    assert items != continuation_items(texts, seed=2)
    eligible = [t for t in texts if len(t.split()) >= 36]
    assert len(items) == len(eligible) > 3
    for item, text in zip(items, eligible, strict=True):
        assert isinstance(item, Choice)
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        context = item.requests[0][0]
        gold = item.choices[item.gold]
        assert text.startswith(context)
        # The gold is the 20 words that follow the context in the document.
        assert gold == " ".join(text[len(context) :].split()[:20])
        assert all(len(c.split()) == 20 for c in item.choices)
        assert all(
            r == (context, " " + c) for r, c in zip(item.requests, item.choices, strict=True)
        )
    # The gold's position is spread over the four slots, so chance really is 25%.
    assert len({item.gold for item in items}) > 1
    assert len(continuation_items(texts, seed=1, limit=2)) == 2


def test_a_model_that_knows_the_text_scores_full_marks(random_text):
    rng = random.Random(5)
    texts = [random_text(rng, 80) for _ in range(6)]
    items = continuation_items(texts, seed=0)

    class Oracle:  # prefers whichever choice really follows the context
        def loglikelihood(self, requests):
            out = []
            for context, continuation in requests:
                doc = next(t for t in texts if t.startswith(context))
                true = " ".join(doc[len(context) :].split()[:20])
                out.append((0.0 if continuation == " " + true else -50.0, False))
            return out

    scores = score_items(Oracle(), items)
    assert scores["acc"]["value"] == 1.0 and scores["n"] == len(items) == 6


def test_wikitext_detokenizer_follows_the_harness():
    # expected output produced by lm-eval 0.4.13's wikitext_detokenizer on the same string
    raw = 'the dogs \' bone ( 12 @,@ 000 ) \n = = Section = = \n He said " yes " , 5 @.@ 5 \N{DEGREE SIGN} N '
    assert (
        wikitext_detokenize(raw)
        == 'the dogs\' bone (12,000)\n== Section ==\nHe said "yes", 5.5\N{DEGREE SIGN}N '
    )


def test_wikitext_pages_and_metrics(eval_assets):
    items = load_items(EXTERNAL_TASKS["wikitext"], eval_assets)
    assert len(items) == 62
    assert items[0].text.startswith(
        " = Robert Boulter =\n\nRobert Boulter is an English film, television"
    )

    class Uniform:  # log p = -1 per character: the metrics are then known in closed form
        def loglikelihood_rolling(self, texts):
            return [-float(len(t)) for t in texts]

    scores = score_items(Uniform(), items[:3], EXTERNAL_TASKS["wikitext"].metrics)
    chars = sum(len(i.text) for i in items[:3])
    words = sum(len(re.split(r"\s+", i.source)) for i in items[:3])  # counted before detokenising
    n_bytes = sum(len(i.source.encode()) for i in items[:3])
    assert set(scores) == {"word_perplexity", "byte_perplexity", "bits_per_byte", "n"}
    assert scores["word_perplexity"]["value"] == pytest.approx(math.exp(chars / words))
    assert scores["bits_per_byte"]["value"] == pytest.approx(chars / n_bytes / math.log(2))
