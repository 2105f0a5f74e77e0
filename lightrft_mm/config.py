"""Typed configuration: one frozen dataclass per section, YAML files plus `key.sub=value`.

Every default lives in the dataclass and every field is documented once, in its `help`
metadata; `lightrft-mm train --help` is generated from it. `load_config` reports every
problem of a config at once (unknown keys with did-you-mean, wrong types, values out of
range), each with the value, why it is wrong and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightrft_mm.algorithms import presets
from lightrft_mm.algorithms.presets import Preset
from lightrft_mm.errors import ConfigError, did_you_mean


def opt(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
        high: float | None = None) -> Any:
    """A config field: its default, its one-place documentation and its allowed values."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = opt("tiny:qwen2_5_vl", "A local Hugging Face model folder, or tiny:<family> "
                            "(qwen2_vl, qwen2_5_vl, llava, llava_next, qwen2_audio, qwen2) built offline "
                            "with random weights.")
    tiny_tokenizer: str = opt("bpe", "Tokenizer of a tiny: model: bpe (small, trained on the fly, fast) "
                              "or qwen (the real 151k Qwen tokenizer; ~30x slower on CPU).",
                              choices=("bpe", "qwen"))
    trust_remote_code: bool = opt(False, "Allow model code from the model folder (only for folders you trust).")
    dtype: str = opt("float32", "Parameter dtype of the policy.", choices=("float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class DataConfig:
    train: list = opt([], "Prepared shard folders (or .jsonl files) of training Samples.")
    eval: list = opt([], "Prepared shard folders (or .jsonl files) for held-out evaluation.")
    batch_size: int = opt(16, "Prompts per training step (each sampled rollout.n times).", low=1)
    weights: list = opt([], "Mixing weight of each data.train folder, in order (numbers >= 0): each "
                        "prompt of a batch comes from folder i with probability weights[i] / sum. "
                        "Empty = pool all folders, every sample equally likely.")
    max_prompt_tokens: int = opt(0, "Drop training samples whose prompt (chat template, text and media "
                                 "tokens, as the model's processor encodes it) is longer than this; "
                                 "the count is logged as data/filtered_long (0 = keep all).", low=0)
    eval_max_samples: int = opt(0, "Evaluate on at most this many held-out samples (0 = all).", low=0)
    system_prompt: str = opt("", "System message added to samples that have none (empty = none).")
    on_media_error: str = opt("skip", "A training sample whose media fails to decode: skip it (counted "
                              "in data/skipped_media) or fail the run.", choices=("skip", "fail"))


@dataclass(frozen=True)
class ImageConfig:
    max_pixels_guard: int = opt(100_000_000, "Refuse an image whose header declares more pixels than this, "
                                "before decoding it (decompression bombs).", low=1)


@dataclass(frozen=True)
class VideoConfig:
    backend: str = opt("auto", "Video decoder: decord, pyav, or auto (decord, then PyAV).",
                       choices=("auto", "decord", "pyav"))
    fps: float = opt(2.0, "Frames sampled per second of video (a part's own fps wins).", low=1e-3)
    max_frames: int = opt(32, "Most frames sampled from one video (a part's own max_frames wins).", low=1)


@dataclass(frozen=True)
class AudioConfig:
    max_seconds: float = opt(30.0, "Longest audio clip accepted, in seconds.", low=1e-3)
    on_too_long: str = opt("clip", "An audio clip over max_seconds: clip it to max_seconds or fail.",
                           choices=("clip", "fail"))


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = opt("hf", "Rollout engine: hf (transformers generate, CPU or GPU).", choices=("hf",))
    n: int = opt(8, "Completions sampled per prompt (the GRPO group size).", low=2)
    max_new_tokens: int = opt(64, "Longest completion, in tokens.", low=1)
    temperature: float = opt(1.0, "Sampling temperature.", low=1e-3)
    top_p: float = opt(1.0, "Nucleus sampling mass (1.0 = off).", low=1e-3, high=1.0)
    top_k: int = opt(0, "Sample among the k most likely tokens (0 = off).", low=0)
    fire_temperature: float = opt(0.0, "FIRE sampling: the first completion token is drawn at this temperature, "
                                  "the rest at rollout.temperature; log-probs (sampling, old, reference) use the "
                                  "same per-position temperatures. 0 = off.", low=0.0)


@dataclass(frozen=True)
class RewardSpec:
    name: str = opt("", "Registered reward name (lightrft-mm rewards list), 'package.module:function', "
                    "'path/file.py:function', or an installed package's entry point (group lightrft_mm.rewards).")
    weight: float = opt(1.0, "Weight of this reward in the combined reward (see scoring.combine).")
    sources: list = opt([], "Route this reward to the samples whose `source` is in this list (e.g. [geo3k]); "
                        "empty = every sample. A source no training or eval sample has is an error.")
    timeout: float = opt(300.0, "Seconds this reward may spend on one step's batch; past it the completions it "
                         "has not scored get None (counted in reward/<name>/timeouts). 0 = no limit.", low=0.0)
    args: dict = opt({}, "Keyword arguments of a reward factory: e.g. {model: path} for scalar_rm / "
                     "generative_rm, {url: ...} for remote_rm, {max_length: 64} for overlong (`lightrft-mm "
                     "rewards list -v` lists each factory's args). A plain reward function takes none.")
    label: str = opt("", "Name of this reward in metrics and tables (default: the name; 'file.py:fn' gives "
                     "'fn'). Needed to list one reward twice.")


@dataclass(frozen=True)
class ScoringConfig:
    combine: str = opt("sum_then_normalize", "How the rewards combine: sum_then_normalize (weighted sum of the raw "
                       "rewards; the algorithm normalises it per group) or normalize_then_sum (each reward first "
                       "normalised within its group, (r - mean) / std, then the weighted sum; GDPO).",
                       choices=("sum_then_normalize", "normalize_then_sum"))
    fail_fast: bool = opt(False, "Stop the run with a RewardError when a reward raises, times out or returns a "
                          "bad value (default: that completion's reward is None, counted in reward/errors and "
                          "reward/timeouts, the first traceback logged).")


@dataclass(frozen=True)
class AlgorithmConfig:
    """The policy-gradient algorithm. `name` picks a preset that fills every field left unset;
    a field you set replaces the preset's value and nothing else (see docs/algorithms.md)."""

    name: str = opt("grpo", "Algorithm preset: sets the defaults of every other algorithm field (see "
                    "docs/algorithms.md); fields you set override it one by one. A field you set that has no "
                    "effect with the result is an error, unless it equals the preset's value.",
                    choices=tuple(presets.PRESETS))
    advantage: str = opt(Preset("advantage"), "Advantage estimator: group (reward minus group mean, over the "
                         "group std if scale_by_std), rloo (minus the mean of the other completions), "
                         "reinforce_pp (token returns whitened over the batch), reinforce_pp_baseline (group "
                         "mean subtracted, then the same), reinforce (the raw reward).", choices=presets.ADVANTAGES)
    scale_by_std: bool = opt(Preset("scale_by_std"), "group advantage: divide by the group std (false = Dr.GRPO).")
    loss: str = opt(Preset("loss"), "Policy loss: ppo (token ratio clip), gspo (one length-normalised ratio per "
                    "sequence), gmpo (geometric mean of token ratios, clipped in log space), cpgd (clipped "
                    "log-ratio policy gradient + drift_coef * KL(old || new)), pg (vanilla -A log pi).",
                    choices=presets.LOSSES)
    aggregation: str = opt(Preset("aggregation"), "How per-token terms become the loss: token-mean (all tokens "
                           "weigh the same), seq-mean-token-mean (each completion weighs the same), "
                           "seq-mean-token-sum (summed over the completion), seq-mean-token-sum-norm (summed, "
                           "divided by rollout.max_new_tokens; Dr.GRPO).", choices=presets.AGGREGATIONS)
    clip_eps: float = opt(Preset("clip_eps"), "Lower clip epsilon: ratio >= 1 - clip_eps (ppo, gspo); log-ratio "
                          ">= -clip_eps (gmpo); log-ratio >= log(1 - clip_eps) (cpgd).", low=0.0, high=1.0)
    clip_eps_high: float = opt(Preset("clip_eps_high"), "Upper clip epsilon (DAPO's clip-higher when above "
                               "clip_eps). Unset: clip_eps plus the preset's gap (0.08 dapo, 1e-4 gspo, else 0).",
                               low=0.0)
    dual_clip: float = opt(Preset("dual_clip"), "Dual-clip constant c > 1 (ppo, gspo): a negative advantage's loss "
                           "is capped at c * |A| however large the ratio (0 = off).", low=0.0)
    epochs: int = opt(Preset("epochs"), "Optimisation passes over each rollout batch. With 1 pass and 1 mini-batch "
                      "the ratio to the sampling policy is 1; later updates are off-policy and the clip acts.", low=1)
    mini_batches: int = opt(Preset("mini_batches"), "Optimizer steps per pass: the batch's prompt groups are split "
                            "into this many mini-batches.", low=1)
    kl_coef: float = opt(Preset("kl_coef"), "KL coefficient beta towards the frozen reference (the model after "
                         "warm-up). 0 = no KL term and no reference model.", low=0.0)
    kl_in: str = opt(Preset("kl_in"), "Where the KL goes: loss (beta * KL added to the loss, GRPO) or reward "
                     "(beta * KL of the sampling policy subtracted from the rewards before the advantages: "
                     "per token for reinforce_pp*, summed over the completion otherwise).", choices=("loss", "reward"))
    kl_estimator: str = opt(Preset("kl_estimator"), "KL estimator of d = logp - ref_logp: k1 = d, k2 = d^2 / 2, "
                            "k3 = exp(-d) - 1 + d.", choices=presets.KL_ESTIMATORS)
    kl_clamp: float = opt(Preset("kl_clamp"), "Clamp each token's KL estimate to [-kl_clamp, kl_clamp] (0 = no "
                          "clamp; k3 with 10 is the 'low-variance KL' of some frameworks).", low=0.0)
    kl_target: float = opt(Preset("kl_target"), "Adaptive KL controller (Ziegler et al. 2019): after each step, steer "
                           "kl_coef so the step's KL estimate (loss/kl) approaches this value (0 = fixed).", low=0.0)
    kl_horizon: int = opt(Preset("kl_horizon"), "Adaptive KL controller horizon, in completions: larger adapts "
                          "kl_coef more slowly.", low=1)
    drift_coef: float = opt(Preset("drift_coef"), "cpgd: weight of the policy-drift term KL(pi_old || pi).", low=0.0)
    dynamic_sampling: bool = opt(Preset("dynamic_sampling"), "DAPO dynamic sampling: drop prompt groups whose "
                                 "rewards are all equal and sample more prompts until the batch is full.")
    dynamic_sampling_max_batches: int = opt(Preset("dynamic_sampling_max_batches"), "Most rollout batches sampled "
                                            "per step to fill it; then train on what was kept (the kept fraction "
                                            "is logged as sampling/kept_fraction).", low=1)
    overlong_filter: bool = opt(Preset("overlong_filter"), "Leave completions cut at rollout.max_new_tokens "
                                "(no end-of-turn) out of the loss (DAPO); logged as completion/truncated.")
    reward_norm: str = opt(Preset("reward_norm"), "Normalise rewards to mean 0, std 1 before the advantages: over "
                           "the batch, or running statistics of the whole run; none = off.",
                           choices=presets.REWARD_NORMS)
    reward_clip: float = opt(Preset("reward_clip"), "Clip rewards (after normalisation) to [-c, c] (0 = off).",
                             low=0.0)
    adv_clip: float = opt(Preset("adv_clip"), "Clip advantages to [-c, c] (0 = off).", low=0.0)
    entropy_coef: float = opt(Preset("entropy_coef"), "Weight of the entropy bonus (keeps every answer sampled).",
                              low=0.0)
    high_entropy_ratio: float = opt(Preset("high_entropy_ratio"), "Train the policy term only on this fraction of "
                                    "the batch's tokens with the highest entropy (Wang et al. 2025 use 0.2); "
                                    "1 = every token.", low=0.0, high=1.0)
    tis_cap: float = opt(Preset("tis_cap"), "Truncated importance sampling: weight each token's policy term by "
                         "min(pi_old / pi_rollout, tis_cap), with pi_old recomputed by the trainer (0 = off; "
                         "matters when the rollout engine's log-probs differ from the trainer's).", low=0.0)

    def __post_init__(self):
        explicit = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "name" and not isinstance(getattr(self, f.name), Preset)}
        if self.name not in presets.PRESETS:
            raise ConfigError(f"algorithm.name: {self.name!r} is not one of {', '.join(presets.PRESETS)}."
                              f"{did_you_mean(self.name, presets.PRESETS)}")
        for key, value in presets.resolve(self.name, explicit).items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_explicit", explicit)

    def problems(self, cfg: "Config") -> list[str]:
        """Problems of the resolved algorithm with the rest of the config (see presets.problems)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        found = presets.problems(self.name, self._explicit, values, batch_size=cfg.data.batch_size)
        if 0 < cfg.rollout.fire_temperature < 1e-3:
            found.append(f"rollout.fire_temperature: {cfg.rollout.fire_temperature!r} is too close to 0. Fix: "
                         "0 (off) or a temperature >= 1e-3, e.g. 2.0.")
        return found


@dataclass(frozen=True)
class StrategyConfig:
    name: str = opt("single", "Training strategy: single (one process).", choices=("single",))
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available).", choices=("auto", "cpu", "cuda"))


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = opt(100, "GRPO steps (one rollout batch and one optimizer step each).", low=1)
    seed: int = opt(0, "Seed of the model init, data order and sampling.")
    micro_batch_groups: int = opt(0, "Prompt groups (n completions each) per forward/backward pass; the "
                                  "passes of a mini-batch accumulate into one optimizer step with the same "
                                  "result. Groups are bucketed by length, so each pass pads little. 0 = one "
                                  "pass per mini-batch. Lower it when activations do not fit in memory.", low=0)
    encode_prompts_once: bool = opt(True, "Encode each prompt once per group of n completions: one prefill "
                                    "(media included) whose KV cache is copied to the n completions, and "
                                    "one vision-feature pass per prompt in the training forward (gradients "
                                    "flow back through it). false: every completion re-encodes its own copy "
                                    "(slower, same numbers).")
    output_dir: str = opt("runs/default", "Run folder: metrics.jsonl, curves.png, checkpoints.")
    lr: float = opt(1e-5, "AdamW learning rate.", low=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", low=0.0, high=1.0)
    adam_beta2: float = opt(0.999, "AdamW beta2 (0.99 reacts faster; steadier on tiny models).",
                            low=0.0, high=1.0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay.", low=0.0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = no clipping).", low=0.0)
    eval_every: int = opt(0, "Greedy held-out evaluation every k steps (0 = only before and after).", low=0)
    save_every: int = opt(0, "Save a checkpoint every k steps (0 = only the final one).", low=0)
    accuracy_reward: str = opt("exact_match", "Reward whose mean greedy held-out score is reported "
                               "as eval/accuracy (it need not be among the training rewards).")
    overwrite: bool = opt(False, "Allow writing into an output_dir that already holds a run.")


@dataclass(frozen=True)
class WarmupConfig:
    steps: int = opt(0, "Supervised format warm-up steps before RL (0 = none). The targets are a "
                     "random one of each sample's `choices`, never its answer: only the format is taught.",
                     low=0)
    lr: float = opt(1e-3, "Learning rate of the warm-up.", low=0.0)
    batch_size: int = opt(16, "Samples per warm-up step.", low=1)
    template: str = opt("{answer}", "Completion text of a warm-up target; the text {answer} is replaced "
                       "by the drawn choice, so \\boxed{{answer}} gives \\boxed{red}.")


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = opt(True, "Show a progress bar with reward and ETA.")
    plot: bool = opt(True, "Write curves.png (reward and accuracy per step) into the run folder.")
    completions: int = opt(2, "Completions per step written to trajectories.jsonl (0 = none).", low=0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list = field(default_factory=list)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _suggest(name: str, options) -> str:
    """Lower-case suggestion that follows a semicolon: "did you mean 'x'?" or the known keys."""
    hint = did_you_mean(name, options).strip()
    return hint[0].lower() + hint[1:] if hint else f"known keys: {', '.join(options)}"


def _coerce(value: Any, typ: Any, where: str, problems: list[str]) -> Any:
    """Convert a YAML / command-line value to the field's type, or record why it cannot be."""
    origin = typing.get_origin(typ)
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
            problems.append(f"{name}: unknown key; {_suggest(str(key), fields)}")
            continue
        n_before = len(problems)
        value = _coerce(value, hints[key], name, problems)
        if len(problems) > n_before:
            continue
        meta = fields[key].metadata
        if meta.get("choices") and value not in meta["choices"]:
            problems.append(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}."
                            f"{did_you_mean(value, meta['choices'])}")
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


