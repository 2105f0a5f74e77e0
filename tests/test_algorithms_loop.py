"""The algorithm family inside the trainer: every name trains, every algorithm flag changes the
loss or the gradient, DAPO's dynamic sampling, mini-batches, TIS and FIRE sampling."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap

import pytest
import torch

from lightrft_mm.config import AlgorithmConfig, load_config
from lightrft_mm.processors.adapter import PromptEncoding, collate
from lightrft_mm.rewards import ScoredBatch
from lightrft_mm.rollout.hf import Rollouts, SamplingParams, _Warp
from lightrft_mm.trainer.experience import concat_rollouts, mini_batch_rows, select_rows
from lightrft_mm.trainer.experience import informative_batch
from lightrft_mm.trainer.loop import train

NAMES = ["grpo", "dr_grpo", "dapo", "gspo", "gmpo", "reinforce_pp", "reinforce_pp_baseline", "rloo", "cpgd",
         "reinforce"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lightrft_mm.prepare import prepare_synthetic

    root = tmp_path_factory.mktemp("algo-data")
    prepare_synthetic("colors", root / "train", n=16, seed=1)
    # A reward with three levels that depends only on the completion text: groups of two often
    # differ and sometimes tie (for dynamic sampling), from the first step of a random model.
    (root / "crc_reward.py").write_text(textwrap.dedent("""
        import zlib

        def crc(inputs):
            return [zlib.crc32(x.completion.encode()) % 3 / 2 for x in inputs]
    """))
    return root


def _train(shards, out, *overrides):
    """Two steps, 4 prompts x 2 completions of <= 6 tokens, after a 3-step format warm-up so
    completion lengths differ and some end before the budget."""
    cfg = load_config("recipes/demo/colors.yaml", [
        f"data.train=[{shards / 'train'}]", "data.eval=[]", f"trainer.output_dir={out}",
        f"rewards=[{{name: '{shards / 'crc_reward.py'}:crc'}}]", "trainer.max_steps=2", "data.batch_size=4",
        "rollout.n=2", "rollout.max_new_tokens=6", "warmup.steps=3", "warmup.lr=0.03", "warmup.batch_size=4",
        "logging.progress=false", "logging.plot=false", "logging.completions=0", *overrides])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "grad_norm" in r]


def _lm_head(out):
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint-final" / "model.safetensors"))
    return next(v for k, v in weights.items() if k.endswith("lm_head.weight"))


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_trains_two_steps(name, shards, tmp_path):
    # The recipe's explicit clip_eps 0.2 would replace gspo's and gmpo's own ranges.
    clip = f"algorithm.clip_eps={AlgorithmConfig(name=name).clip_eps}"
    steps = _train(shards, tmp_path / "run", f"algorithm.name={name}", clip)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("loss/"))
    assert any(r["grad_norm"] > 0 for r in steps)  # a non-zero update (Adam, lr > 0): the weights moved
    if name == "dapo":
        assert all("sampling/kept_fraction" in r and 0 < r["sampling/kept_fraction"] <= 1 for r in steps)


# --- every algorithm flag acts ---------------------------------------------------------------------

OFF_POLICY = ("algorithm.epochs=3", "trainer.lr=0.05", "algorithm.clip_eps=0.01")
KL = ("algorithm.kl_coef=0.1",)
# flag -> the setting it is compared against (the flag must change the loss or the gradient there)
FLAGS = {
    "algorithm.advantage=rloo": (),
    "algorithm.advantage=reinforce_pp": (),
    "algorithm.scale_by_std=false": (),
    "algorithm.loss=gspo": ("algorithm.epochs=2",),
    "algorithm.loss=gmpo": ("algorithm.epochs=2",),
    "algorithm.loss=cpgd": ("algorithm.epochs=2",),
    "algorithm.loss=pg": (),
    "algorithm.aggregation=seq-mean-token-mean": (),
    "algorithm.aggregation=seq-mean-token-sum-norm": (),
    "algorithm.clip_eps=0.05": ("algorithm.epochs=3", "trainer.lr=0.05"),
    "algorithm.clip_eps_high=0.5": OFF_POLICY,
    "algorithm.dual_clip=1.01": OFF_POLICY,
    "algorithm.epochs=2": (),
    "algorithm.mini_batches=2": (),
    "algorithm.kl_coef=0.1": (),
    "algorithm.kl_in=reward": KL,
    "algorithm.kl_estimator=k1": KL,
    "algorithm.kl_clamp=1e-6": KL,
    "algorithm.kl_target=0.001": KL,
    "algorithm.kl_horizon=1": (*KL, "algorithm.kl_target=0.001"),
    "algorithm.drift_coef=1.0": ("algorithm.name=cpgd", "algorithm.epochs=2"),
    "algorithm.dynamic_sampling=true": (),
    "algorithm.dynamic_sampling_max_batches=1": ("algorithm.dynamic_sampling=true",),
    "algorithm.overlong_filter=true": (),
    "algorithm.reward_norm=batch": ("algorithm.name=reinforce",),
    "algorithm.reward_norm=running": ("algorithm.name=reinforce",),
    "algorithm.reward_clip=0.2": ("algorithm.name=reinforce",),
    "algorithm.adv_clip=0.1": (),
    "algorithm.entropy_coef=0.1": (),
    "algorithm.high_entropy_ratio=0.2": (),
    # With the HF engine the trainer's and the sampler's log-probs agree, so the truncated weight
    # is ~1; a cap below 1 shows that the weight reaches the loss.
    "algorithm.tis_cap=0.5": (),
    "rollout.fire_temperature=5.0": ("rollout.top_k=50",),
    "rollout.fire_top_k=3": ("rollout.fire_temperature=5.0", "rollout.top_k=50"),
}


def test_every_algorithm_field_has_a_flag_test():
    tested = {flag.split("=")[0] for flag in FLAGS}
    fields = {f"algorithm.{f.name}" for f in dataclasses.fields(AlgorithmConfig)} - {"algorithm.name"}
    assert fields | {"rollout.fire_temperature", "rollout.fire_top_k"} == tested


def _signature(steps, out) -> dict[str, float]:
    """Both steps' loss, policy loss, gradient norm and KL coefficient, and some final weights."""
    keys = ("loss/loss", "loss/pg_loss", "grad_norm", "kl/coef")
    values = {f"{r['step']}:{k}": float(r[k]) for r in steps for k in keys if k in r}
    values.update({f"w{i}": w for i, w in enumerate(_lm_head(out).flatten()[:64].tolist())})
    return values


