"""lmpipe's requests against the ones lm-evaluation-harness 0.4.13 makes from the same files.

Each row was produced by the stock harness task (its YAML, pointed at the lm-eval-ready file of
../shared/assets/evals) through `build_all_requests`, by benchmarks/lmeval_crosscheck.py, which
compares every document of every task; these pin a few real rows so a regression shows without
the harness installed. A row is (task, document index, gold index, context(s), continuation(s)):
one context shared by every choice, or (winogrande) one context per choice and one continuation.
hellaswag's rows are what the stock `process_docs` makes of the lossy file once the visible ctx_b
is split off (crosscheck docstring); document 0 is one where that capitalisation shows.
"""

from __future__ import annotations

import pytest

from lmpipe.evals.tasks import EXTERNAL_TASKS, Cloze, load_items

# (task, doc, gold, context or contexts, continuation or continuations), from the harness.
HARNESS_ROWS = [
    (
        "arc_easy",
        0,
        0,
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        [
            " Sunlight is the source of energy for nearly all ecosystems.",
            " Most ecosystems are found on land instead of in water.",
            " Carbon dioxide is more available than other gases.",
            " The producers in all ecosystems are plants.",
        ],
    ),
    (
        "arc_easy",
        29,
        1,
        "Question: What causes sound?\nAnswer:",
        [" sunlight", " vibrations", " x-rays", " pitch"],
    ),
    (
        "arc_challenge",
        0,
        2,
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
        [
            " Planetary density will decrease.",
            " Planetary years will become longer.",
            " Planetary days will become shorter.",
            " Planetary gravity will become stronger.",
        ],
    ),
    (
        "arc_challenge",
        553,
        3,
        "Question: Planets orbit\nAnswer:",
        [" Earth.", " the Moon.", " the galaxy.", " the Sun."],
    ),
    (
        "piqa",
        0,
        0,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        [
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.",
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish.",
        ],
    ),
    ("piqa", 1549, 0, "Question: laser\nAnswer:", [" burns face ", " burns air "]),
    (
        "openbookqa",
        0,
        1,
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After looking over their budget and expenses, they decide the best way to save money is to",
        [
            " make more phone calls",
            " quit eating lunch out",
            " buy less with monopoly money",
            " have lunch with friends",
        ],
    ),
    ("openbookqa", 2, 2, "Predators eat", [" lions", " humans", " bunnies", " grass"]),
    (
        "boolq",
        2644,
        1,
        "The season is set for release in 2019.\nQuestion: are they going to make a punisher season 2?\nAnswer:",
        [" no", " yes"],
    ),
    (
        "winogrande",
        0,
        1,
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
        " always got the easier cases.",
    ),
    (
        "winogrande",
        289,
        0,
        [
            "Bobby had to use his pen to finish the exam rather than the pencil because the pen",
            "Bobby had to use his pen to finish the exam rather than the pencil because the pencil",
        ],
        " was full of ink.",
    ),
    (
        "social_iqa",
        0,
        2,
        "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\nA:",
        [" make a new plan", " Go home and see Riley", " Find somewhere to go"],
    ),
    (
        "social_iqa",
        114,
        1,
        "Q: Riley was in pain. How would Riley feel afterwards?\nA:",
        [" aware", " Painful", " Great"],
    ),
    (
        "hellaswag",
        0,
        3,
        "Roof shingle removal: A man is sitting on a roof. He",
        [
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ],
    ),
    (
        "hellaswag",
        3505,
        1,
        "Family Life: How to entertain a toddler. Ask the toddler what he or she would like to do instead of doing what you would like to do.. Visit a site like to find loads of creative activities for toddlers and preschoolers.. Choose small, simple games like candy land or chutes and ladders.",
        [
            " Make sure you get a computer or tablet in case the toddler wants to do some general stuff. And maybe ask to go get a snack or an xbox or wii.",
            " Try some arts and crafts like washable paints, little foamies, crayons, and paper.. Watch the toddler's favorite movie, even if it's barney, and even if he or she has seen it 20 times before.",
            " Make sure the kid you are babysitting is old enough to handle various household chores or housework. Little kids will have a difficult time holding objects and will have precious time learning any new skill.",
            " If you discover that your toddler likes archery or fishing, create activities around these games as well. Alternatively, make small squares and place them around the toddler.",
        ],
    ),
    (
        "lambada_openai",
        0,
        None,
        "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n\"Figured if you're going to be out at night getting hit by cars, you might as well have some backup.\"\n\nI look at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved in a confident grin, I don't care about",
        " signs",
    ),
    (
        "lambada_openai",
        3604,
        None,
        "“Happy to comply,” I said.\n“So, you’re Ben. Ben what?” \n“No, I’m Matt…Matt Casale. I live down the street.”\n“Wasn’t he just calling you ‘Ben’ just now?”\n“No, ‘Bean’—it’s a",
        " nickname",
    ),
]


def harness_requests(context, continuation) -> list[tuple[str, str]]:
    if isinstance(context, str) and isinstance(continuation, str):
        return [(context, continuation)]
    if isinstance(context, str):
        return [(context, c) for c in continuation]
    return [(c, continuation) for c in context]


@pytest.mark.parametrize(
    ("task", "doc", "gold", "context", "continuation"),
    HARNESS_ROWS,
    ids=[f"{row[0]}-{row[1]}" for row in HARNESS_ROWS],
)
def test_requests_are_the_harness_requests(eval_assets, task, doc, gold, context, continuation):
    item = load_items(EXTERNAL_TASKS[task], eval_assets, limit=doc + 1)[doc]
    expected = harness_requests(context, continuation)
    if isinstance(item, Cloze):
        assert [(item.context, item.continuation)] == expected
        return
    assert list(item.requests) == expected
    assert item.gold == gold


def test_every_task_is_pinned():
    # wikitext makes no (context, continuation) requests: its detokenised pages are pinned in
    # tests/evals/test_tasks.py (test_wikitext_detokenizer_follows_the_harness)
    assert {row[0] for row in HARNESS_ROWS} == set(EXTERNAL_TASKS) - {"wikitext"}
