"""Micro-batches: gradient accumulation over length-bucketed groups gives the mini-batch's loss."""

import json
from pathlib import Path

import pytest
import torch

from lightrft_mm.algorithms.presets import AGGREGATIONS
from lightrft_mm.algorithms.tokens import aggregate, loss_units, micro_batch_weight
from lightrft_mm.trainer.experience import micro_batch_rows


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_weighted_micro_batch_losses_sum_to_the_batch_loss(mode):
    torch.manual_seed(0)
    values = torch.randn(12, 7)
    mask = (torch.rand(12, 7) > 0.3).long()
    mask[5] = 0  # a completion left out of the loss
    full = aggregate(values, mask, mode, max_tokens=7)
    splits = [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    parts = sum(micro_batch_weight(mask[s], loss_units(mask, mode), mode) * aggregate(values[s], mask[s], mode,
                                                                                     max_tokens=7)
                for s in splits)
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_data_parallel_weights_average_to_the_global_loss(mode):
    # Two ranks hold rows 0-5 and 6-11 (uneven token counts); each weights its micro-batches with
    # the global unit count and the world size; the ranks' losses are averaged (as their
    # gradients are), which must give the aggregate over the whole global batch.
    torch.manual_seed(1)
    values, mask = torch.randn(12, 7), (torch.rand(12, 7) > 0.4).float()
    mask[2] = 0
    full = aggregate(values, mask, mode, max_tokens=7)
    units = sum(loss_units(mask[r], mode) for r in (slice(0, 6), slice(6, 12)))  # the all-reduce
    ranks = []
    for rank_rows in ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]):
        micro = [rank_rows[:2], rank_rows[2:]]
        ranks.append(sum(micro_batch_weight(mask[m], units, mode, world_size=2)
                         * aggregate(values[m], mask[m], mode, max_tokens=7) for m in micro))
    assert (sum(ranks) / 2).item() == pytest.approx(full.item(), rel=1e-6)


def test_micro_batch_weight_of_an_empty_batch_is_zero():
    empty = torch.zeros(2, 3)
    assert micro_batch_weight(empty, loss_units(empty), "token-mean") == 0.0
    with pytest.raises(ValueError, match="unknown mode"):
        micro_batch_weight(empty, 1, "token-sum")


def test_micro_batches_keep_groups_whole_and_bucket_by_length():
    n = 2
    lengths = torch.tensor([9, 3, 1, 2, 30, 4, 5, 5])  # group maxima: 9, 2, 30, 5
    micro = micro_batch_rows(list(range(8)), n, lengths, groups_per_micro=2)
    assert micro == [[2, 3, 6, 7], [0, 1, 4, 5]]
    assert micro_batch_rows(list(range(8)), n, lengths, groups_per_micro=0) == [list(range(8))]
    assert micro_batch_rows([4, 5], n, lengths, groups_per_micro=1) == [[4, 5]]


def test_the_loop_with_micro_batches_takes_the_same_step(tmp_path, monkeypatch):
    import lightrft_mm.models.logprobs as logprobs
    from lightrft_mm.config import load_config
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.trainer.loop import train

    prepare_synthetic("colors", tmp_path / "train", n=8, seed=1)
    (tmp_path / "reward.py").write_text("def length(inputs):\n    return [len(x.completion) / 10 for x in inputs]\n")
    calls = []
    real = logprobs.forward_logprobs
    monkeypatch.setattr(logprobs, "forward_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = {}
    for groups in (0, 1):
        calls.clear()
        out = tmp_path / f"run{groups}"
        train(load_config("recipes/demo/colors.yaml", [
            f"data.train=[{tmp_path / 'train'}]", "data.eval=[]", f"trainer.output_dir={out}",
            "trainer.max_steps=1", "data.batch_size=4", "rollout.n=4", "warmup.steps=0", "logging.progress=false",
            "logging.plot=false", f"rewards=[{{name: '{tmp_path / 'reward.py'}:length'}}]", f"trainer.micro_batch_groups={groups}"]))
        rows[groups] = [r for r in map(json.loads, (out / "metrics.jsonl").open()) if "grad_norm" in r][0]
        rows[groups]["forwards"] = len(calls)
    assert rows[0]["forwards"] == 1 and rows[1]["forwards"] == 4  # one per prompt group
    assert rows[1]["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-4)
    assert rows[1]["loss/loss"] == pytest.approx(rows[0]["loss/loss"], rel=1e-4, abs=1e-7)
    assert rows[0]["grad_norm"] > 0


def test_high_entropy_selection_is_the_mini_batchs_whatever_the_micro_batching(tmp_path):
    """algorithm.high_entropy_ratio < 1 with trainer.micro_batch_groups: the same tokens are
    selected (the mini-batch's threshold) and the same update made as in one pass."""
    import functools
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from parity import fixed_batch

    from lightrft_mm.algorithms.advantages import compute_advantages
    from lightrft_mm.config import StrategyConfig, load_config
    from lightrft_mm.datasets.loader import load_samples
    from lightrft_mm.models import logprobs
    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.processors import make_adapter
    from lightrft_mm.strategy.single import SingleStrategy
    from lightrft_mm.trainer.loop import optimise

    data = prepare_synthetic("colors", tmp_path / "data", n=8, seed=1)
    alg = load_config(None, ["algorithm.high_entropy_ratio=0.3"]).algorithm
    results = []
    for groups in (0, 1):
        model, processor = build_tiny("qwen2_5_vl", seed=0)
        adapter = make_adapter(model, processor)
        rollouts, rewards = fixed_batch(adapter, load_samples([data]), model.config.get_text_config().vocab_size)
        strategy = SingleStrategy(StrategyConfig(device="cpu"))
        model, _ = strategy.prepare(model, functools.partial(torch.optim.AdamW, lr=1e-3))
        forward = functools.partial(logprobs.forward_logprobs, share_media=True)
        mask = rollouts.completion_mask
        with torch.no_grad():
            old, _ = forward(model, rollouts.prompts, rollouts.completion_ids, mask)
        rollouts.logps = old
        advantages = compute_advantages("group", rewards, mask)
        stats = optimise(model, strategy, rollouts, old, advantages, mask, alg=alg, temps=1.0, ref_logps=None,
                         kl_coef=0.0, max_tokens=6, micro_batch_groups=groups, forward_logprobs=forward, pad_id=0)
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (one, one_params), (micro, micro_params) = results
    assert micro["selected_fraction"] == pytest.approx(one["selected_fraction"], rel=1e-6)
    assert micro["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert micro["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for a, b in zip(one_params, micro_params):  # Adam turns fp32 noise in ~0 gradients into <1 % of a step (1e-3)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
