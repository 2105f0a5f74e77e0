"""Greedy evaluation on held-out Samples."""

from __future__ import annotations

from lightrft_mm.rewards import RewardInput, combine
from lightrft_mm.rollout.hf import SamplingParams


def evaluate(engine, adapter, samples, reward_fns, *, accuracy_reward: str, max_new_tokens: int,
             batch_size: int = 64) -> dict[str, float]:
    """Greedy completions for every sample; mean of every reward, `accuracy` = the accuracy reward.

    Returns:
        {"accuracy": ..., "reward/<name>": ..., "reward": weighted total, "n": count}.
    """
    sampling = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    total = 0.0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rollouts = engine.generate(adapter.encode_prompts(chunk), 1, sampling)
        inputs = [RewardInput(text, tuple(ids.tolist()), s, i)
                  for i, (s, text, ids) in enumerate(zip(chunk, rollouts.texts, rollouts.completion_ids))]
        totals, parts, _ = combine(reward_fns, inputs)
        total += sum(totals)
        for name, values in parts.items():
            valid = [v for v in values if v is not None]
            sums[name] = sums.get(name, 0.0) + sum(valid)
            counts[name] = counts.get(name, 0) + len(valid)
    result = {f"reward/{k}": sums[k] / max(counts[k], 1) for k in sums}
    result["reward"] = total / max(len(samples), 1)
    result["accuracy"] = result.get(f"reward/{accuracy_reward}", float("nan"))
    result["n"] = len(samples)
    return result
