"""Several rewards at once: routing by source, weights, the two combine modes, metrics.

`score` runs every reward of a `RewardSet` on the inputs routed to it (`Reward.sources`);
`score_rewards` combines them into the `[B, n]` rewards the trainer consumes:

- `sum_then_normalize`: the weighted sum of the raw rewards (the algorithm normalises it within
  each group afterwards, as GRPO does).
- `normalize_then_sum`: each reward is first normalised within each group over the completions
  it scored (`(r - mean) / std`, 0 where the group's std is 0 or it has one score), then the
  weighted sum is taken: a reward with a large range cannot drown a small one (GDPO).

`None` contributes nothing to a sum; a completion that every applicable reward scored `None` is
marked invalid (left out of the loss) and counted in `reward/invalid`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from lightrft_mm.errors import ConfigError, RegistryError, RewardError, did_you_mean
from lightrft_mm.rewards.core import (ERROR, SKIP, TIMEOUT, Outcome, Reward, RewardInput, factory_arg_problems,
                                      label_of, make_reward, options_of, run_reward)

if TYPE_CHECKING:  # torch is imported where the tensors are made
    import torch

COMBINE_MODES = ("sum_then_normalize", "normalize_then_sum")


@dataclass
class RewardSet:
    """The rewards of a run and how they are combined.

    Attributes:
        rewards: the rewards, in config order.
        combine: "sum_then_normalize" or "normalize_then_sum" (see the module docstring).
        fail_fast: raise `RewardError` on the first reward that raises, hangs or returns a bad
            value, instead of scoring None and counting it.
    """

    rewards: list[Reward] = field(default_factory=list)
    combine: str = "sum_then_normalize"
    fail_fast: bool = False

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ConfigError(f"scoring.combine: {self.combine!r} is not one of {', '.join(COMBINE_MODES)}."
                              f"{did_you_mean(self.combine, COMBINE_MODES)}")

    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def including(self, name: str) -> RewardSet:
        """This set plus reward `name` with weight 0 (labelled `name`) if no reward is labelled so."""
        if name in self.names():
            return self
        extra = make_reward(_Spec(name=name, weight=0.0), where="trainer.accuracy_reward")
        extra.name = name
        return dataclasses.replace(self, rewards=self.rewards + [extra])


@dataclass(frozen=True)
class _Spec:
    """A RewardSpec stand-in for rewards named outside the `rewards:` list."""

    name: str
    weight: float = 1.0
    sources: tuple = ()
    timeout: float = 0.0
    args: dict = field(default_factory=dict)
    label: str = ""


def build_reward_set(specs: Sequence[Any], scoring: Any = None) -> RewardSet:
    """Config `rewards:` entries (and the `scoring:` section) -> a RewardSet.

    Factories (reward models, remote rewards) are built here, once.
    """
    rewards = [make_reward(spec, where=f"rewards[{i}]") for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for i, reward in enumerate(rewards):
        if reward.name in seen:
            raise ConfigError(f"rewards[{i}]: metric name {reward.name!r} is taken by rewards[{seen[reward.name]}]. "
                              f"Fix: set rewards[{i}].label to another name.")
        seen[reward.name] = i
    if scoring is None:
        return RewardSet(rewards)
    return RewardSet(rewards, combine=scoring.combine, fail_fast=scoring.fail_fast)


def as_reward_set(rewards: RewardSet | Sequence[tuple]) -> RewardSet:
    """A RewardSet, or `[(name, fn, weight), ...]` (no routing, no timeout) made into one."""
    if isinstance(rewards, RewardSet):
        return rewards
    return RewardSet([Reward(name, fn, float(weight), batched=options_of(fn).batched, where=name)
                      for name, fn, weight in rewards])


@dataclass
class Scores:
    """Every reward on one batch: per-reward outcomes, raw weighted totals and the valid mask."""

    outcomes: dict[str, Outcome]
    totals: list[float]
    valid: list[bool]


def score(rewards: RewardSet | Sequence[tuple], inputs: list[RewardInput]) -> Scores:
    """Runs every reward on the inputs routed to it; raw weighted sums and the valid mask."""
    reward_set = as_reward_set(rewards)
    outcomes = {r.name: run_reward(r, inputs, fail_fast=reward_set.fail_fast) for r in reward_set.rewards}
    totals = [0.0] * len(inputs)
    valid = [False] * len(inputs)
    for reward in reward_set.rewards:
        for i, value in enumerate(outcomes[reward.name].values):
            if value is not None:
                totals[i] += reward.weight * value
                valid[i] = True
    return Scores(outcomes, totals, valid)


def combine(rewards: RewardSet | Sequence[tuple], inputs: list[RewardInput]
            ) -> tuple[list[float], dict[str, list[float | None]], dict[str, int]]:
    """Raw weighted sums (used by evaluation): (totals, per-reward values, per-reward failures).

    A reward that raises, times out or returns a bad value gives None for the affected inputs
    and is counted in the failures; None contributes nothing to a total.
    """
    scores = score(rewards, inputs)
    errors = {name: o.count(ERROR) + o.count(TIMEOUT) for name, o in scores.outcomes.items()}
    return (scores.totals, {name: o.values for name, o in scores.outcomes.items()},
            {name: count for name, count in errors.items() if count})


@dataclass
class ScoredBatch:
    """Rewards of one rollout batch, as the trainer consumes them.

    Attributes:
        rewards: [B, n] combined rewards (0.0 where `valid` is False).
        valid: [B, n] False where every reward said None (not applicable): such completions
            are left out of the loss.
        metrics: logged every step (`reward/mean`, `reward/<name>`, `reward/<name>/std`, ...).
        outcomes: per-reward values and statuses of the [B * n] completions (group-major).
    """

    rewards: "torch.Tensor"
    valid: "torch.Tensor"
    metrics: dict[str, float]
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def score_rewards(rewards: RewardSet | Sequence[tuple], inputs: list[RewardInput], n: int) -> ScoredBatch:
    """Scores a group-major batch of B * n completions with every reward and combines them."""
    import torch

    reward_set = as_reward_set(rewards)
    if len(inputs) % n:
        raise RewardError(f"score_rewards: {len(inputs)} completions is not a whole number of groups of {n}")
    scores = score(reward_set, inputs)
    totals = combined_totals(reward_set, scores, [x.group for x in inputs])
    valid = torch.tensor(scores.valid, dtype=torch.bool).view(-1, n)
    values = torch.tensor([t if ok else 0.0 for t, ok in zip(totals, scores.valid)], dtype=torch.float32)
    return ScoredBatch(values.view(-1, n), valid, reward_metrics(reward_set, scores), scores.outcomes)


def combined_totals(reward_set: RewardSet, scores: Scores, groups: Sequence[int]) -> list[float]:
    """The combined reward of each input under `reward_set.combine` (see the module docstring)."""
    if reward_set.combine == "sum_then_normalize":
        return list(scores.totals)
    totals = [0.0] * len(groups)
    for reward in reward_set.rewards:
        values = scores.outcomes[reward.name].values
        members: dict[int, list[int]] = {}
        for i, (g, v) in enumerate(zip(groups, values)):
            if v is not None:
                members.setdefault(g, []).append(i)
        for idx in members.values():
            group_values = [values[i] for i in idx]
            if len(idx) < 2:
                continue
            mean, std = statistics.fmean(group_values), statistics.stdev(group_values)
            if std <= 1e-12:
                continue
            for i in idx:
                totals[i] += reward.weight * (values[i] - mean) / (std + 1e-6)
    return totals


def reward_metrics(reward_set: RewardSet, scores: Scores) -> dict[str, float]:
    """Per-step metrics: the combined raw reward and, per reward, its statistics.

    `reward/mean` and `reward/std` are over valid completions of the raw weighted sum (in both
    combine modes, so curves stay comparable). Per reward: `reward/<name>` (mean of its
    scores), `/std`, `/none_rate` (share of the completions routed to it that got None),
    `/errors`, `/timeouts`, `/time` (seconds), `/routed`; sub-scores as `reward/<name>.<sub>`.
    """
    valid_totals = [t for t, ok in zip(scores.totals, scores.valid) if ok]
    metrics: dict[str, float] = {
        "reward/mean": statistics.fmean(valid_totals) if valid_totals else 0.0,
        "reward/std": statistics.pstdev(valid_totals) if len(valid_totals) > 1 else 0.0,
        "reward/invalid": sum(not ok for ok in scores.valid),
        "reward/errors": sum(o.count(ERROR) for o in scores.outcomes.values()),
        "reward/timeouts": sum(o.count(TIMEOUT) for o in scores.outcomes.values()),
    }
    for name, outcome in scores.outcomes.items():
        routed = len(outcome.status) - outcome.count(SKIP)
        got = [v for v in outcome.values if v is not None]
        if got:
            metrics[f"reward/{name}"] = statistics.fmean(got)
            metrics[f"reward/{name}/std"] = statistics.pstdev(got) if len(got) > 1 else 0.0
        if routed:
            metrics[f"reward/{name}/none_rate"] = 1.0 - len(got) / routed
        metrics[f"reward/{name}/routed"] = routed
        metrics[f"reward/{name}/errors"] = outcome.count(ERROR)
        metrics[f"reward/{name}/timeouts"] = outcome.count(TIMEOUT)
        metrics[f"reward/{name}/time"] = outcome.seconds
        for sub, values in outcome.subs.items():
            sub_got = [v for v in values if v is not None]
            if sub_got:
                metrics[f"reward/{name}.{sub}"] = statistics.fmean(sub_got)
    return metrics


# --- checks before a run ------------------------------------------------------------------------

@dataclass
class PluginCheck:
    """How config checks treat reward plugins (`file.py:fn`, `module:fn`, entry points).

    Attributes:
        imported: True: imported (their module code runs) and fully checked, args included.
            False: located without running their code (see `Registry.locate`); args unchecked.
        names: the plugin names the checks met, in order.
    """

    imported: bool
    names: list[str] = field(default_factory=list)


_PLUGIN_CHECK: contextvars.ContextVar[PluginCheck | None] = contextvars.ContextVar("plugin_check", default=None)
_NOT_IMPORTED = object()  # a plugin found without importing it


@contextlib.contextmanager
def plugin_check(import_plugins: bool) -> Iterator[PluginCheck]:
    """Within it, `config_problems` (so `load_config`) imports reward plugins or only locates them.

    Outside it they are imported, as training needs them. `lightrft-mm validate` locates them
    unless given --import-plugins, so that validating a config runs none of its code.
    """
    check = PluginCheck(imported=import_plugins)
    token = _PLUGIN_CHECK.set(check)
    try:
        yield check
    finally:
        _PLUGIN_CHECK.reset(token)


def config_problems(specs: Sequence[Any], accuracy_reward: str = "") -> list[str]:
    """Problems of the `rewards:` entries found without building anything heavy (for validation).

    Resolves every name (which imports `file.py:fn` plugins, except inside `plugin_check(False)`,
    which only locates them), checks `args` against factories' signatures, and that metric names
    are unique.
    """
    problems: list[str] = []
    labels: dict[str, int] = {}
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        obj = _resolve_for_check(spec.name, f"{where}.name", problems)
        if obj is None:
            continue
        if obj is _NOT_IMPORTED:
            pass  # a plugin's args can only be checked by importing it
        elif options_of(obj).factory:
            problems += factory_arg_problems(obj, spec.args, where, spec.name)
        elif spec.args:
            problems.append(f"{where}.args: {spec.name!r} is a reward function and takes no args (got "
                            f"{sorted(spec.args)}). Fix: remove args.")
        label = spec.label or label_of(spec.name)
        if label in labels:
            problems.append(f"{where}: metric name {label!r} is taken by rewards[{labels[label]}]. "
                            f"Fix: set {where}.label to another name.")
        labels.setdefault(label, i)
    if accuracy_reward:
        _resolve_for_check(accuracy_reward, "trainer.accuracy_reward", problems)
    return problems


def _resolve_for_check(name: str, where: str, problems: list[str]) -> Any:
    """The registered object named `name` (`_NOT_IMPORTED` for a plugin only located), or None
    with the problem recorded."""
    from lightrft_mm.rewards import REWARDS

    if not name:
        return None
    if ":" not in name and name not in REWARDS:
        problems.append(f"{where}: {name!r} is not a registered reward.{did_you_mean(name, REWARDS.names())} "
                        f"Known: {', '.join(REWARDS.names())}.")
        return None
    check = _PLUGIN_CHECK.get()
    try:
        if check is not None and not REWARDS.is_registered(name):
            check.names.append(name)
            if not check.imported:
                REWARDS.locate(name)
                return _NOT_IMPORTED
        return REWARDS.get(name)
    except RegistryError as exc:
        problems.append(f"{where}: {exc}")
        return None


def check_routing(reward_set: RewardSet, *sample_lists: Sequence[Any]) -> list[str]:
    """Checks `sources` against the data; returns the sources no reward applies to.

    Raises:
        ConfigError: a reward routes to a source that no sample has (a typo would otherwise
            silently score nothing).
    """
    present = sorted({s.source for samples in sample_lists for s in samples})
    for reward in reward_set.rewards:
        missing = [s for s in reward.sources if s not in present]
        if missing and present:
            raise ConfigError(f"{reward.where}.sources: {', '.join(map(repr, missing))} is not the source of any "
                              f"training or eval sample.{did_you_mean(missing[0], present)} Sources in the data: "
                              f"{', '.join(present)}.")
    return [s for s in present if not any(r.applies_to_source(s) for r in reward_set.rewards)]


__all__ = ["COMBINE_MODES", "PluginCheck", "RewardSet", "Scores", "ScoredBatch", "build_reward_set", "check_routing",
           "combine", "combined_totals", "config_problems", "plugin_check", "reward_metrics", "score", "score_rewards"]
