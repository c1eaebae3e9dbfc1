"""Zero-shot tasks with lm-evaluation-harness's stock prompts, targets and metrics, in plain Python.

A task turns its rows into items; an item is scored through an `LM` (lmpipe.evals.lm):

  - `Choice` (multiple choice): one (context, continuation) request per choice; acc = the gold
    has the largest summed log-likelihood; acc_norm = the same after dividing each by the
    character length of its choice string (the harness divides by `len(choice)`, without the
    leading space of the continuation); the first of equal scores wins (`np.argmax`).
  - `Cloze` (lambada): one request; acc = the continuation is the greedy argmax at every token,
    perplexity = exp(-mean log-likelihood).

Every mean metric carries the harness's `mean_stderr` (sample std / sqrt(n)); perplexity's stderr
is a seeded bootstrap (the harness bootstraps it too, with its own RNG and 100,000 draws).

External tasks read the lm-eval-ready files of a `task_data` folder, one sub-folder per task
(../shared/assets/evals/MANIFEST.md). `continuation` is built from the run's own held-out
documents, so a pipeline without external data still gets a multiple-choice score (chance 25%).
"""

from __future__ import annotations

import bz2
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.dataprep.errors import LmpipeError
from lmpipe.dataprep.folders import is_int
from lmpipe.evals.lm import LM


@dataclass(frozen=True)
class Choice:
    """A multiple-choice item: one request per choice, `choices` for acc_norm's lengths."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Cloze:
    """A single-continuation item (lambada)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Rolling:
    """A whole text scored by rolling log-likelihood (perplexity tasks). Words and bytes are
    counted on `source`, which the harness's wikitext counts before detokenising."""

    text: str
    source: str


Item = Choice | Cloze | Rolling


class BadRow(ValueError):
    """A task row that cannot be scored as it stands (`load_items` names the file and line)."""


def gold_index(value: Any, n_choices: int, field: str, first: int = 0) -> int:
    """The gold choice's 0-based index from a label numbered from `first`: an integer or a string
    of digits, and one of the choices. Anything else (true, 1.7, 5, -1) is refused: the harness
    would score such a row as a wrong answer, or as choice 1, without a word."""
    if is_int(value):
        number = value
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        number = int(value.strip())
    else:
        raise BadRow(f"{field} is {json.dumps(value)}, not an integer label")
    if not first <= number < first + n_choices:
        raise BadRow(
            f"{field} is {json.dumps(value)}, outside the {n_choices} choices "
            f"({first}..{first + n_choices - 1})"
        )
    return number - first


def key_index(labels: Sequence[str], key: Any, n_choices: int, field: str) -> int:
    """The position of an answer key (ARC's "A".."E" or "1".."5") among the choice labels, which
    must name a choice that is there."""
    if not isinstance(key, str) or key.strip() not in labels:
        raise BadRow(f"{field} is {json.dumps(key)}, not one of the labels {', '.join(labels)}")
    index = list(labels).index(key.strip())
    if index >= n_choices:
        raise BadRow(f"{field} is {json.dumps(key)}, a label without a choice ({n_choices} given)")
    return index


def text_field(row: dict[str, Any], field: str) -> str:
    """A row's text field, which its task pastes into a prompt or a choice: a string. A number, a
    list or null is refused here, as the file is read: the harness would paste a number into the
    prompt as text, and a non-string choice fails only while scoring (`len(choice)`)."""
    value = row[field]
    if not isinstance(value, str):
        raise BadRow(f"{field} is {json.dumps(value)}, not a string")
    return value


def text_list(row: dict[str, Any], field: str, subfield: str) -> list[str]:
    """A row's list of strings (ARC's and OpenBookQA's `choices.text`), each checked as
    `text_field` checks one."""
    values = row[field][subfield]
    if not isinstance(values, list):
        raise BadRow(f"{field}.{subfield} is {json.dumps(values)}, not a list of strings")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise BadRow(f"{field}.{subfield}[{i}] is {json.dumps(value)}, not a string")
    return values


