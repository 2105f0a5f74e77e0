"""Rewards: one registry, a `RewardInput` that carries the whole Sample, weighted combination.

A reward is a callable `(inputs: list[RewardInput]) -> list[float | None]`; `None` means "not
applicable to that sample". Register one with `@register_reward("name")`, or name it in a
config as `package.module:function` or `path/to/file.py:function`, or ship it in an installed
package under the entry-point group `lightrft_mm.rewards`.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

from lightrft_mm.errors import RewardError
from lightrft_mm.registry import Registry
from lightrft_mm.schema import Sample

log = logging.getLogger(__name__)

REWARDS = Registry("reward", entry_point_group="lightrft_mm.rewards")


def register_reward(name: str | None = None):
    """Decorator: `@register_reward("my_reward")` makes `name: my_reward` usable in configs."""
    return REWARDS.register(name)


@dataclass(frozen=True)
class RewardInput:
    """What a reward sees for one completion.

    Attributes:
        completion: the generated text (special tokens removed).
        completion_ids: the generated token ids.
        sample: the whole Sample: messages with media references, answer, choices, source, meta.
        group: index of the prompt in the step's batch (completions of one prompt share it).
    """

    completion: str
    completion_ids: tuple[int, ...]
    sample: Sample
    group: int


RewardFn = Callable[[list[RewardInput]], list]


def combine(fns: Sequence[tuple[str, RewardFn, float]], inputs: list[RewardInput]
            ) -> tuple[list[float], dict[str, list[float | None]], dict[str, int]]:
    """Score every input with every reward and sum them by weight.

    A reward that raises, returns the wrong number of values or a non-finite value gives
    `None` for the affected inputs and is counted in `errors`; it does not stop training.
    `None` (not applicable) contributes nothing to the sum.

    Returns:
        (total per input, per-reward values, per-reward error counts).
    """
    totals = [0.0] * len(inputs)
    parts: dict[str, list[float | None]] = {}
    errors: dict[str, int] = {}
    for name, fn, weight in fns:
        try:
            values = list(fn(inputs))
            if len(values) != len(inputs):
                raise RewardError(f"reward {name!r} returned {len(values)} values for {len(inputs)} inputs")
        except Exception as e:  # noqa: BLE001 - a broken reward must not kill the run
            log.warning("reward %r failed on %d inputs: %s", name, len(inputs), e)
            values = [None] * len(inputs)
            errors[name] = errors.get(name, 0) + len(inputs)
        clean: list[float | None] = []
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                errors[name] = errors.get(name, 0) + 1
                v = None
            clean.append(None if v is None else float(v))  # numpy scalars become floats
            if v is not None:
                totals[i] += weight * float(v)
        parts[name] = clean
    return totals, parts, errors


def resolve(specs) -> list[tuple[str, RewardFn, float]]:
    """Config `rewards:` entries -> (metric name, callable, weight).

    A reward given as "module:function" or "file.py:function" is logged as "function".
    """
    return [(spec.name.rsplit(":", 1)[-1], REWARDS.get(spec.name), spec.weight) for spec in specs]


# Built-ins are imported for their registration side effect.
from lightrft_mm.rewards import rules  # noqa: E402,F401
