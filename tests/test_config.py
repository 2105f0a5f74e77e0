"""Tests of the typed config: recipes load, overrides are typed by YAML, every problem is
reported at once with its key path and a fix, and `help_text` documents every field."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from lightrft_mm import config as C
from lightrft_mm.config import Config, build_config, help_text, load_config
from lightrft_mm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo" / "colors.yaml"

SECTION_CLASSES = {
    "model": C.ModelConfig, "data": C.DataConfig, "image": C.ImageConfig, "video": C.VideoConfig,
    "audio": C.AudioConfig, "rollout": C.RolloutConfig,
    "rewards": C.RewardSpec, "scoring": C.ScoringConfig, "algorithm": C.AlgorithmConfig,
    "strategy": C.StrategyConfig,
    "trainer": C.TrainerConfig, "warmup": C.WarmupConfig, "logging": C.LoggingConfig,
}


def _problems(exc: pytest.ExceptionInfo) -> list[str]:
    """The `  - ...` lines of a ConfigError message."""
    return [line[4:] for line in str(exc.value).splitlines() if line.startswith("  - ")]


def _error(overrides: list[str], path=RECIPE) -> pytest.ExceptionInfo:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    return exc


# --- the recipe -------------------------------------------------------------------------------

def test_recipe_values_reach_the_dataclasses():
    cfg = load_config(RECIPE)
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path == "tiny:qwen2_5_vl"
    assert cfg.data.train == ["runs/demo-data/colors-train"]
    assert cfg.data.eval == ["runs/demo-data/colors-heldout"]
    assert cfg.data.batch_size == 16
    assert (cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.temperature) == (8, 8, 1.0)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("exact_match", 1.0), ("boxed_format", 0.1)]
    assert all(isinstance(r, C.RewardSpec) for r in cfg.rewards)
    assert cfg.algorithm.clip_eps == 0.2
    assert cfg.trainer.max_steps == 150
    assert cfg.trainer.lr == pytest.approx(1e-3)
    assert cfg.trainer.adam_beta2 == pytest.approx(0.99)
    assert cfg.trainer.eval_every == 25 and cfg.trainer.overwrite is False  # recipes never delete a run
    assert cfg.warmup.steps == 100 and cfg.warmup.lr == pytest.approx(3e-3)
    assert cfg.warmup.template == "\\boxed{{answer}}"
    # Keys the recipe does not set keep their dataclass defaults.
    assert cfg.strategy == C.StrategyConfig()
    assert cfg.logging == C.LoggingConfig()
    assert cfg.rollout.top_p == C.RolloutConfig().top_p


def test_recipe_starts_with_its_launch_command():
    first = RECIPE.read_text().splitlines()[0]
    assert first.startswith("#") and "lightrft-mm" in first and "recipes/demo/colors.yaml" in first


def test_no_path_gives_the_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.rollout.n == 8 and cfg.model.name_or_path == "tiny:qwen2_5_vl"


# --- overrides --------------------------------------------------------------------------------

def test_overrides_are_typed_by_yaml():
    cfg = load_config(RECIPE, [
        "trainer.max_steps=7",          # int
        "trainer.lr=1e-5",              # YAML reads this (no dot) as a string; it must be a float
        "rollout.temperature=0.7",      # float
        "rollout.top_p=1",              # an int where a float is expected
        "logging.plot=false",           # bool
        "trainer.overwrite=true",
        "data.eval=[a, b]",             # list
        "data.train=only/one",          # a single string becomes a one-item list
        "trainer.output_dir=runs/x",
        "model.name_or_path=tiny:qwen2_vl",
    ])
    assert cfg.trainer.max_steps == 7 and type(cfg.trainer.max_steps) is int
    assert cfg.trainer.lr == pytest.approx(1e-5) and type(cfg.trainer.lr) is float
    assert cfg.rollout.temperature == pytest.approx(0.7)
    assert cfg.rollout.top_p == 1.0 and type(cfg.rollout.top_p) is float
    assert cfg.logging.plot is False
    assert cfg.trainer.overwrite is True
    assert cfg.data.eval == ["a", "b"]
    assert cfg.data.train == ["only/one"]
    assert cfg.trainer.output_dir == "runs/x"
    assert cfg.model.name_or_path == "tiny:qwen2_vl"
    # The rest of the recipe is untouched.
    assert cfg.data.batch_size == 16 and cfg.rollout.n == 8


def test_override_replaces_the_rewards_list():
    cfg = load_config(RECIPE, ["rewards=[{name: boxed_format, weight: 2}]"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("boxed_format", 2.0)]


def test_override_into_a_list_item():
    """`rewards.0.weight=0.5` either sets the first reward's weight, or says how to override
    the list; it never reports the recipe's own rewards as broken."""
    try:
        cfg = load_config(RECIPE, ["rewards.0.weight=0.5"])
    except ConfigError as e:
        assert "rewards=[" in str(e) and "missing" not in str(e)
    else:
        assert [(r.name, r.weight) for r in cfg.rewards] == [("exact_match", 0.5), ("boxed_format", 0.1)]


