"""Reading configs: YAML files plus `key.sub=value` overrides, coerced to the section types and
validated. `load_config` reports every problem of a config at once (unknown keys with
did-you-mean, wrong types, values out of range, combinations that cannot work), each with the
value, why it is wrong and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from lightrft_mm.config.sections import Config, RewardSpec
from lightrft_mm.config.foreign import (FOREIGN_KEYS, FOREIGN_SECTIONS, _foreign_leaves, _locate, _problem_name,
                                        _unknown, _yaml_lines)
from lightrft_mm.errors import ConfigError, did_you_mean

SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
__all__ = ["FOREIGN_KEYS", "SECTIONS", "apply_overrides", "build_config", "help_text", "load_config",
           "parse_override", "read_yaml", "to_dict"]


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    """Convert a YAML / command-line value to the field's type, or record why it cannot be."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):  # a nested section, e.g. model.lora
        return _build(typ, value, where, problems)
    if typ is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: {value!r} is not a boolean. Fix: write true or false.")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{where}: {value!r} is not an integer. Fix: write a whole number, e.g. 8.")
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        problems.append(f"{where}: {value!r} is not a finite number. Fix: write a number, e.g. 1e-5.")
    elif typ is str:
        if isinstance(value, str):
            return value
        problems.append(f"{where}: {value!r} is not a string. Fix: quote it.")
    elif typ is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
        problems.append(f"{where}: {value!r} is not a list. Fix: write [a, b] or a YAML list.")
    return None


def _build(cls, raw: Any, where: str, problems: list[str]):
    """Build dataclass `cls` from a dict, recording unknown keys, wrong types and bad values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {raw!r}. Fix: write `{where}: {{key: value}}`.")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            problems.append(_unknown(name, str(key), fields))
            continue
        n_before = len(problems)
        value = _coerce(value, hints[key], name, problems)
        if len(problems) > n_before:
            continue
        meta = fields[key].metadata
        if meta.get("choices") and value not in meta["choices"]:
            names = [str(c) for c in meta["choices"]]
            problems.append(f"{name}: {value!r} is not one of {', '.join(names)}.{did_you_mean(str(value), names)}")
            continue
        if meta.get("low") is not None and value < meta["low"]:
            problems.append(f"{name}: {value!r} is below the minimum {meta['low']}. Fix: use a value >= {meta['low']}.")
            continue
        if meta.get("high") is not None and value > meta["high"]:
            problems.append(f"{name}: {value!r} is above the maximum {meta['high']}. Fix: use a value <= {meta['high']}.")
            continue
        values[key] = value
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '='. Fix: write section.key=value, e.g. trainer.max_steps=10.")
    key, _, value = text.partition("=")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides to a copy of raw; a number indexes a list (`rewards.0.weight=0.5`)."""
    import copy

    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {'.'.join(path[:depth])} is a list of {len(node)}; "
                                      f"{part!r} is not an index in it. Fix: use 0..{len(node) - 1}, or "
                                      "override the whole list, e.g. rewards=[{name: exact_match}].")
                key = int(part)
                if isinstance(node[key], str) and not last:
                    node[key] = {"name": node[key]}  # reward shorthand "exact_match"
            else:
                key = part
                if not last and not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
            if last:
                node[key] = value
            else:
                node = node[key]
    return raw


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist. Fix: pass the path of a YAML config, "
                          "e.g. recipes/demo/colors.yaml.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...).")
    return raw


