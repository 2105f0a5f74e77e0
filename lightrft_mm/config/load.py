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
from lightrft_mm.errors import ConfigError, did_you_mean

SECTIONS = {f.name: f for f in dataclasses.fields(Config)}

# Option names of TRL (GRPOConfig), EasyR1 and verl -> this toolkit's key (`key=value` where the
# value is implied), with a note where the meaning differs. Looked up by an unknown key's full
# dotted name, then by ever shorter tails (`trainer.learning_rate` finds `learning_rate`).
# The README's table of other toolkits' names is this one; tests check every target is a field.
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "bf16": ("strategy.precision=bf16", ""),
    "fp16": ("strategy.precision=fp16", ""),
    "learning_rate": ("trainer.lr", ""),
    "optim.lr": ("trainer.lr", ""),
    "num_generations": ("rollout.n", ""),
    "max_completion_length": ("rollout.max_new_tokens", ""),
    "max_response_length": ("rollout.max_new_tokens", ""),
    "max_prompt_length": ("data.max_prompt_tokens", "longer prompts are dropped, not truncated"),
    "beta": ("algorithm.kl_coef", ""),
    "kl_loss_coef": ("algorithm.kl_coef", ""),
    "epsilon": ("algorithm.clip_eps", ""),
    "clip_ratio": ("algorithm.clip_eps", ""),
    "epsilon_high": ("algorithm.clip_eps_high", ""),
    "clip_ratio_high": ("algorithm.clip_eps_high", ""),
    "entropy_coeff": ("algorithm.entropy_coef", ""),
    "adv_estimator": ("algorithm.advantage", ""),
    "gradient_accumulation_steps": ("trainer.micro_batch_groups", "not a step count: the prompt groups per "
                                    "forward/backward; the batch is always accumulated into one optimizer step"),
    "per_device_train_batch_size": ("data.batch_size", "global here: prompts per step over all ranks, "
                                    "each sampled rollout.n times"),
    "train_batch_size": ("data.batch_size", "prompts per step over all ranks"),
    "rollout_batch_size": ("data.batch_size", "prompts per step over all ranks"),
    "max_steps": ("trainer.max_steps", ""),
    "total_training_steps": ("trainer.max_steps", ""),
    "max_train_steps": ("trainer.max_steps", ""),
    "num_train_epochs": ("trainer.max_steps", "training is counted in steps here, not epochs"),
    "total_epochs": ("trainer.max_steps", "training is counted in steps here, not epochs"),
    "seed": ("trainer.seed", ""),
    "output_dir": ("trainer.output_dir", ""),
    "default_local_dir": ("trainer.output_dir", ""),
    "save_dir": ("trainer.output_dir", ""),
    "num_iterations": ("algorithm.epochs", ""),
    "ppo_epochs": ("algorithm.epochs", ""),
    "loss_type": ("algorithm.aggregation", "or a whole preset with algorithm.name (grpo, dr_grpo, dapo, ...)"),
    "loss_agg_mode": ("algorithm.aggregation", ""),
    "temperature": ("rollout.temperature", ""),
    "top_p": ("rollout.top_p", ""),
    "top_k": ("rollout.top_k", ""),
    "repetition_penalty": ("rollout.repetition_penalty", ""),
    "weight_decay": ("trainer.weight_decay", ""),
    "max_grad_norm": ("trainer.max_grad_norm", ""),
    "grad_clip": ("trainer.max_grad_norm", ""),
    "model_name_or_path": ("model.name_or_path", ""),
    "model_path": ("model.name_or_path", ""),
    "model.path": ("model.name_or_path", ""),
    "enable_gradient_checkpointing": ("model.gradient_checkpointing", ""),
    "use_vllm": ("rollout.engine=vllm", ""),
    "vllm_gpu_memory_utilization": ("rollout.vllm.gpu_memory_utilization", ""),
    "gpu_memory_utilization": ("rollout.vllm.gpu_memory_utilization", ""),
    "tensor_model_parallel_size": ("rollout.vllm.tensor_parallel_size", ""),
    "eval_steps": ("trainer.eval_every", ""),
    "test_freq": ("trainer.eval_every", ""),
    "save_steps": ("trainer.save_every", ""),
    "save_freq": ("trainer.save_every", ""),
    "save_total_limit": ("trainer.keep_checkpoints", ""),
    "resume_from_checkpoint": ("trainer.resume", "'auto' or a checkpoint-<k> folder"),
    "report_to": ("logging.backends", ""),
    "logger": ("logging.backends", ""),
}
# Other toolkits' nested groups, whose keys are flat sections here.
FOREIGN_SECTIONS = {
    "actor_rollout_ref": "verl's nested worker keys are flat sections here (model, rollout, algorithm, trainer), "
                         "e.g. actor_rollout_ref.rollout.n is rollout.n",
    "worker": "EasyR1's nested worker keys are flat sections here (model, rollout, algorithm, trainer), "
              "e.g. worker.rollout.n is rollout.n",
}


