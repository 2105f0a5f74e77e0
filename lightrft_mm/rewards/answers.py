"""Answer checkers that read the completion only (never the prompt): math_accuracy,
choice_accuracy and geo3k.

The final answer is the last `\\boxed{}` of the completion or, without one, what follows its last
"answer is" / "answer:". Choice letters and values are interchangeable through `Sample.choices`
(Geo3K: `\\boxed{C}` with choices `["24", "36", "48", "60"]` means 48).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from lightrft_mm.rewards import RewardInput, register_reward
from lightrft_mm.rewards.rules import is_think_format, last_boxed

_FINAL = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\s*[.:]?$")


def final_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the rest of the line after the last "answer is"/"answer:"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    found = _FINAL.findall(text)
    if not found:
        return None
    answer = found[-1].strip().rstrip(" .$").lstrip(" $")
    return answer or None


def _norm(value: Any) -> str:
    return " ".join(str(value).strip().strip("$").lower().split())


def choice_index(text: str, choices: list | None) -> int | None:
    """Index of the choice that `text` names: by value (case- and space-insensitive), or by
    its letter (`C`, `(C)`, `C.`); None if it names none."""
    if not choices:
        return None
    values = [_norm(c) for c in choices]
    key = _norm(text)
    if key in values:
        return values.index(key)
    m = _LETTER.match(text.strip())
    if m:
        i = ord(m.group(1).upper()) - ord("A")
        if 0 <= i < len(choices):
            return i
    return None


def _as_value(text: str, choices: list | None) -> str:
    """A choice letter becomes the choice's value; anything else is kept."""
    i = choice_index(text, choices)
    return str(choices[i]) if i is not None else text


@functools.lru_cache(maxsize=1)
def _math_verify():
    try:
        import math_verify
    except ImportError as exc:  # pragma: no cover - a declared dependency
        from lightrft_mm.errors import RewardError

        raise RewardError("math_accuracy needs the math-verify package. Fix: pip install math-verify") from exc
    # We pass no signal-based timeouts (rewards may run in worker threads; the reward's own
    # `timeout` bounds the time instead), so silence math-verify's warning about that.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parsed(text: str):
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return mv.parse(f"${text}$", extraction_config=config, parsing_timeout=None)


def math_equal(pred: str, gold: str) -> bool:
    """True when pred and gold are the same answer: equal as text, or as math (math-verify:
    `\\frac{1}{2}` = `0.5` = `1/2`, `2\\sqrt{3}` = `\\sqrt{12}`). Answers without digits or LaTeX
    are compared as text only."""
    if _norm(pred) == _norm(gold):
        return True
    if not re.search(r"[\d\\]", gold):  # a word answer ("red"): text only, "der" is not r*e*d
        return False
    gold_parsed, pred_parsed = _parsed(gold), _parsed(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _accuracy(x: RewardInput) -> float | None:
    answer, choices = x.sample.answer, x.sample.choices
    if answer is None:
        return None
    pred = final_answer(x.completion)
    if pred is None:
        return 0.0
    return float(math_equal(_as_value(pred, choices), _as_value(str(answer), choices)))


@register_reward("math_accuracy", batched=False)
def math_accuracy(x: RewardInput) -> float | None:
    """1.0 when the final answer (last `\\boxed{}`, else after "answer is") equals the Sample's
    answer as math (math-verify) or text; choice letters count as their values. None without an
    answer."""
    return _accuracy(x)


@register_reward("choice_accuracy", batched=False)
def choice_accuracy(x: RewardInput) -> float | None:
    """1.0 when the final answer names the answer's choice (by letter or by value), else 0.0.
    None for samples without choices or whose answer is not one of them."""
    gold = choice_index(str(x.sample.answer), x.sample.choices) if x.sample.answer is not None else None
    if gold is None:
        return None
    pred = final_answer(x.completion)
    return float(pred is not None and choice_index(pred, x.sample.choices) == gold)


@register_reward("geo3k", batched=False)
def geo3k(x: RewardInput) -> dict | None:
    """0.9 * math_accuracy + 0.1 * think_format, as in public Geo3K recipes; logs both parts
    (`reward/geo3k.accuracy`, `reward/geo3k.format`). None without an answer."""
    accuracy = _accuracy(x)
    if accuracy is None:
        return None
    fmt = float(is_think_format(x.completion))
    return {"score": 0.9 * accuracy + 0.1 * fmt, "accuracy": accuracy, "format": fmt}