def build_config(raw: dict, *, source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """Build and validate a Config from a dict; raise one ConfigError listing every problem.

    Args:
        origins: Problem name of a key (`trainer.lr`, `rewards[0].weight`) -> where it was written
            (`override 'trainer.lr=1'`, `path.yaml:12`); problems about that key end with it.
    """
    problems: list[str] = []
    sections = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            problems.append(_unknown(str(key), str(key), SECTIONS, "section"))
            problems += _foreign_leaves(value, str(key)) if key in FOREIGN_SECTIONS else []
        elif key == "rewards":
            sections[key] = _build_rewards(value, problems)
        else:
            sections[key] = _build(SECTIONS[key].default_factory().__class__, value, key, problems)
    cfg = Config(**sections)
    problems += _cross_checks(cfg)
    if problems:
        lines = "\n".join(f"  - {_locate(p, origins or {})}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n{lines}")
    return cfg


def _build_rewards(value: Any, problems: list[str]) -> list[RewardSpec]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        problems.append(f"rewards: {value!r} is not a list. Fix: rewards: [{{name: math_accuracy, weight: 1.0}}]")
        return []
    specs = []
    for i, item in enumerate(value):
        item = {"name": item} if isinstance(item, str) else item
        args = None
        if isinstance(item, dict):  # args is free-form: checked here, not by _build
            item = dict(item)
            args = item.pop("args", None)
        spec = _build(RewardSpec, item, f"rewards[{i}]", problems)
        if args is not None:
            if isinstance(args, dict) and all(isinstance(k, str) for k in args):
                spec = dataclasses.replace(spec, args=dict(args))
            else:
                problems.append(f"rewards[{i}].args: {args!r} is not a mapping of names to values. "
                                "Fix: args: {model: path/to/model}.")
        if not spec.name:
            problems.append(f"rewards[{i}].name: missing. Fix: name a registered reward (lightrft-mm rewards list).")
        bad = [s for s in spec.sources if not isinstance(s, str) or not s]
        if bad:
            problems.append(f"rewards[{i}].sources: {bad!r} are not source names. Fix: a list of strings, "
                            "e.g. [geo3k].")
        specs.append(spec)
    return specs


def _cross_checks(cfg: Config) -> list[str]:
    """Checks that involve several fields or registries."""
    from lightrft_mm.rewards import config_problems

    problems = config_problems(cfg.rewards, cfg.trainer.accuracy_reward)
    from lightrft_mm.datasets.loader import weight_problems

    problems += weight_problems(cfg.data.weights, len(cfg.data.train))
    problems += cfg.algorithm.problems(cfg)
    if cfg.data.synthetic:
        from lightrft_mm.datasets.synthetic import TASKS

        if cfg.data.synthetic not in TASKS:
            problems.append(f"data.synthetic: unknown task {cfg.data.synthetic!r}. Known: {', '.join(TASKS.names())}."
                            f"{did_you_mean(cfg.data.synthetic, TASKS.names())}")
        elif not cfg.data.train:
            problems.append("data.synthetic: names no folder to generate into. Fix: data.train=[runs/my-data/train] "
                            "(and data.eval for the held-out split).")
    from lightrft_mm.strategy import strategy_problems

    problems += strategy_problems(cfg)
    from lightrft_mm.rollout.vllm import config_problems as engine_problems

    problems += engine_problems(cfg)
    from lightrft_mm.trainer.backends import backend_problems

    problems += backend_problems(cfg.logging.backends)
    t = cfg.trainer
    if t.resume and t.overwrite:
        problems.append("trainer.resume: set together with trainer.overwrite, which would delete the run to resume. "
                        "Fix: remove trainer.overwrite.")
    if t.resume not in ("", "auto") and not Path(t.resume).is_dir():
        problems.append(f"trainer.resume: {t.resume!r} is not a checkpoint folder. Fix: 'auto' (the newest of "
                        "trainer.output_dir) or a checkpoint-<k> folder.")
    if t.keep_checkpoints and not t.save_every:
        problems.append("trainer.keep_checkpoints: set, but trainer.save_every is 0 (only the final checkpoint is "
                        "written). Fix: set trainer.save_every, or remove trainer.keep_checkpoints.")
    name = cfg.model.name_or_path
    if name.startswith("tiny:"):
        from lightrft_mm.models.tiny import FAMILIES

        family = name[len("tiny:"):]
        if family not in FAMILIES:
            problems.append(f"model.name_or_path: unknown tiny family {family!r}."
                            f"{did_you_mean(family, FAMILIES, prefix='tiny:')} "
                            f"Known: {', '.join('tiny:' + f for f in FAMILIES)}.")
        if cfg.model.revision:
            problems.append("model.revision: only applies to Hub ids; a tiny: model is built offline. Fix: remove it.")
    else:
        from lightrft_mm.models.hub import reference_problem

        if problem := reference_problem(name, cfg.model.revision):  # its form: weights may come later
            problems.append(problem)
        if cfg.model.tiny_tokenizer != "bpe":
            problems.append("model.tiny_tokenizer: only applies to tiny: models; a model folder "
                            "brings its own tokenizer. Fix: remove it.")
    from lightrft_mm.strategy import model_type_of

    kind = model_type_of(name, cfg.model.revision) if cfg.video.use_audio or cfg.trainer.padding_free else ""
    if cfg.trainer.padding_free:
        from lightrft_mm.processors.qwen3_5 import LINEAR_ATTENTION_MODEL_TYPES

        if kind in LINEAR_ATTENTION_MODEL_TYPES:
            problems.append(f"trainer.padding_free: {kind} has linear-attention (Gated DeltaNet) layers, whose "
                            "convolution and recurrent state run along the sequence: without the fla / causal-conv1d "
                            "varlen kernels packed rows would flow into each other. Fix: trainer.padding_free=false "
                            "for this model.")
    if cfg.video.use_audio:
        if kind and kind not in AUDIO_IN_VIDEO:
            problems.append(f"video.use_audio: {kind} takes no video's sound track; Qwen2.5-Omni does "
                            "(tiny:qwen2_5_omni). Fix: video.use_audio=false, or give the sound as an audio part.")
    from lightrft_mm.models.trainable import PARTS

    unknown = [x for x in cfg.model.freeze if x not in PARTS]
    if unknown:
        problems.append(f"model.freeze: {unknown!r} are not parts. Fix: any of {', '.join(PARTS)}.")
    elif set(cfg.model.freeze) == set(PARTS):
        problems.append("model.freeze: every part is frozen, nothing would train. Fix: leave at least one out.")
    problems += _lora_problems(cfg.model, PARTS)
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package (and a GPU). "
                        "Fix: pip install flash-attn, or model.attn_implementation=sdpa.")
    if cfg.warmup.steps and "{answer}" not in cfg.warmup.template:
        problems.append(f"warmup.template: {cfg.warmup.template!r} lacks {{answer}}. Fix: e.g. '\\\\boxed{{{{answer}}}}'.")
    return problems