def choice_item(context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> Choice:
    """The harness's default multiple-choice requests: (context, delimiter + choice) per choice."""
    return Choice(tuple((context, f"{delimiter}{c}") for c in choices), tuple(choices), gold)


# --- the stock prompts, one function per task (lm_eval/tasks/<task>/*.yaml) -----------------


def arc(row: dict[str, Any]) -> Choice:
    # arc_easy.yaml / arc_challenge.yaml: "Question: {{question}}\nAnswer:", choices.text
    choices = text_list(row, "choices", "text")
    return choice_item(
        f"Question: {text_field(row, 'question')}\nAnswer:",
        choices,
        key_index(row["choices"]["label"], row["answerKey"], len(choices), "answerKey"),
    )


def piqa(row: dict[str, Any]) -> Choice:
    return choice_item(
        f"Question: {text_field(row, 'goal')}\nAnswer:",
        [text_field(row, "sol1"), text_field(row, "sol2")],
        gold_index(row["label"], 2, "label"),
    )


def openbookqa(row: dict[str, Any]) -> Choice:
    # The question stem alone is the context; the answer continues the sentence.
    choices = text_list(row, "choices", "text")
    gold = key_index(row["choices"]["label"], row["answerKey"], len(choices), "answerKey")
    return choice_item(text_field(row, "question_stem"), choices, gold)


def boolq(row: dict[str, Any]) -> Choice:
    return choice_item(
        f"{text_field(row, 'passage')}\nQuestion: {text_field(row, 'question')}?\nAnswer:",
        ["no", "yes"],
        gold_index(row["label"], 2, "label"),
    )


def social_iqa(row: dict[str, Any]) -> Choice:
    # siqa.yaml: "Q: {{context}} {{question}}\nA:", label "1".."3"
    answers = [text_field(row, "answerA"), text_field(row, "answerB"), text_field(row, "answerC")]
    gold = gold_index(row["label"], 3, "label", first=1)
    return choice_item(
        f"Q: {text_field(row, 'context')} {text_field(row, 'question')}\nA:", answers, gold
    )


def winogrande(row: dict[str, Any]) -> Choice:
    """Partial scoring (preprocess_winogrande.py): each option fills the blank inside the
    context, and the model scores the same rest of the sentence after each. Only acc is stock."""
    sentence = text_field(row, "sentence")
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    contexts = [
        sentence[:blank] + text_field(row, "option1"),
        sentence[:blank] + text_field(row, "option2"),
    ]
    # multiple_input: requests are (context + choice, " " + target) with an empty 0-shot context.
    gold = gold_index(row["answer"], 2, "answer", first=1)
    return Choice(tuple((c, f" {rest}") for c in contexts), tuple(contexts), gold)


def hellaswag_preprocess(text: str) -> str:
    """The harness's hellaswag `preprocess`: drop [bracket] tags, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_capitalize_ctx_b(text: str) -> str:
    """Redo the stock `ctx_b.capitalize()` on a joined "label: ctx_a ctx_b" line, where it shows.

    The file's ctx is ctx_a + " " + ctx_b with ctx_b as the dataset has it: in ActivityNet items a
    lower-case sentence start ("the man", "he", "then") after ctx_a's last ". ". The stock query
    capitalises it ("The man"); without this, a third of the validation queries (3,243 of 10,042)
    would differ from the harness's. No such fragment holds a capital letter, so upper-casing its
    first character is all `capitalize()` changes. A ctx_b that starts in upper case cannot be
    told from ctx_a and is left as it is (capitalize() would lower-case the rest of it)."""
    head, sep, tail = text.rpartition(". ")
    if sep and tail[:1].islower():
        return f"{head}{sep}{tail[0].upper()}{tail[1:]}"
    return text


def hellaswag(lines: Sequence[str]) -> Choice:
    """One item from six lines of hellaswag_val_full.txt: "label: ctx", gold, four endings.

    Caveat (MANIFEST.md): the stock task builds the query from ctx_a + " " + ctx_b.capitalize();
    this lossy file only has the joined ctx, after its uploader removed some tags. ctx_b's
    capitalisation is redone where it can be seen (`hellaswag_capitalize_ctx_b`); tags the uploader
    removed differently, and a capitalised ctx_b's lower-cased rest, can still differ."""
    query = hellaswag_preprocess(hellaswag_capitalize_ctx_b(lines[0]))
    endings = [hellaswag_preprocess(e) for e in lines[2:6]]
    return choice_item(query, endings, gold_index(lines[1], len(endings), "the gold line"))


def lambada(row: dict[str, Any]) -> Cloze:
    # lambada_openai.yaml: context = all but the last space-separated word, target " " + last word
    # (output_type loglikelihood: no target delimiter is added).
    words = text_field(row, "text").split(" ")
    return Cloze(" ".join(words[:-1]), " " + words[-1])


# --- the task table ------------------------------------------------------------------------


# WikiText's tokenised form back to plain text, rule by rule in the harness's order (lm-eval's
# wikitext task, version 2): (pattern, replacement, is_regex).
WIKITEXT_RULES: tuple[tuple[str, str, bool], ...] = (
    ("s '", "s'", False),  # plural possessives
    (r"/' [0-9]/", r"/'[0-9]/", True),  # (matches only literal slashes, as in the harness)
    (" @-@ ", "-", False),  # number separators
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    *((f" {p} ", f"{p} ", False) for p in ":;.!?,"),  # punctuation
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),  # brackets and quotes hug their contents
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),  # headings
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def wikitext_detokenize(text: str) -> str:
    for pattern, replacement, is_regex in WIKITEXT_RULES:
        text = (
            re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
        )
    return text


