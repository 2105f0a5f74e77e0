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


@dataclass
class ScoredBatch:
    """Rewards of one rollout batch, as the trainer consumes them.

    Attributes:
        rewards: [B, n] weighted totals (0.0 where `valid` is False).
        valid: [B, n] False where every reward said None (not applicable): such completions
            are left out of the loss.
        metrics: logged every step (`reward/mean`, `reward/<name>`, `reward/errors`, ...).
    """

    rewards: "torch.Tensor"
    valid: "torch.Tensor"
    metrics: dict[str, float]


def score_rewards(fns: Sequence[tuple[str, RewardFn, float]], inputs: list[RewardInput], n: int) -> ScoredBatch:
    """Score a group-major batch of B * n completions with every reward (see `combine`)."""
    import torch

    totals, parts, errors = combine(fns, inputs)
    rewards = torch.tensor(totals, dtype=torch.float32).view(-1, n)
    valid = torch.tensor([any(vals[i] is not None for vals in parts.values()) for i in range(len(inputs))],
                         dtype=torch.bool).view(-1, n)
    metrics = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
               **{f"reward/{k}": float(sum(v for v in vals if v is not None) / max(sum(v is not None for v in vals), 1))
                  for k, vals in parts.items()},
               "reward/errors": sum(errors.values()), "reward/invalid": int((~valid).sum())}
    return ScoredBatch(rewards, valid, metrics)


def resolve(specs) -> list[tuple[str, RewardFn, float]]:
    """Config `rewards:` entries -> (metric name, callable, weight).

    A reward given as "module:function" or "file.py:function" is logged as "function".
    """
    return [(spec.name.rsplit(":", 1)[-1], REWARDS.get(spec.name), spec.weight) for spec in specs]


# Built-ins are imported for their registration side effect.
from lightrft_mm.rewards import rules  # noqa: E402,F401