def build_config(raw: dict, *, source: str = "config") -> Config:
    """Build and validate a Config from a dict; raise one ConfigError listing every problem."""
    problems: list[str] = []
    sections = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section; {_suggest(str(key), SECTIONS)}")
        elif key == "rewards":
            sections[key] = _build_rewards(value, problems)
        else:
            sections[key] = _build(SECTIONS[key].default_factory().__class__, value, key, problems)
    cfg = Config(**sections)
    problems += _cross_checks(cfg)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
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
    if cfg.warmup.steps and "{answer}" not in cfg.warmup.template:
        problems.append(f"warmup.template: {cfg.warmup.template!r} lacks {{answer}}. Fix: e.g. '\\\\boxed{{{{answer}}}}'.")
    return problems


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply `section.key=value` overrides, build and validate."""
    raw = read_yaml(path) if path else {}
    raw = apply_overrides(raw, list(overrides or []))
    return build_config(raw, source=str(path or "config"))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """Every config key with its type, default and documentation (for --help and docs)."""
    lines = []
    for section, f in SECTIONS.items():
        cls = RewardSpec if section == "rewards" else f.default_factory().__class__
        title = f"{section}: (a list of)" if section == "rewards" else f"{section}:"
        lines.append(title)
        hints = typing.get_type_hints(cls)
        for sub in dataclasses.fields(cls):
            typ = getattr(hints[sub.name], "__name__", str(hints[sub.name]))
            default = sub.default if sub.default is not dataclasses.MISSING else sub.default_factory()
            choices = sub.metadata.get("choices")
            extra = f" One of: {', '.join(choices)}." if choices else ""
            lines.append(f"  {section}.{sub.name} ({typ}, default {default!r}): {sub.metadata['help']}{extra}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lightrft_mm.config > docs/config.md
    print("# Config reference\n\nGenerated by `python -m lightrft_mm.config > docs/config.md` from the "
          "dataclasses in `lightrft_mm/config.py`; a test keeps it current.\n\n```text")
    print(help_text())
    print("```")