def test_override_without_equals_sign_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(RECIPE, ["trainer.max_steps"])


def test_override_of_wrong_type_is_an_error():
    problems = _problems(_error(["logging.plot=1", "trainer.seed=abc"]))
    assert len(problems) == 2
    assert any(p.startswith("logging.plot:") and "boolean" in p and "Fix" in p for p in problems)
    assert any(p.startswith("trainer.seed:") and "integer" in p and "Fix" in p for p in problems)


# --- every problem at once --------------------------------------------------------------------

THREE_MISTAKES = """\
model:
  name_or_path: tiny:qwen2_5_vl
rollout:
  n: eight
trainer:
  max_stpes: 5
rewards:
  - {name: exact_mach, weight: 1.0}
"""


def test_three_mistakes_are_reported_in_one_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(THREE_MISTAKES)
    exc = _error([], path=path)
    text = str(exc.value)
    assert str(path) in text and "3 problem" in text
    problems = _problems(exc)
    assert len(problems) == 3, problems
    typo = next(p for p in problems if p.startswith("trainer.max_stpes:"))
    assert "unknown key" in typo and "did you mean 'max_steps'" in typo
    wrong_type = next(p for p in problems if p.startswith("rollout.n:"))
    assert "'eight'" in wrong_type and "not an integer" in wrong_type and "Fix:" in wrong_type
    reward = next(p for p in problems if p.startswith("rewards[0].name:"))
    assert "'exact_mach'" in reward and "Did you mean 'exact_match'" in reward
    assert "boxed_format" in reward  # lists the known rewards


def test_unknown_section_suggests_the_closest():
    problems = _problems(_error(["trainre.max_steps=3"]))
    assert problems == ["trainre: unknown section; did you mean 'trainer'? (from override 'trainre.max_steps=3')"]


def test_unknown_section_without_close_match_lists_the_sections():
    (problem,) = _problems(_error(["zzzz.key=1"]))
    assert problem.startswith("zzzz: unknown section")
    for section in SECTION_CLASSES:
        assert section in problem


@pytest.mark.parametrize("override, key, words", [
    ("rollout.n=1", "rollout.n", ["below the minimum 2", ">= 2"]),
    ("rollout.top_p=1.5", "rollout.top_p", ["above the maximum 1.0", "<= 1.0"]),
    ("rollout.temperature=0", "rollout.temperature", ["below the minimum"]),
    ("data.batch_size=0", "data.batch_size", ["below the minimum 1"]),
    ("algorithm.clip_eps=-0.1", "algorithm.clip_eps", ["below the minimum 0.0"]),
    ("trainer.lr=-1e-5", "trainer.lr", ["below the minimum 0.0"]),
])
def test_out_of_range_values(override, key, words):
    (problem,) = _problems(_error([override]))
    assert problem.startswith(f"{key}:")
    for w in words:
        assert w in problem


def test_range_limits_are_inclusive():
    cfg = load_config(RECIPE, ["rollout.n=2", "rollout.top_p=1.0", "algorithm.clip_eps=0"])
    assert (cfg.rollout.n, cfg.rollout.top_p, cfg.algorithm.clip_eps) == (2, 1.0, 0.0)


def test_several_range_errors_are_all_reported():
    problems = _problems(_error(["rollout.n=1", "rollout.top_p=1.5"]))
    assert sorted(p.split(":")[0] for p in problems) == ["rollout.n", "rollout.top_p"]


@pytest.mark.parametrize("override", ["trainer.lr=nan", "rollout.temperature=inf", "trainer.lr=.nan"])
def test_non_finite_floats_are_rejected(override):
    (problem,) = _problems(_error([override]))
    assert problem.startswith(override.split("=")[0] + ":")


def test_choices_are_listed():
    (problem,) = _problems(_error(["strategy.name=fsdp"]))
    assert problem.startswith("strategy.name:") and "'fsdp'" in problem
    assert "single" in problem  # the allowed choices


def test_choice_typo_suggests_the_closest():
    (problem,) = _problems(_error(["data.on_media_error=skp"]))
    assert "Did you mean 'skip'" in problem and "fail" in problem


def test_unknown_tiny_family_suggests_the_real_one():
    (problem,) = _problems(_error(["model.name_or_path=tiny:qwen25vl"]))
    assert problem.startswith("model.name_or_path:")
    assert "'qwen25vl'" in problem
    assert "Did you mean 'tiny:qwen2_5_vl'?" in problem
    assert "tiny:llava" in problem  # the known families are listed


def test_missing_model_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    (problem,) = _problems(_error([f"model.name_or_path={missing}"]))
    assert problem.startswith("model.name_or_path:")
    assert str(missing) in problem and "tiny:<family>" in problem


def test_existing_model_folder_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')  # a model folder has one
    cfg = load_config(RECIPE, [f"model.name_or_path={tmp_path}"])
    assert cfg.model.name_or_path == str(tmp_path)


