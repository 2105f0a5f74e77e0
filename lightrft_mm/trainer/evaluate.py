"""Greedy evaluation on held-out Samples, sharded over the ranks."""

from __future__ import annotations

import math

from lightrft_mm.rewards import RewardInput, combine
from lightrft_mm.rollout.hf import SamplingParams


def evaluate(engine, adapter, samples, reward_fns, *, accuracy_reward: str, max_new_tokens: int,
             batch_size: int = 64, comm=None) -> dict[str, float]:
    """Greedy completions for every sample; mean of every reward, `accuracy` = the accuracy reward.

    With `comm` (the strategy) rank r evaluates samples r, r + world_size, ... and the sums are
    combined over the ranks. Every rank runs the same number of `generate` calls (a rank whose
    share is used up generates for one placeholder sample and drops it), since sharded
    forwards are collective.

    Returns:
        {"accuracy": ..., "reward/<name>": ..., "reward": weighted total, "n": count}, the same
        on every rank.
    """
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    mine = samples[rank::world]
    rounds = math.ceil(math.ceil(len(samples) / world) / batch_size)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    total = 0.0
    for start in range(0, rounds * batch_size, batch_size):
        chunk = mine[start:start + batch_size]
        rollouts = engine.generate(adapter.encode_prompts(chunk or samples[:1]), 1, sampling)
        if not chunk:
            continue
        inputs = [RewardInput(text, tuple(ids.tolist()), s, i)
                  for i, (s, text, ids) in enumerate(zip(chunk, rollouts.texts, rollouts.completion_ids))]
        totals, parts, _ = combine(reward_fns, inputs)
        total += sum(totals)
        for name, values in parts.items():
            valid = [v for v in values if v is not None]
            sums[name] = sums.get(name, 0.0) + sum(valid)
            counts[name] = counts.get(name, 0) + len(valid)
    if comm is not None:
        shares = comm.gather((sums, counts, total))
        sums, counts = {}, {}
        for part_sums, part_counts, _ in shares:
            for name in part_sums:
                sums[name] = sums.get(name, 0.0) + part_sums[name]
                counts[name] = counts.get(name, 0) + part_counts[name]
        total = sum(t for *_, t in shares)
    result = {f"reward/{k}": sums[k] / max(counts[k], 1) for k in sums}
    result["reward"] = total / max(len(samples), 1)
    result["accuracy"] = result.get(f"reward/{accuracy_reward}", float("nan"))
    result["n"] = len(samples)
    return result