# Model types (and tiny families) that interleave a video's sound with its frames (video.use_audio).
AUDIO_IN_VIDEO = ("qwen2_5_omni", "qwen2_5_omni_thinker")


def _lora_problems(model, parts) -> list[str]:
    lora = model.lora
    if not lora.r:
        default = type(lora)()
        changed = [f.name for f in dataclasses.fields(lora) if getattr(lora, f.name) != getattr(default, f.name)]
        return [f"model.lora.{name}: set, but LoRA is off (model.lora.r is 0). Fix: model.lora.r=8, or remove it."
                for name in changed]
    problems = []
    unknown = [x for x in lora.parts if x not in parts]
    if unknown or not lora.parts:
        problems.append(f"model.lora.parts: {unknown or lora.parts!r} are not parts. Fix: any of {', '.join(parts)}.")
    if model.freeze:
        problems.append("model.freeze: with LoRA every base weight is already frozen and only adapters train. "
                        "Fix: remove model.freeze; choose where adapters go with model.lora.parts.")
    if importlib.util.find_spec("peft") is None:
        problems.append("model.lora.r: LoRA needs peft, which is not installed. Fix: pip install 'lightrft_mm[lora]'.")
    return problems


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply `section.key=value` overrides, build and validate."""
    raw = read_yaml(path) if path else {}
    origins = {}
    if path:
        origins = {name: f"{path}:{line}" for name, line in _yaml_lines(Path(path).read_text()).items()}
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    for text in overrides:
        origins[_problem_name(parse_override(text)[0])] = f"override {text!r}"
    source = str(path or "config") + (" with overrides" if overrides else "")
    return build_config(raw, source=source, origins=origins)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """Every config key with its type, default and documentation (for --help and docs)."""
    lines = []
    for section, f in SECTIONS.items():
        cls = RewardSpec if section == "rewards" else f.default_factory().__class__
        lines.append(f"{section}: (a list of)" if section == "rewards" else f"{section}:")
        lines += _field_lines(cls, section)
    return "\n".join(lines)


def _field_lines(cls, prefix: str) -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for sub in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[sub.name]):
            lines += _field_lines(hints[sub.name], f"{prefix}.{sub.name}")
            continue
        typ = getattr(hints[sub.name], "__name__", str(hints[sub.name]))
        default = sub.default if sub.default is not dataclasses.MISSING else sub.default_factory()
        choices = sub.metadata.get("choices")
        extra = f" One of: {', '.join(map(str, choices))}." if choices else ""
        lines.append(f"  {prefix}.{sub.name} ({typ}, default {default!r}): {sub.metadata['help']}{extra}")
    return lines
