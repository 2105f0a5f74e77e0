"""Where a config's keys come from and what other toolkits call them: the option names of TRL,
EasyR1 and verl mapped to this toolkit's keys (`FOREIGN_KEYS`), the problem lines of unknown keys,
and the YAML file:line or override each problem's key was written in."""

from __future__ import annotations

from typing import Any

import yaml

from lightrft_mm.errors import did_you_mean

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
