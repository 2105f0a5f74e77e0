"""Rule rewards that read the completion only (never the prompt).

The demo's rewards: exact answers in `\\boxed{}` and a small reward for a well-formed answer.
"""

from __future__ import annotations

import re

from lightrft_mm.rewards import RewardInput, register_reward

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in text, or None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


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
