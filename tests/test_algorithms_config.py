"""Algorithm presets and config: what each name sets, how explicit fields override it, and the
errors for settings that would be accepted and ignored."""

import dataclasses

import pytest

from lightrft_mm.algorithms import presets
from lightrft_mm.config import AlgorithmConfig, Config, build_config, help_text, load_config, to_dict
from lightrft_mm.errors import ConfigError

RECIPE = "recipes/demo/colors.yaml"


def _alg(*overrides: str) -> AlgorithmConfig:
    return load_config(None, list(overrides)).algorithm


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(None, list(overrides))
    return [line[4:] for line in str(exc.value).splitlines() if line.startswith("  - ")]


EXPECTED = {  # name -> (advantage, scale_by_std, loss, aggregation, clip_eps, clip_eps_high)
    "grpo": ("group", True, "ppo", "token-mean", 0.2, 0.2),
    "dr_grpo": ("group", False, "ppo", "seq-mean-token-sum-norm", 0.2, 0.2),
    "dapo": ("group", True, "ppo", "token-mean", 0.2, 0.28),
    "gspo": ("group", True, "gspo", "seq-mean-token-mean", 3e-4, 4e-4),
    "gmpo": ("group", True, "gmpo", "seq-mean-token-mean", 0.4, 0.4),
    "reinforce_pp": ("reinforce_pp", True, "ppo", "token-mean", 0.2, 0.2),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", True, "ppo", "token-mean", 0.2, 0.2),
    "rloo": ("rloo", True, "ppo", "seq-mean-token-sum", 0.2, 0.2),
    "cpgd": ("group", False, "cpgd", "token-mean", 0.2, 0.2),
    "reinforce": ("reinforce", True, "pg", "seq-mean-token-sum", 0.2, 0.2),
}


