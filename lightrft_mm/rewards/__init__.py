"""Rewards: one registry, a `RewardInput` that carries the whole Sample, routing and combination.

A reward is a callable `(inputs: list[RewardInput]) -> list[float | None]` (batched) or
`(input: RewardInput) -> float | None` (per-sample); either may be `async def` and may return
`{"score": ..., "<sub>": ...}` with named sub-scores. `None` means "not applicable". Four ways
to make one usable in a config, all resolved by `REWARDS`:

1. `@register_reward("name")` in a module that is imported;
2. `name: package.module:function`;
3. `name: path/to/file.py:function`;
4. an entry point in group `lightrft_mm.rewards` of an installed package
   (`[project.entry-points."lightrft_mm.rewards"] my_reward = "my_pkg.rewards:my_reward"`).

Built-ins: rules (`rules.py`: exact_match, boxed_format, think_format, overlong, repetition,
iou), answer checkers (`answers.py`: math_accuracy, choice_accuracy, geo3k), reward models
(`models.py`: scalar_rm; `judge.py`: generative_rm) and `remote.py`: remote_rm.
"""

from __future__ import annotations

from typing import Any, Callable

from lightrft_mm.registry import Registry

REWARDS = Registry("reward", entry_point_group="lightrft_mm.rewards")


def register_reward(name: str | Callable | None = None, *, batched: bool = True, factory: bool = False) -> Any:
    """Decorator: registers a reward (or a reward factory) under `name`.

    Args:
        name: the config name (case-insensitive, `-` = `_`); default: the function's name.
        batched: True: called with the list of inputs; False: once per input.
        factory: the function takes the config entry's `args` as keyword arguments and returns
            the reward (e.g. a reward model).
    """
    from lightrft_mm.rewards.core import reward_options

    if callable(name) and not isinstance(name, str):  # bare @register_reward
        return REWARDS.register(obj=reward_options(name))

    def decorate(fn: Any) -> Any:
        return REWARDS.register(name, obj=reward_options(fn, batched=batched, factory=factory))

    return decorate


from lightrft_mm.rewards.core import (Outcome, Reward, RewardInput, RewardOptions, make_reward,  # noqa: E402
                                      options_of, prompt_messages, reward_options, run_reward)
from lightrft_mm.rewards.scoring import (COMBINE_MODES, RewardSet, ScoredBatch, Scores,  # noqa: E402
                                         build_reward_set, check_routing, combine, config_problems, score,
                                         score_rewards)

RewardFn = Callable[[list[RewardInput]], list]

# Built-ins. Rules register on import (they import nothing heavy); model and remote rewards
# are lazy so torch / transformers load only when a config names them.
from lightrft_mm.rewards import answers, rules  # noqa: E402,F401

REWARDS.register_lazy("scalar_rm", "lightrft_mm.rewards.models:scalar_rm")
REWARDS.register_lazy("generative_rm", "lightrft_mm.rewards.judge:generative_rm")
REWARDS.register_lazy("remote_rm", "lightrft_mm.rewards.remote:remote_rm")

__all__ = ["COMBINE_MODES", "REWARDS", "Outcome", "Reward", "RewardFn", "RewardInput", "RewardOptions", "RewardSet",
           "ScoredBatch", "Scores", "build_reward_set", "check_routing", "combine", "config_problems",
           "make_reward", "options_of", "prompt_messages", "register_reward", "reward_options", "run_reward",
           "score", "score_rewards"]