def test_tiny_tokenizer_with_a_model_folder_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (problem,) = _problems(_error([f"model.name_or_path={tmp_path}", "model.tiny_tokenizer=qwen"]))
    assert problem.startswith("model.tiny_tokenizer:") and "tiny:" in problem and "Fix" in problem
    # ...while with a tiny model it is a valid choice.
    assert load_config(RECIPE, ["model.tiny_tokenizer=qwen"]).model.tiny_tokenizer == "qwen"


def test_unknown_accuracy_reward_is_an_error():
    (problem,) = _problems(_error(["trainer.accuracy_reward=exact_mtch"]))
    assert problem.startswith("trainer.accuracy_reward:") and "Did you mean 'exact_match'" in problem


def test_reward_without_name_is_an_error():
    (problem,) = _problems(_error(["rewards=[{weight: 1.0}]"]))
    assert problem.startswith("rewards[0].name:") and "missing" in problem


def test_warmup_template_without_answer_is_an_error():
    (problem,) = _problems(_error(["warmup.template=boxed"]))
    assert problem.startswith("warmup.template:") and "{answer}" in problem


def test_section_that_is_not_a_mapping():
    (problem,) = _problems(_error(["trainer=5"]))
    assert problem.startswith("trainer:") and "mapping" in problem


def test_missing_config_file_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_build_config_from_a_dict():
    cfg = build_config({"rollout": {"n": 4}, "rewards": "exact_match"})
    assert cfg.rollout.n == 4
    assert [(r.name, r.weight) for r in cfg.rewards] == [("exact_match", 1.0)]
    with pytest.raises(ConfigError, match="from-a-test"):
        build_config({"rollout": {"n": 0}}, source="from-a-test")


# --- documentation and immutability -----------------------------------------------------------

def test_section_table_matches_config():
    assert set(SECTION_CLASSES) == {f.name for f in dataclasses.fields(Config)}


def test_help_text_mentions_every_field_of_every_section():
    text = help_text()
    missing = []
    todo = list(SECTION_CLASSES.items())
    while todo:
        section, cls = todo.pop()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):  # a nested section, e.g. model.lora
                todo.append((f"{section}.{f.name}", f.default_factory))
                continue
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"
            if f"{section}.{f.name} " not in text:
                missing.append(f"{section}.{f.name}")
    assert not missing, f"help_text() lacks {missing}"
    # Choices and defaults are shown too.
    assert "One of: float32, bfloat16, float16." in text
    assert "rollout.n (int, default 8)" in text


@pytest.mark.parametrize("section", [s for s in SECTION_CLASSES])
def test_config_dataclasses_are_frozen(section):
    cfg = load_config(RECIPE)
    obj = cfg.rewards[0] if section == "rewards" else getattr(cfg, section)
    name = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, getattr(obj, name))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer = C.TrainerConfig()


def test_docs_config_reference_is_current():
    import subprocess
    import sys
    from pathlib import Path

    generated = subprocess.run([sys.executable, "-m", "lightrft_mm.config"], capture_output=True, text=True,
                               check=True).stdout
    assert Path("docs/config.md").read_text() == generated, "run: python -m lightrft_mm.config > docs/config.md"


def test_data_synthetic_names_a_known_task_and_a_folder():
    with pytest.raises(ConfigError, match="data.synthetic: unknown task 'colours'.*Did you mean 'colors'"):
        load_config("recipes/demo/colors.yaml", ["data.synthetic=colours"])
    with pytest.raises(ConfigError, match="data.synthetic: names no folder"):
        load_config("recipes/demo/colors.yaml", ["data.train=[]"])


def test_train_generates_the_synthetic_data_it_names(tmp_path):
    from lightrft_mm.datasets.synthetic import ensure_synthetic

    cfg = load_config("recipes/demo/colors.yaml", [f"data.train=[{tmp_path / 'train'}]",
                                                   f"data.eval=[{tmp_path / 'heldout'}]"])
    ensure_synthetic(cfg.data)
    manifests = [json.loads((tmp_path / split / "manifest.json").read_text()) for split in ("train", "heldout")]
    assert [(m["source"], m["count"]) for m in manifests] == [("synthetic:colors", 1024), ("synthetic:colors", 256)]
    before = (tmp_path / "train" / "manifest.json").stat().st_mtime_ns
    ensure_synthetic(cfg.data)  # present: left alone
    assert (tmp_path / "train" / "manifest.json").stat().st_mtime_ns == before


def test_a_videos_sound_track_is_refused_for_models_that_cannot_take_it():
    """video.use_audio reaches only Qwen2.5-Omni's adapter; elsewhere it would be ignored, so it is refused."""
    with pytest.raises(ConfigError, match=r"video.use_audio: qwen3_vl takes no video's sound track.*tiny:qwen2_5_omni"):
        load_config("recipes/demo/video.yaml", ["video.use_audio=true", "model.name_or_path=tiny:qwen3_vl"])
    cfg = load_config("recipes/demo/video.yaml", ["video.use_audio=true", "model.name_or_path=tiny:qwen2_5_omni"])
    assert cfg.video.use_audio