def _foreign(name: str) -> str:
    """"'bf16' is not a key here; this toolkit calls it strategy.precision=bf16", or ""."""
    if name in FOREIGN_SECTIONS:
        return f"{FOREIGN_SECTIONS[name]}."
    parts = name.replace("[", ".").replace("]", "").split(".")
    for start in range(len(parts)):
        tail = ".".join(parts[start:])
        if tail in FOREIGN_KEYS:
            target, note = FOREIGN_KEYS[tail]
            return (f"{tail!r} is not a key here; this toolkit calls it {target}"
                    f"{f' ({note})' if note else ''}.")
    return ""


def _unknown(name: str, key: str, options, what: str = "key") -> str:
    """The problem line of an unknown key: other toolkits' names get this toolkit's, others did-you-mean."""
    return f"{name}: unknown {what}; {_foreign(name) or _suggest(key, options)}"


def _foreign_leaves(value: Any, where: str) -> list[str]:
    """Other toolkits' keys nested under an unknown key (e.g. actor_rollout_ref.actor.optim.lr)."""
    if not isinstance(value, dict):
        return []
    found = []
    for key, sub in value.items():
        name = f"{where}.{key}"
        hint = _foreign(name)
        if hint:
            found.append(f"{name}: {hint}")
        found += _foreign_leaves(sub, name)
    return found


def _suggest(name: str, options) -> str:
    """Lower-case suggestion that follows a semicolon: "did you mean 'x'?" or the known keys."""
    hint = did_you_mean(name, options).strip()
    return hint[0].lower() + hint[1:] if hint else f"known keys: {', '.join(options)}"


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


def _problem_name(parts: list) -> str:
    """["rewards", "0", "weight"] -> "rewards[0].weight", as problems name their keys."""
    name = ""
    for part in map(str, parts):
        name += f"[{part}]" if part.isdigit() else (f".{part}" if name else part)
    return name


def _yaml_lines(text: str) -> dict[str, int]:
    """Line (1-based) of every key and list item of a YAML document, by problem name."""
    lines: dict[str, int] = {}

    def walk(node, parts):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[_problem_name([*parts, key.value])] = key.start_mark.line + 1
                walk(value, [*parts, key.value])
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[_problem_name([*parts, str(i)])] = item.start_mark.line + 1
                walk(item, [*parts, str(i)])

    try:
        walk(yaml.compose(text), [])
    except yaml.YAMLError:
        pass
    return lines


def _locate(problem: str, origins: dict[str, str]) -> str:
    """Add to a problem where its key was written: an override, or a YAML file and line.

    The longest matching key wins, an override over the YAML line of the same key (it was applied last).
    """
    name = problem.split(":", 1)[0]
    best = None
    for key, where in origins.items():
        inside = name == key or name.startswith((key + ".", key + "["))
        above = key.startswith((name + ".", name + "["))  # an override below an unknown section
        if inside or above:
            rank = (len(key) if inside else 0, where.startswith("override"))
            if best is None or rank > best[0]:
                best = (rank, key, where)
    if best is None:
        return problem
    _, key, where = best
    return f"{problem} (from {where})" if where.startswith("override") else f"{problem} ({where})"


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
    else:
        if not Path(name).is_dir():
            problems.append(f"model.name_or_path: {name!r} is not a folder. Fix: a local Hugging Face "
                            "model folder (config.json + weights), or tiny:<family>.")
        if cfg.model.tiny_tokenizer != "bpe":
            problems.append("model.tiny_tokenizer: only applies to tiny: models; a model folder "
                            "brings its own tokenizer. Fix: remove it.")
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