@pytest.fixture(scope="module")
def baselines(shards, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("baselines"), {}

    def get(base: tuple) -> list[float]:
        if base not in cache:
            out = root / f"b{len(cache)}"
            cache[base] = _signature(_train(shards, out, *base), out)
        return cache[base]

    return get


@pytest.mark.parametrize("flag", list(FLAGS))
def test_every_algorithm_flag_changes_the_loss_or_the_gradient(flag, shards, baselines, tmp_path):
    base = FLAGS[flag]
    out = tmp_path / "run"
    flagged = _signature(_train(shards, out, *base, flag), out)
    reference = baselines(base)
    change = max(abs(flagged[k] - reference[k]) / max(1.0, abs(reference[k])) for k in reference.keys() & flagged)
    assert change > 1e-5, f"{flag} did not change the loss, the gradient or the weights"


def test_same_settings_give_the_same_signature(shards, baselines, tmp_path):
    """The comparison above is meaningful: two identical runs agree exactly."""
    out = tmp_path / "again"
    assert _signature(_train(shards, out), out) == baselines(())


# --- loop wiring: dynamic sampling, TIS, overlong filter ------------------------------------------------


def test_dapo_logs_its_sampling_and_truncation(shards, tmp_path):
    steps = _train(shards, tmp_path, "algorithm.name=dapo", "algorithm.clip_eps=0.2")
    for r in steps:
        assert 0 < r["sampling/kept_fraction"] <= 1 and 1 <= r["sampling/batches"] <= 4
        assert 0 <= r["completion/truncated"] <= 1


def test_tis_weight_sees_what_the_engine_sampled_from(shards, tmp_path):
    """The behaviour policy is the distribution the tokens were drawn from: with top-k 2 every
    drawn token is likelier under it than under the full policy, so the weight is below 1;
    without top-k only the suppressed special tokens differ and it stays near 1."""
    plain = _train(shards, tmp_path / "plain", "algorithm.tis_cap=2.0")
    top2 = _train(shards, tmp_path / "top2", "algorithm.tis_cap=2.0", "rollout.top_k=2")
    assert all(0.9 < r["loss/tis_weight_mean"] <= 1.0 + 1e-6 for r in plain)
    assert all(0 < r["loss/tis_weight_mean"] < min(p["loss/tis_weight_mean"] for p in plain) for r in top2)


def _fake_rollouts(groups: int, n: int, width: int, seed: int) -> Rollouts:
    gen = torch.Generator().manual_seed(seed)
    encodings = [PromptEncoding(torch.arange(2 + g % 3) + 10 * seed) for g in range(groups) for _ in range(n)]
    ids = torch.randint(3, 50, (groups * n, width), generator=gen)
    return Rollouts(collate(encodings, 0), ids, torch.ones_like(ids), -torch.rand(groups * n, width, generator=gen),
                    [f"text{seed}-{i}" for i in range(groups * n)], n)


def test_select_concat_and_mini_batches_keep_rows_together():
    a, b = _fake_rollouts(3, 2, 4, seed=1), _fake_rollouts(2, 2, 6, seed=2)
    picked = select_rows(a, [2, 3], pad_id=0)
    assert torch.equal(picked.completion_ids, a.completion_ids[2:4]) and picked.texts == a.texts[2:4]
    assert torch.equal(picked.prompts.input_ids[:, -3:], a.prompts.input_ids[2:4, -3:])
    joined = concat_rollouts([a, b], pad_id=0)
    assert joined.completion_ids.shape == (10, 6) and joined.texts == a.texts + b.texts
    assert torch.equal(joined.completion_mask[:6, 4:], torch.zeros(6, 2, dtype=joined.completion_mask.dtype))
    assert torch.equal(joined.logps[6:], b.logps) and joined.prompts.input_ids.shape[0] == 10
    assert mini_batch_rows(3, 2, 2) == [[0, 1, 2, 3], [4, 5]]
    assert mini_batch_rows(2, 2, 5) == [[0, 1], [2, 3]]


@dataclasses.dataclass(frozen=True)
class _Input:  # the fields of a RewardInput that dynamic sampling touches
    completion: str
    group: int


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    batches = [torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 4.0]])]
    calls = []

    def rollout_and_score(batch):
        rewards = batches[len(calls)]
        calls.append(batch)
        rollouts = _fake_rollouts(3, 2, 3, seed=len(calls))
        inputs = [_Input(t, i // 2) for i, t in enumerate(rollouts.texts)]
        scored = ScoredBatch(rewards, torch.ones(3, 2, dtype=torch.bool), {"reward/mean": rewards.mean().item(),
                                                                           "reward/errors": 1})
        return None, rollouts, inputs, scored, 0

    rollouts, inputs, scored, skipped, stats = informative_batch(rollout_and_score, iter(range(9)), want=3,
                                                                  max_batches=4, pad_id=0)
    assert len(calls) == 2 and stats == {"sampling/kept_fraction": 4 / 6, "sampling/batches": 2}
    # Batch 1 gives its group 1; batch 2 its groups 0 and 1 (group 2 is not needed).
    assert torch.equal(scored.rewards, torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    assert [x.completion for x in inputs] == ["text1-2", "text1-3", "text2-0", "text2-1", "text2-2", "text2-3"]
    assert [x.group for x in inputs] == [0, 0, 1, 1, 2, 2]
    assert rollouts.completion_ids.shape == (6, 3)
    assert scored.metrics["reward/errors"] == 2  # counts summed over both batches
    assert scored.metrics["reward/mean"] == pytest.approx((batches[0].mean() + batches[1].mean()).item() / 2)

    calls.clear()
    batches[:] = [torch.ones(3, 2)] * 2
    rollouts, _, scored, _, stats = informative_batch(rollout_and_score, iter(range(9)), want=3, max_batches=2,
                                                       pad_id=0)
    assert stats == {"sampling/kept_fraction": 0.0, "sampling/batches": 2}
    assert scored.rewards.shape == (3, 2)  # nothing informative: the last batch as it is


# --- FIRE sampling -------------------------------------------------------------------------------------


def test_fire_processor_tempers_only_the_first_new_token():
    proc = _Warp(prompt_len=3, first=4.0, rest=0.5, top_k=2, top_p=1.0)
    scores = torch.tensor([[4.0, 2.0, 1.0]])
    first = proc(torch.zeros(1, 3, dtype=torch.long), scores.clone())
    later = proc(torch.zeros(1, 4, dtype=torch.long), scores.clone())
    torch.testing.assert_close(first, torch.tensor([[1.0, 0.5, -math.inf]]))  # / 4, top-2
    torch.testing.assert_close(later, torch.tensor([[8.0, 4.0, -math.inf]]))  # / 0.5, top-2


def test_fire_top_k_applies_only_to_the_first_new_token():
    proc = _Warp(prompt_len=3, first=1.0, rest=1.0, top_k=0, top_p=1.0, first_top_k=1)
    scores = torch.tensor([[4.0, 2.0, 1.0]])
    torch.testing.assert_close(proc(torch.zeros(1, 3, dtype=torch.long), scores.clone()),
                               torch.tensor([[4.0, -math.inf, -math.inf]]))
    torch.testing.assert_close(proc(torch.zeros(1, 4, dtype=torch.long), scores.clone()), scores)
    # 0 = the run's top-k at the first token too.
    proc = _Warp(prompt_len=3, first=1.0, rest=1.0, top_k=2, top_p=1.0)
    torch.testing.assert_close(proc(torch.zeros(1, 3, dtype=torch.long), scores.clone()),
                               torch.tensor([[4.0, 2.0, -math.inf]]))


def test_sampling_params_temperatures():
    assert SamplingParams(temperature=0.7).temperatures(3) == 0.7
    assert SamplingParams(temperature=0.7, first_temperature=2.0, greedy=True).temperatures(3) == 1.0
    torch.testing.assert_close(SamplingParams(temperature=0.7, first_temperature=2.0).temperatures(3),
                               torch.tensor([2.0, 0.7, 0.7]))


@pytest.fixture(scope="module")
def tiny_engine():
    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.processors.adapter import HFChatAdapter
    from lightrft_mm.rollout.hf import HFRolloutEngine

    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = HFChatAdapter(processor)
    return model, adapter, HFRolloutEngine(model, adapter)


def test_fire_draws_the_first_token_hot_and_the_rest_cold(tiny_engine, image_samples):
    _, adapter, engine = tiny_engine
    prompts = adapter.encode_prompts(image_samples[:1])
    torch.manual_seed(0)
    cold = engine.generate(prompts, 8, SamplingParams(max_new_tokens=4, temperature=1e-3))
    torch.manual_seed(0)
    fire = engine.generate(prompts, 8, SamplingParams(max_new_tokens=4, temperature=1e-3, first_temperature=1e3))
    # At temperature 1e-3 sampling is greedy: one first token. At 1e3 it is nearly uniform.
    assert len(set(cold.completion_ids[:, 0].tolist())) == 1
    assert len(set(fire.completion_ids[:, 0].tolist())) >= 4
    # After the first token the cold temperature rules: the same first token, the same continuation.
    by_first = {}
    for row in fire.completion_ids.tolist():
        by_first.setdefault(row[0], set()).add(tuple(row[1:]))
    assert all(len(rest) == 1 for rest in by_first.values())
    # With fire_top_k the hot draw is among the k likeliest first tokens: near-uniform over 3.
    torch.manual_seed(0)
    top3 = engine.generate(prompts, 16, SamplingParams(max_new_tokens=2, temperature=1e-3, first_temperature=1e3,
                                                       first_top_k=3))
    assert len(set(top3.completion_ids[:, 0].tolist())) <= 3
    torch.testing.assert_close(top3.sample_logps[:, 0], torch.full((16,), -math.log(3)), atol=1e-2, rtol=0)


def test_fire_log_probs_match_the_trainer_per_position(tiny_engine, image_samples):
    from lightrft_mm.models.logprobs import forward_logprobs

    model, adapter, engine = tiny_engine
    sampling = SamplingParams(max_new_tokens=8, temperature=0.9, first_temperature=3.0)
    torch.manual_seed(1)
    r = engine.generate(adapter.encode_prompts(image_samples), 2, sampling)
    mask = r.completion_mask.bool()
    per_position, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask,
                                       temperature=sampling.temperatures(r.completion_ids.shape[1]))
    assert ((per_position - r.logps).abs() * mask).max().item() <= 1e-4
    # The first token's log-prob really is the FIRE temperature's, the others the normal one's.
    plain, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    assert (plain[:, 0] - r.logps[:, 0]).abs().min().item() > 1e-3
    assert ((plain[:, 1:] - r.logps[:, 1:]).abs() * mask[:, 1:]).max().item() <= 1e-4