def wikitext(row: dict[str, Any]) -> Rolling:
    page = text_field(row, "page")
    return Rolling(text=wikitext_detokenize(page), source=page)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str  # relative to task_data
    build: Callable[[Any], Item]
    metrics: tuple[str, ...]  # what the stock task reports


EXTERNAL_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_easy", "arc_easy/test.jsonl", arc, ("acc", "acc_norm")),
        TaskSpec("arc_challenge", "arc_challenge/test.jsonl", arc, ("acc", "acc_norm")),
        TaskSpec("piqa", "piqa/validation.jsonl", piqa, ("acc", "acc_norm")),
        TaskSpec("openbookqa", "openbookqa/test.jsonl", openbookqa, ("acc", "acc_norm")),
        TaskSpec("boolq", "boolq/validation.jsonl", boolq, ("acc",)),
        TaskSpec("winogrande", "winogrande/validation.jsonl", winogrande, ("acc",)),
        TaskSpec("social_iqa", "social_iqa/validation.jsonl", social_iqa, ("acc",)),
        TaskSpec(
            "hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", hellaswag, ("acc", "acc_norm")
        ),
        TaskSpec(
            "lambada_openai", "lambada_openai/lambada_test.jsonl", lambada, ("perplexity", "acc")
        ),
        TaskSpec(
            "wikitext",
            "wikitext/wikitext-2-raw-v1_test_pages.jsonl",
            wikitext,
            ("word_perplexity", "byte_perplexity", "bits_per_byte"),
        ),
    )
}


def load_items(spec: TaskSpec, task_data: Path, limit: int | None = None) -> list[Item]:
    """The first `limit` items of a task (the harness's --limit takes the first documents too)."""
    path = Path(task_data) / spec.path
    if not path.is_file():
        raise LmpipeError(
            f"{path}: no such file (task {spec.name} reads {spec.path} under --task-data)"
        )
    items: list[Item] = []
    if path.name.endswith(".txt.bz2"):
        try:
            with bz2.open(path, "rb") as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise LmpipeError(f"{path}: not bz2-compressed UTF-8 text ({e})") from None
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise LmpipeError(f"{path}: {len(lines)} lines, not a whole number of 6-line items")
        for start in range(0, len(lines), 6):
            if limit is not None and len(items) >= limit:
                break
            items.append(_build(spec, lines[start : start + 6], path, start + 2))
        return items
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LmpipeError(f"{path}:{lineno}: not a JSON line ({e})") from None
            items.append(_build(spec, row, path, lineno))
    return items


def _build(spec: TaskSpec, row: Any, path: Path, lineno: int) -> Item:
    """One item, or an error naming the file and line of a row the task cannot score."""
    try:
        return spec.build(row)
    except BadRow as e:
        raise LmpipeError(f"{path}:{lineno}: {e}") from None
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise LmpipeError(
            f"{path}:{lineno}: not a {spec.name} row ({type(e).__name__}: {e})"
        ) from None


# --- the held-out continuation task --------------------------------------------------------

_WORD = re.compile(r"\S+")


def continuation_items(
    texts: Sequence[str],
    *,
    seed: int = 0,
    chunk_words: int = 20,
    min_context_words: int = 16,
    max_context_words: int = 128,
    n_choices: int = 4,
    limit: int | None = None,
) -> list[Choice]:
    """Multiple-choice items from held-out documents: which chunk continues this text?

    For each document with at least min_context_words + chunk_words words: a seeded cut point after
    between min_context_words and max_context_words words; context = the document's text up to
    there (its own whitespace), gold = the next chunk_words words; distractors = chunk_words
    consecutive words at seeded places of other documents. Every choice is its words joined by
    single spaces, so their form gives nothing away. The gold's position is seeded too. Same
    texts and seed, same items.
    """
    rng = random.Random(seed)
    spans = [[(m.start(), m.end()) for m in _WORD.finditer(t)] for t in texts]
    words = [[t[a:b] for a, b in s] for t, s in zip(texts, spans, strict=True)]
    eligible = [i for i, w in enumerate(words) if len(w) >= min_context_words + chunk_words]
    pool = [i for i, w in enumerate(words) if len(w) >= chunk_words]
    items: list[Choice] = []
    for i in eligible:
        if limit is not None and len(items) >= limit:
            break
        if not any(j != i for j in pool[:2]):  # no other document to take distractors from
            break
        cut = rng.randint(min_context_words, min(max_context_words, len(words[i]) - chunk_words))
        context = texts[i][: spans[i][cut - 1][1]]
        gold = " ".join(words[i][cut : cut + chunk_words])
        distractors: list[str] = []
        for _ in range(50 * n_choices):  # a few retries when chunks repeat (boilerplate text)
            if len(distractors) == n_choices - 1:
                break
            j = rng.choice(pool)
            if j == i:
                continue
            start = rng.randint(0, len(words[j]) - chunk_words)
            chunk = " ".join(words[j][start : start + chunk_words])
            if chunk != gold and chunk not in distractors:
                distractors.append(chunk)
        if len(distractors) < n_choices - 1:
            continue
        position = rng.randrange(n_choices)
        choices = distractors[:position] + [gold] + distractors[position:]
        items.append(choice_item(context, choices, position))
    return items


