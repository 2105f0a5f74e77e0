"""Evaluation on held-out Samples, sharded over the ranks: greedy accuracy (the trainer's
`eval/accuracy`), per-reward means, per-source breakdown, and pass@k / mean@k over sampled
completions (`lightrft-mm eval`).

Rewards see what they see in training: the completion's real tokens (not the right padding of
the batch) and the prompt messages as the policy saw them (`data.system_prompt` included).
"""

from __future__ import annotations

import math

from lightrft_mm.rewards import RewardInput, combine, prompt_messages
from lightrft_mm.rollout.hf import SamplingParams

CORRECT_ABOVE = 0.5  # a completion is correct when its accuracy reward is above this


def evaluate(engine, adapter, samples, reward_fns, *, accuracy_reward: str, max_new_tokens: int,
             batch_size: int = 64, comm=None, system_prompt: str | None = None,
             progress: bool = False) -> dict[str, float]:
    """Greedy completions for every sample; mean of every reward, `accuracy` = the accuracy reward.

    With `comm` (the strategy) rank r evaluates samples r, r + world_size, ... and the scores are
    gathered from every rank (see `score_samples`).

    Args:
        system_prompt: `data.system_prompt`, given to rewards in `RewardInput.messages` where a
            Sample has no system message (the adapter puts it in the encoded prompt itself).

    Returns:
        {"accuracy": ..., "reward/<name>": ..., "reward": weighted total, "n": count}, the same
        on every rank.
    """
    records = score_samples(engine, adapter, samples, reward_fns, sampling=SamplingParams(
        max_new_tokens=max_new_tokens, greedy=True), n=1, batch_size=batch_size, comm=comm,
        system_prompt=system_prompt, progress=progress)
    return summarize(records, accuracy_reward)


def score_samples(engine, adapter, samples, reward_fns, *, sampling: SamplingParams, n: int = 1,
                  batch_size: int = 64, comm=None, system_prompt: str | None = None,
                  progress: bool = False) -> list[dict]:
    """n completions per sample, scored by every reward; every rank's records, in sample order.

    Every rank runs the same number of `generate` calls (a rank whose share is used up generates
    for one placeholder sample and drops it), since sharded forwards are collective.

    Returns:
        One record per sample, the same list on every rank: {"index", "id", "source",
        "completions": [text, ...], "lengths": [tokens, ...], "totals": [weighted sum, ...],
        "rewards": {name: [value or None per completion]}}.
    """
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    indices = list(range(len(samples)))[rank::world]
    rounds = math.ceil(math.ceil(len(samples) / world) / batch_size)
    records = []
    bar = _bar(rounds, enabled=progress and rank == 0)
    for start in range(0, rounds * batch_size, batch_size):
        chunk = [samples[i] for i in indices[start:start + batch_size]]
        rollouts = engine.generate(adapter.encode_prompts(chunk or samples[:1]), n, sampling)
        bar.update(1)
        if not chunk:
            continue
        seen = [prompt_messages(s, system_prompt) for s in chunk]  # the prompts as the policy saw them
        inputs = [RewardInput(text, tuple(ids[m.bool()].tolist()), chunk[i // n], i // n, messages=seen[i // n])
                  for i, (text, ids, m) in enumerate(zip(rollouts.texts, rollouts.completion_ids,
                                                         rollouts.completion_mask))]
        totals, parts, _ = combine(reward_fns, inputs)
        for j, s in enumerate(chunk):
            rows = range(j * n, (j + 1) * n)
            records.append({"index": indices[start + j], "id": s.id, "source": s.source,
                            "completions": [inputs[r].completion for r in rows],
                            "lengths": [len(inputs[r].completion_ids) for r in rows],
                            "totals": [totals[r] for r in rows],
                            "rewards": {name: [values[r] for r in rows] for name, values in parts.items()}})
    bar.close()
    if comm is not None and world > 1:
        records = [r for share in comm.gather(records) for r in share]
    return sorted(records, key=lambda r: r["index"])


def summarize(records: list[dict], accuracy_reward: str) -> dict[str, float]:
    """Means over every completion of `records`: each reward (over the completions it applied
    to), the weighted total (over all), `accuracy` (the accuracy reward's mean) and `n` (samples)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    total = 0.0
    completions = 0
    for record in records:
        total += sum(record["totals"])
        completions += len(record["totals"])
        for name, values in record["rewards"].items():
            valid = [v for v in values if v is not None]
            sums[name] = sums.get(name, 0.0) + sum(valid)
            counts[name] = counts.get(name, 0) + len(valid)
    result = {f"reward/{k}": sums[k] / max(counts[k], 1) for k in sums}
    result["reward"] = total / max(completions, 1)
    result["accuracy"] = result.get(f"reward/{accuracy_reward}", float("nan"))
    result["n"] = len(records)
    return result


def by_source(records: list[dict], accuracy_reward: str) -> dict[str, dict[str, float]]:
    """`summarize` per `Sample.source`, sources in sorted order."""
    sources = sorted({r["source"] for r in records})
    return {s: summarize([r for r in records if r["source"] == s], accuracy_reward) for s in sources}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): 1 - C(n - c, k) / C(n, k), the probability that at least
    one of k samples drawn without replacement from the n is correct.

    Raises:
        ValueError: k outside 1..n or c outside 0..n.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sampled_metrics(records: list[dict], accuracy_reward: str, ks: list[int],
                    correct_above: float = CORRECT_ABOVE) -> dict[str, float]:
    """pass@k for each k and mean@n over records holding n sampled completions each.

    A completion is correct when its accuracy reward is above `correct_above`; mean@n is the mean
    of the accuracy reward itself over the n completions (its raw value, not thresholded),
    averaged over the samples. Completions the accuracy reward does not apply to (None) are left
    out, and samples with none left are not counted (`n`: the samples counted).
    """
    n = max((len(r["completions"]) for r in records), default=max(ks, default=1))
    per_k = {k: 0.0 for k in ks}
    means = 0.0
    counted = 0
    for record in records:
        values = [v for v in record["rewards"].get(accuracy_reward, []) if v is not None]
        if not values:
            continue
        correct = sum(v > correct_above for v in values)
        for k in ks:
            per_k[k] += pass_at_k(len(values), correct, min(k, len(values)))
        means += sum(values) / len(values)
        counted += 1
    result = {f"pass@{k}": v / counted if counted else float("nan") for k, v in per_k.items()}
    result[f"mean@{n}"] = means / counted if counted else float("nan")
    result["n"] = counted
    return result


def _bar(total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="batch", disable=not enabled or total < 2, dynamic_ncols=True)
