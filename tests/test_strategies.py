"""Strategy choices refused at validate, the single strategy's precision, and the data-parallel
pieces of the loop that need no second process (a fake two-rank communicator)."""

from __future__ import annotations

import pytest
import torch

from lightrft_mm.algorithms.advantages import compute_advantages
from lightrft_mm.algorithms.stabilisers import RunningMoments, normalize_rewards
from lightrft_mm.algorithms.tokens import masked_moments, masked_whiten
from lightrft_mm.config import StrategyConfig, load_config
from lightrft_mm.errors import ConfigError
from lightrft_mm.strategy.single import SingleStrategy
from lightrft_mm.trainer.metrics import reduce_metrics
from lightrft_mm.trainer.setup import check_media_kinds


def problems_of(*overrides) -> str:
    try:
        load_config("recipes/demo/colors.yaml", list(overrides))
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("overrides,expected", [
    (["strategy.zero_stage=3"], "only applies to strategy.name=deepspeed"),
    (["strategy.offload=all"], "single strategy keeps everything"),
    (["strategy.name=fsdp2", "strategy.offload=optimizer"], "fsdp2 offloads parameters, gradients"),
    (["strategy.name=deepspeed", "strategy.offload=all"], "strategy.zero_stage=3, or strategy.offload=optimizer"),
    (["strategy.precision=fp16", "strategy.device=cpu"], "fp16 needs a GPU"),
    (["strategy.zero_stage=4"], "is not one of 1, 2, 3"),
    (["strategy.name=deepspeed", "strategy.zero_stage=3", "model.lora.r=8"], "frozen output head"),
    (["strategy.name=deepspeed", "strategy.zero_stage=3", "model.freeze=[llm]"], "frozen output head"),
    (["strategy.name=deepspeed", "strategy.zero_stage=3", "model.name_or_path=tiny:llava_next"],
     "3 cannot serve 'tiny:llava_next'"),
])
def test_incompatible_strategy_choices_fail_at_validate(overrides, expected):
    assert expected in problems_of(*overrides)


