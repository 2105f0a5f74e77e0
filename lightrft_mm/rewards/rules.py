"""Rule rewards that read the completion only (never the prompt).

exact_match and boxed_format (the demo's), think_format (the R1 `<think>...</think>` then
`\\boxed{}` layout), overlong (DAPO's soft overlong penalty), repetition (repeated n-grams) and
iou (boxes, for grounding).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from lightrft_mm.errors import RewardError
from lightrft_mm.rewards import RewardInput, register_reward
from lightrft_mm.rewards.core import reward_options

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested braces allowed), stripped, or None."""
    found = None
    for match in _BOX_OPEN.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:pos]
                    break
    return found.strip() if found is not None else None


def _norm(value) -> str:
    return " ".join(str(value).strip().lower().split())


@register_reward("exact_match")
def exact_match(inputs: list[RewardInput]) -> list[float | None]:
    """1.0 when the last `\\boxed{}` (or, without one, the whole completion) equals the answer.

    Case and surrounding space are ignored. None for samples without an answer.
    """
    scores: list[float | None] = []
    for x in inputs:
        if x.sample.answer is None:
            scores.append(None)
            continue
        boxed = last_boxed(x.completion)
        given = boxed if boxed is not None else x.completion
        scores.append(float(_norm(given) == _norm(x.sample.answer)))
    return scores


@register_reward("boxed_format")
def boxed_format(inputs: list[RewardInput]) -> list[float]:
    """1.0 when the completion is exactly one `\\boxed{...}` holding one of the sample's choices
    (any non-empty content when the sample has no choices), else 0.0."""
    scores = []
    for x in inputs:
        m = _BOXED.fullmatch(x.completion.strip())
        ok = m is not None and bool(m.group(1).strip())
        if ok and x.sample.choices:
            ok = _norm(m.group(1)) in {_norm(c) for c in x.sample.choices}
        scores.append(float(ok))
    return scores


def is_think_format(text: str) -> bool:
    """`<think>...</think>` first (one pair), then a non-empty `\\boxed{}` after it."""
    body = text.strip()
    if not body.startswith("<think>") or body.count("<think>") != 1 or body.count("</think>") != 1:
        return False
    after = body.split("</think>", 1)[1]
    return bool(last_boxed(after))


@register_reward("think_format", batched=False)
def think_format(x: RewardInput) -> float:
    """1.0 for `<think>reasoning</think>` followed by an answer in `\\boxed{}`, else 0.0
    (the format reward of public Geo3K / R1-style recipes)."""
    return float(is_think_format(x.completion))


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong penalty: 0 up to max_length - buffer, then linear down to -1 at
    max_length, -1 beyond."""
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return (max_length - buffer - length) / buffer
    return -1.0


@register_reward("overlong", factory=True)
def overlong(max_length: int, buffer: int | None = None) -> Callable:
    """Soft overlong penalty on the completion's token count (DAPO, Yu et al. 2025).

    Args:
        max_length: the longest completion, in tokens (usually rollout.max_new_tokens).
        buffer: the penalty ramps from 0 at max_length - buffer to -1 at max_length
            (default: a fifth of max_length).

    The reward is None for inputs without token ids (e.g. `rewards score` rows without
    `completion_ids`).
    """
    buffer = max(1, max_length // 5) if buffer is None else buffer
    if not isinstance(max_length, int) or max_length < 1 or not isinstance(buffer, int) or not 0 < buffer <= max_length:
        raise RewardError(f"overlong: needs whole numbers 0 < buffer <= max_length, got max_length={max_length!r}, "
                          f"buffer={buffer!r}. Fix: e.g. args: {{max_length: 64, buffer: 16}}.")

    @reward_options(batched=False)
    def score(x: RewardInput) -> float | None:
        if not x.completion_ids:
            return None
        return overlong_penalty(len(x.completion_ids), max_length, buffer)

    return score


@register_reward("repetition", factory=True)
def repetition(ngram: int = 3, max_penalty: float = 1.0) -> Callable:
    """Penalty for repeated word n-grams: -max_penalty * (1 - distinct n-grams / n-grams).

    Args:
        ngram: n-gram length, in whitespace-separated words.
        max_penalty: the penalty of a completion that repeats one n-gram throughout.

    0.0 for completions shorter than one n-gram.
    """
    if not isinstance(ngram, int) or ngram < 1 or max_penalty < 0:
        raise RewardError(f"repetition: needs ngram >= 1 and max_penalty >= 0, got ngram={ngram!r}, "
                          f"max_penalty={max_penalty!r}.")

    @reward_options(batched=False)
    def score(x: RewardInput) -> float:
        words = x.completion.split()
        grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        if not grams:
            return 0.0
        return -max_penalty * (1.0 - len(set(grams)) / len(grams))

    return score


_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX4 = re.compile(rf"[\[(]\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*[\])]")
_BOX2x2 = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The last box `[x1, y1, x2, y2]` (or `(x1, y1), (x2, y2)`) in text, or None.

    A `\\boxed{}` answer, when present, is searched first.
    """
    for where in (last_boxed(text), text):
        if not where:
            continue
        matches = [(m.start(), m.groups()) for m in _BOX4.finditer(where)]
        matches += [(m.start(), m.groups()) for m in _BOX2x2.finditer(where)]
        if matches:
            return tuple(float(v) for v in max(matches)[1])
    return None


def box_iou(a, b) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes (0 for empty boxes)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _gold_boxes(answer: Any) -> list[tuple[float, ...]]:
    if isinstance(answer, str):
        box = parse_box(answer)
        return [box] if box else []
    if isinstance(answer, (list, tuple)) and len(answer) == 4 and all(isinstance(v, (int, float)) for v in answer):
        return [tuple(float(v) for v in answer)]
    if isinstance(answer, (list, tuple)):
        return [b for item in answer for b in _gold_boxes(item)]
    return []


@register_reward("iou", batched=False)
def iou(x: RewardInput) -> float | None:
    """IoU of the completion's last box with the answer box (the best of several answer boxes).

    The answer is `[x1, y1, x2, y2]`, a list of such boxes, or a string holding one. None for
    samples without an answer box; 0.0 when the completion holds no box.
    """
    gold = _gold_boxes(x.sample.answer)
    if not gold:
        return None
    box = parse_box(x.completion)
    return 0.0 if box is None else max(box_iou(box, g) for g in gold)
