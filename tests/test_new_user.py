"""What a new user runs into first: the demo's task, other toolkits' key names, where a typo is."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from lightrft_mm.config import Config, load_config
from lightrft_mm.config.load import FOREIGN_KEYS
from lightrft_mm.datasets.synthetic import ensure_synthetic
from lightrft_mm.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
VIDEO = str(ROOT / "recipes/demo/video.yaml")


def test_demo_without_task_trains_the_recipes_task(monkeypatch):
    import lightrft_mm.trainer.loop as loop
    from lightrft_mm.cli import build_parser
    from lightrft_mm.demo import run_demo

    args = build_parser().parse_args(["demo", VIDEO])
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return {"before": 0.25, "after": 0.25, "heldout": 1, "trained": "x"}

    monkeypatch.setattr(loop, "train", fake_train)
    run_demo(args.config, args.overrides, task=args.task)
    assert seen["cfg"].data.synthetic == "moving_dot"


def _data(tmp_path, task="moving_dot"):
    return load_config(None, [f"data.synthetic={task}", f"data.train=[{tmp_path / 'train'}]"]).data


def test_ensure_synthetic_refuses_another_tasks_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"source": "synthetic:colors"}))
    with pytest.raises(DataError) as e:
        ensure_synthetic(_data(tmp_path))
    text = str(e.value)
    assert str(tmp_path / "train") in text and "'synthetic:colors'" in text and "'synthetic:moving_dot'" in text
    assert "delete" in text and "data.train" in text


def test_ensure_synthetic_reuses_its_own_tasks_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"source": "synthetic:moving_dot"}))
    ensure_synthetic(_data(tmp_path))  # nothing generated, nothing refused
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["manifest.json"]


@pytest.mark.parametrize("override,pointer", [
    ("trainer.bf16=true", "this toolkit calls it strategy.precision=bf16"),
    ("trainer.learning_rate=1e-5", "this toolkit calls it trainer.lr"),
    ("rollout.num_generations=4", "this toolkit calls it rollout.n"),
    ("trainer.num_train_epochs=3", "this toolkit calls it trainer.max_steps"),
    ("trainer.per_device_train_batch_size=8", "this toolkit calls it data.batch_size (global here"),
    ("algorithm.beta=0.04", "this toolkit calls it algorithm.kl_coef"),
    ("bf16=true", "this toolkit calls it strategy.precision=bf16"),
    ("actor_rollout_ref.actor.optim.lr=1e-6", "this toolkit calls it trainer.lr"),
    ("actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.n is rollout.n"),
])
def test_other_toolkits_keys_point_to_ours(override, pointer):
    with pytest.raises(ConfigError, match="is not a key here|flat sections here") as e:
        load_config(None, [override])
    assert pointer in str(e.value)


def test_foreign_key_in_yaml_points_to_ours(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("trainer:\n  bf16: true\n")
    with pytest.raises(ConfigError, match="this toolkit calls it strategy.precision=bf16"):
        load_config(path)


def _fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_foreign_key_target_is_a_config_field():
    known = dict(_fields(Config))
    for name, (target, _) in FOREIGN_KEYS.items():
        key, _, value = target.partition("=")
        assert key in known, f"FOREIGN_KEYS[{name!r}] -> {key!r} is not a config field"
        if value:  # the implied value is one the field takes (strategy.precision=bf16)
            assert value in known[key].metadata["choices"], target


def test_override_typo_names_the_override_not_the_file():
    with pytest.raises(ConfigError) as e:
        load_config(str(ROOT / "recipes/demo/colors.yaml"), ["trainer.lrr=1e-5"])
    problem = str(e.value).splitlines()[1]
    assert problem == "  - trainer.lrr: unknown key; did you mean 'lr'? (from override 'trainer.lrr=1e-5')"
    assert str(e.value).startswith(f"{ROOT / 'recipes/demo/colors.yaml'} with overrides: 1 problem(s)")


def test_yaml_typo_names_the_file_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: tiny:qwen2_5_vl\ntrainer:\n  lrr: 1e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["trainer.max_steps=3"])
    assert f"  - trainer.lrr: unknown key; did you mean 'lr'? ({path}:4)" in str(e.value).splitlines()