def test_world_size_must_divide_the_global_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    message = problems_of("strategy.name=fsdp2")
    assert "data.batch_size: 16 prompts per step cannot be split evenly over 3 ranks" in message
    assert "single" not in message.split("data.batch_size")[0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert problems_of("strategy.name=fsdp2") == ""
    assert "strategy.name=fsdp2 or strategy.name=deepspeed" in problems_of()


def test_missing_deepspeed_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert "pip install 'lightrft_mm[deepspeed]'" in problems_of("strategy.name=deepspeed")


def test_importing_the_package_loads_no_deepspeed():
    import subprocess
    import sys

    code = ("import sys, lightrft_mm, lightrft_mm.trainer.loop, lightrft_mm.strategy.deepspeed; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- single strategy precision -----------------------------------------------------------------

def _tiny_linear(precision: str):
    strategy = SingleStrategy(StrategyConfig(device="cpu", precision=precision))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model, optimizer = strategy.prepare(model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    return strategy, model


def test_bf16_single_computes_in_bf16_over_fp32_weights():
    strategy, model = _tiny_linear("bf16")
    out = model(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and model[0].weight.dtype == torch.float32
    before = model[0].weight.detach().clone()
    strategy.backward(out.float().sum())
    strategy.step()
    assert model[0].weight.dtype == torch.float32 and not torch.equal(before, model[0].weight)


def test_fp16_loss_scaling_skips_and_counts_overflowing_steps():
    """A step whose scaled gradients overflow fp16 leaves the weights alone and is counted; the
    scale halves until the gradients fit (from 65536 this tiny layer needs a few halvings)."""
    strategy, model = _tiny_linear("fp16")
    unchanged = 0
    for step in range(8):
        before = model[0].weight.detach().clone()
        x = torch.full((2, 4), float("inf")) if step == 0 else torch.randn(2, 4)
        strategy.backward(model(x).float().sum())
        strategy.step()
        unchanged += torch.equal(before, model[0].weight)
        assert strategy.skipped_steps == unchanged
    assert 1 <= unchanged < 8  # it skipped the inf step, and later steps went through


# --- what must be global is global (a fake communicator over two "ranks") ----------------------

class TwoRanks:
    """Two "ranks" as threads whose `sum_across` is a real all-reduce (sum) between them."""

    def run(self, fn, halves):
        """fn(half, sum_across) on both halves at once; returns both results."""
        import threading

        barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

        def sum_across(rank):
            def reduce(t):
                slots[rank] = t.clone()
                barrier.wait()
                total = slots[0] + slots[1]
                barrier.wait()  # both have read the slots before either writes the next
                return total
            return reduce

        def worker(rank):
            results[rank] = fn(halves[rank], sum_across(rank))

        threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


def test_masked_moments_over_two_ranks_equal_those_of_the_whole_batch():
    torch.manual_seed(0)
    x, m = torch.randn(8, 5), torch.rand(8, 5) > 0.3
    whole = masked_moments(x, m)
    halves = [(x[:4], m[:4]), (x[4:], m[4:])]
    for got in TwoRanks().run(lambda h, s: masked_moments(*h, sum_across=s), halves):
        for a, b in zip(got, whole):
            torch.testing.assert_close(a, b)
    whitened = TwoRanks().run(lambda h, s: masked_whiten(*h, sum_across=s), halves)
    torch.testing.assert_close(torch.cat(whitened), masked_whiten(x, m))


def test_reinforce_pp_whitening_and_batch_reward_norm_are_global():
    torch.manual_seed(1)
    rewards, mask = torch.randn(4, 3), torch.ones(12, 6)
    whole = compute_advantages("reinforce_pp", rewards, mask)
    halves = [(rewards[:2], mask[:6]), (rewards[2:], mask[6:])]
    got = TwoRanks().run(lambda h, s: compute_advantages("reinforce_pp", *h, sum_across=s), halves)
    torch.testing.assert_close(torch.cat(got), whole)
    valid = torch.ones(4, 3, dtype=torch.bool)
    whole = normalize_rewards(rewards, valid, "batch")
    got = TwoRanks().run(lambda h, s: normalize_rewards(h, valid[:2], "batch", sum_across=s),
                         [rewards[:2], rewards[2:]])
    torch.testing.assert_close(torch.cat(got), whole)


def test_running_reward_statistics_merge_every_ranks_batch():
    one, two = RunningMoments(), RunningMoments()
    values = torch.tensor([1.0, 2.0, 4.0, 8.0])
    one.update(values)
    two.merge(2, 1.5, 0.25)  # rank 0's [1, 2] ...
    two.merge(2, 6.0, 4.0)   # ... then rank 1's [4, 8], as masked_moments would report them
    assert (two.mean, two.std) == pytest.approx((one.mean, one.std))


class Comm:
    def __init__(self, rows, world_size=2, sharded=True):
        self.rows, self.world_size, self.sharded_params, self.rank = rows, world_size, sharded, 0

    def gather(self, row):
        return self.rows


def test_metrics_sum_counts_and_average_means_over_ranks():
    comm = Comm([{"reward/mean": 0.5, "reward/errors": 1, "only/rank0": 2.0},
                 {"reward/mean": 1.0, "reward/errors": 2}])
    assert reduce_metrics(comm, {}) == {"reward/mean": 0.75, "reward/errors": 3, "only/rank0": 2.0}


def test_sharded_runs_refuse_data_that_mixes_media_kinds(image_samples):
    from lightrft_mm.schema import Sample

    text = Sample.from_dict({"id": "t", "messages": [{"role": "user", "content": "hi"}], "answer": "a"})
    with pytest.raises(ConfigError, match="mix media kinds .*image, text only"):
        check_media_kinds([*image_samples, text], Comm([]))
    check_media_kinds(image_samples, Comm([]))  # one kind: fine
    check_media_kinds([*image_samples, text], Comm([], sharded=False))  # ZeRO-1/2: parameters whole


def test_high_entropy_threshold_is_over_every_ranks_tokens():
    from lightrft_mm.algorithms.stabilisers import high_entropy_mask, high_entropy_threshold

    torch.manual_seed(2)
    entropy, mask = torch.rand(6, 5), torch.rand(6, 5) > 0.2
    whole = high_entropy_mask(entropy, mask, 0.25)
    halves = [(entropy[:3], mask[:3]), (entropy[3:], mask[3:])]
    others = [e[m] for e, m in halves]
    for rank, (e, m) in enumerate(halves):
        threshold = high_entropy_threshold(e, m, 0.25, gather=lambda t, r=rank: [others[0], others[1]])
        torch.testing.assert_close((e >= threshold) & m, whole[:3] if rank == 0 else whole[3:])
    assert high_entropy_threshold(entropy, torch.zeros_like(mask), 0.5) == float("-inf")