# --- scoring -------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> float | None:
    """The harness's mean_stderr: sample standard deviation / sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def bootstrap_perplexity_stderr(
    lls: Sequence[float], iters: int = 1000, seed: int = 0
) -> float | None:
    if len(lls) < 2:
        return None
    rng = np.random.default_rng(seed)
    arr = np.asarray(lls, dtype=np.float64)
    samples = arr[rng.integers(0, len(arr), size=(iters, len(arr)))]
    return float(np.std(np.exp(-samples.mean(axis=1)), ddof=1))


def metric(value: float, stderr: float | None) -> dict[str, float | None]:
    return {"value": value, "stderr": stderr}


def score_choice(lm: LM, items: Sequence[Choice]) -> dict[str, Any]:
    """acc and acc_norm of multiple-choice items, all requests sent in one call (one batched pass)."""
    requests = [r for item in items for r in item.requests]
    results = lm.loglikelihood(requests)
    acc, acc_norm = [], []
    pos = 0
    for item in items:
        lls = np.array([ll for ll, _ in results[pos : pos + len(item.requests)]], dtype=np.float64)
        pos += len(item.requests)
        lengths = np.array([float(len(c)) for c in item.choices])
        acc.append(1.0 if int(np.argmax(lls)) == item.gold else 0.0)
        # An empty choice ("" in a row) has length 0: the harness 0.4.13 scores it too, as ll / 0
        # (-inf, so never picked unless all are), with numpy's divide-by-zero warning; the same
        # numbers here, without the warning in the middle of the progress bars.
        with np.errstate(divide="ignore", invalid="ignore"):
            normed = lls / lengths
        acc_norm.append(1.0 if int(np.argmax(normed)) == item.gold else 0.0)
    return {
        "acc": metric(float(np.mean(acc)) if acc else float("nan"), mean_stderr(acc)),
        "acc_norm": metric(
            float(np.mean(acc_norm)) if acc_norm else float("nan"), mean_stderr(acc_norm)
        ),
        "n": len(items),
    }


def score_cloze(lm: LM, items: Sequence[Cloze]) -> dict[str, Any]:
    results = lm.loglikelihood([(it.context, it.continuation) for it in items])
    lls = [ll for ll, _ in results]
    acc = [1.0 if greedy else 0.0 for _, greedy in results]
    return {
        "perplexity": metric(
            math.exp(-sum(lls) / len(lls)) if lls else float("nan"),
            bootstrap_perplexity_stderr(lls),
        ),
        "acc": metric(float(np.mean(acc)) if acc else float("nan"), mean_stderr(acc)),
        "n": len(items),
    }


def score_items(
    lm: LM, items: Sequence[Item], metrics: Sequence[str] | None = None
) -> dict[str, Any]:
    """Score a task's items; keep the stock task's metrics (all computed ones if None)."""
    if items and isinstance(items[0], Rolling):
        scores = score_rolling(lm, items)  # type: ignore[arg-type]
    elif items and isinstance(items[0], Cloze):
        scores = score_cloze(lm, items)  # type: ignore[arg-type]
    else:
        scores = score_choice(lm, items)  # type: ignore[arg-type]
    if metrics is not None:
        scores = {k: v for k, v in scores.items() if k in metrics or k == "n"}
    return scores


def score_rolling(lm: LM, items: Sequence[Rolling]) -> dict[str, Any]:
    """Word and byte perplexity and bits per byte of whole texts (lm-eval's wikitext metrics)."""
    from lmpipe.evals.perplexity import count_words, perplexity_metrics

    lls = lm.loglikelihood_rolling([item.text for item in items])
    words = sum(count_words(item.source) for item in items)
    n_bytes = sum(len(item.source.encode("utf-8")) for item in items)
    return perplexity_metrics(lls, [], words, n_bytes)