def test_every_name_has_a_preset_and_is_a_config_choice():
    assert set(EXPECTED) == set(presets.PRESETS)
    field = {f.name: f for f in dataclasses.fields(AlgorithmConfig)}["name"]
    assert field.metadata["choices"] == tuple(presets.PRESETS)
    assert set(presets.BASE) == {f.name for f in dataclasses.fields(AlgorithmConfig)} - {"name"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_name_sets_its_algorithm(name):
    a = _alg(f"algorithm.name={name}")
    assert (a.advantage, a.scale_by_std, a.loss, a.aggregation, a.clip_eps, a.clip_eps_high) == EXPECTED[name]


def test_preset_extras():
    dapo = _alg("algorithm.name=dapo")
    assert dapo.dynamic_sampling and dapo.overlong_filter
    assert _alg("algorithm.name=cpgd").drift_coef == pytest.approx(0.1)
    pp = _alg("algorithm.name=reinforce_pp")
    assert (pp.kl_in, pp.kl_estimator) == ("reward", "k1")
    assert _alg("algorithm.name=reinforce_pp_baseline").kl_estimator == "k2"
    assert all(_alg(f"algorithm.name={n}").kl_coef == 0.0 for n in EXPECTED)  # no reference model by default


def test_defaults_are_the_grpo_preset():
    assert Config().algorithm == _alg("algorithm.name=grpo")
    assert AlgorithmConfig() == AlgorithmConfig(name="grpo")


def test_explicit_fields_override_the_preset_one_by_one():
    a = _alg("algorithm.name=dr_grpo", "algorithm.scale_by_std=true", "algorithm.epochs=3")
    assert a.scale_by_std is True and a.epochs == 3
    assert a.aggregation == "seq-mean-token-sum-norm"  # the rest stays the preset's
    g = _alg("algorithm.name=grpo", "algorithm.loss=gspo")
    assert g.loss == "gspo" and g.clip_eps == 0.2  # a field never drags other presets' values along


def test_clip_eps_alone_moves_the_whole_range_keeping_the_presets_gap():
    assert _alg("algorithm.name=dapo", "algorithm.clip_eps=0.1").clip_eps_high == pytest.approx(0.18)
    assert _alg("algorithm.name=gspo", "algorithm.clip_eps=0.2").clip_eps_high == pytest.approx(0.2001)
    assert _alg("algorithm.name=grpo", "algorithm.clip_eps=0.1").clip_eps_high == pytest.approx(0.1)
    both = _alg("algorithm.name=dapo", "algorithm.clip_eps=0.1", "algorithm.clip_eps_high=0.5")
    assert (both.clip_eps, both.clip_eps_high) == (0.1, 0.5)


def test_demo_recipe_loads_with_every_name():
    for name in EXPECTED:
        cfg = load_config(RECIPE, [f"algorithm.name={name}"])
        assert cfg.algorithm.name == name


@pytest.mark.parametrize("override, field, words", [
    ("algorithm.scale_by_std=false", "scale_by_std", ["rloo"]),
    ("algorithm.dual_clip=3.0", "dual_clip", ["gmpo"]),
    ("algorithm.drift_coef=0.5", "drift_coef", ["cpgd"]),
])
def test_a_field_that_would_be_ignored_is_an_error(override, field, words):
    name = {"scale_by_std": "rloo", "dual_clip": "gmpo", "drift_coef": "grpo"}[field]
    (problem,) = _problems(f"algorithm.name={name}", override)
    assert problem.startswith(f"algorithm.{field}:") and "no effect" in problem and "Fix: remove it, or set" in problem
    assert all(w in problem for w in words)


def test_kl_settings_without_kl_are_errors_until_kl_coef_is_set():
    problems = _problems("algorithm.kl_estimator=k1", "algorithm.kl_target=0.1")
    assert sorted(p.split(":")[0] for p in problems) == ["algorithm.kl_estimator", "algorithm.kl_target"]
    assert all("kl_coef is 0" in p for p in problems)
    a = _alg("algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1", "algorithm.kl_target=0.1")
    assert (a.kl_estimator, a.kl_target) == ("k1", 0.1)
    (horizon,) = _problems("algorithm.kl_coef=0.1", "algorithm.kl_horizon=10")
    assert horizon.startswith("algorithm.kl_horizon:") and "kl_target is 0" in horizon
    assert _problems("algorithm.dynamic_sampling_max_batches=8")[0].startswith(
        "algorithm.dynamic_sampling_max_batches:")
    assert _alg("algorithm.name=dapo", "algorithm.dynamic_sampling_max_batches=8").dynamic_sampling_max_batches == 8


def test_setting_an_inert_field_to_the_presets_own_value_is_fine():
    # The demo recipe writes clip_eps: 0.2 and kl_coef: 0.0; with reinforce (no ratio) that is harmless.
    assert _alg("algorithm.name=reinforce", "algorithm.clip_eps=0.2").loss == "pg"
    assert _alg("algorithm.name=rloo", "algorithm.scale_by_std=true").advantage == "rloo"


@pytest.mark.parametrize("overrides, field, word", [
    (["algorithm.dual_clip=0.5"], "dual_clip", "> 1"),
    (["algorithm.name=reinforce", "algorithm.epochs=2"], "epochs", "ratio"),
    (["data.batch_size=2", "algorithm.mini_batches=3"], "mini_batches", "data.batch_size"),
    (["algorithm.high_entropy_ratio=0"], "high_entropy_ratio", "(0, 1]"),
])
def test_incoherent_settings_are_errors(overrides, field, word):
    (problem,) = _problems(*overrides)
    assert problem.startswith(f"algorithm.{field}:") and word in problem and "Fix" in problem


def test_fire_temperature_near_zero_is_an_error():
    (problem,) = _problems("rollout.fire_temperature=1e-5", "rollout.fire_top_k=20")
    assert problem.startswith("rollout.fire_temperature:") and "Fix" in problem
    assert load_config(None, ["rollout.fire_temperature=2.5", "rollout.fire_top_k=20"]).rollout.fire_top_k == 20


def test_fire_needs_a_top_k_and_fire_top_k_needs_fire():
    (problem,) = _problems("rollout.fire_temperature=5.0")
    assert problem.startswith("rollout.fire_top_k:") and "whole vocabulary" in problem and "Fix" in problem
    assert load_config(None, ["rollout.fire_temperature=5.0", "rollout.top_k=50"]).rollout.fire_top_k == 0
    (problem,) = _problems("rollout.fire_top_k=20")
    assert problem.startswith("rollout.fire_top_k:") and "FIRE is off" in problem


def test_choices_are_checked():
    (problem,) = _problems("algorithm.name=ppo2")
    assert problem.startswith("algorithm.name:") and "grpo" in problem
    (problem,) = _problems("algorithm.aggregation=token_mean")
    assert "Did you mean 'token-mean'" in problem


@pytest.mark.parametrize("name", list(EXPECTED))
def test_saved_config_reloads_to_the_same_algorithm(name):
    clip = [] if name == "reinforce" else ["algorithm.clip_eps=0.1"]
    cfg = load_config(None, [f"algorithm.name={name}", "algorithm.kl_coef=0.05", *clip])
    again = build_config(to_dict(cfg))
    assert again.algorithm == cfg.algorithm


def test_direct_construction_with_a_bad_name_names_the_field():
    with pytest.raises(ConfigError, match="algorithm.name"):
        AlgorithmConfig(name="nope")


def test_help_shows_the_preset_values():
    text = help_text()
    assert "algorithm.clip_eps (float, default 0.2 (preset: gspo 0.0003, gmpo 0.4))" in text
    assert "algorithm.loss (str, default 'ppo' (preset: gspo 'gspo'" in text
    assert "algorithm.epochs (int, default 1)" in text
