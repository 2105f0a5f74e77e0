"""Algorithm presets: what `algorithm.name` sets, and how explicit fields override it.

`algorithm.name` picks a row of `PRESETS`, which fills every `algorithm.*` field the config
does not set. A field the config sets replaces the preset's value, and only that value: a
preset is a set of defaults, never a constraint. Two rules keep that honest:

- `clip_eps_high`, when not set, is `clip_eps` plus the preset's clip-higher gap (0.08 for
  dapo, 1e-4 for gspo, 0 for the others), so setting `clip_eps` alone moves the whole range.
- A field that is set but has no effect with the resolved algorithm (e.g. `scale_by_std`
  with `advantage: rloo`, `kl_estimator` with `kl_coef: 0`) is a config error, unless it is
  set to the preset's own value (a saved `config.json` reloads cleanly).

This module holds plain data and imports no torch: the config module uses it.
"""

from __future__ import annotations

from typing import Any

# Choices of the algorithm fields (the torch modules import these: one list each).
ADVANTAGES = ("group", "rloo", "reinforce_pp", "reinforce_pp_baseline", "reinforce")
LOSSES = ("ppo", "gspo", "gmpo", "cpgd", "pg")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
REWARD_NORMS = ("none", "batch", "running")

# Every algorithm field's value under the grpo preset; the other presets list what they change.
BASE: dict[str, Any] = {
    "advantage": "group", "scale_by_std": True, "loss": "ppo", "aggregation": "token-mean",
    "clip_eps": 0.2, "clip_eps_high": 0.2, "dual_clip": 0.0, "epochs": 1, "mini_batches": 1,
    "kl_coef": 0.0, "kl_in": "loss", "kl_estimator": "k3", "kl_clamp": 0.0, "kl_target": 0.0,
    "kl_horizon": 10000, "drift_coef": 0.0, "dynamic_sampling": False, "dynamic_sampling_max_batches": 4,
    "overlong_filter": False, "reward_norm": "none", "reward_clip": 0.0, "adv_clip": 0.0,
    "entropy_coef": 0.0, "high_entropy_ratio": 1.0, "tis_cap": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "dr_grpo": {"scale_by_std": False, "aggregation": "seq-mean-token-sum-norm"},
    "dapo": {"clip_eps_high": 0.28, "dynamic_sampling": True, "overlong_filter": True},
    "gspo": {"loss": "gspo", "aggregation": "seq-mean-token-mean", "clip_eps": 3e-4, "clip_eps_high": 4e-4},
    "gmpo": {"loss": "gmpo", "aggregation": "seq-mean-token-mean", "clip_eps": 0.4, "clip_eps_high": 0.4},
    "reinforce_pp": {"advantage": "reinforce_pp", "kl_in": "reward", "kl_estimator": "k1"},
    "reinforce_pp_baseline": {"advantage": "reinforce_pp_baseline", "kl_estimator": "k2"},
    "rloo": {"advantage": "rloo", "aggregation": "seq-mean-token-sum", "kl_in": "reward", "kl_estimator": "k1"},
    "cpgd": {"loss": "cpgd", "scale_by_std": False, "drift_coef": 0.1},
    "reinforce": {"advantage": "reinforce", "loss": "pg", "aggregation": "seq-mean-token-sum",
                  "kl_in": "reward", "kl_estimator": "k1"},
}


class Preset:
    """The default of an algorithm field: "take it from the preset named by algorithm.name"."""

    def __init__(self, field: str):
        self.field = field

    def __repr__(self) -> str:  # shown as the default in --help and docs/config.md
        values = {name: preset_value(name, self.field) for name in PRESETS}
        if len(set(map(repr, values.values()))) == 1:
            return repr(values["grpo"])
        others = ", ".join(f"{name} {value!r}" for name, value in values.items()
                           if name != "grpo" and value != values["grpo"])
        return f"{values['grpo']!r} (preset: {others})"


def preset_value(name: str, field: str) -> Any:
    """The value the preset `name` gives `field`."""
    return PRESETS[name].get(field, BASE[field])


def resolve(name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """Every algorithm field's value: the explicit ones, the rest from the preset `name`."""
    if name not in PRESETS:
        raise KeyError(name)
    values = {field: explicit.get(field, preset_value(name, field)) for field in BASE}
    if "clip_eps_high" not in explicit:
        gap = preset_value(name, "clip_eps_high") - preset_value(name, "clip_eps")
        values["clip_eps_high"] = values["clip_eps"] + gap if "clip_eps" in explicit else preset_value(
            name, "clip_eps_high")
    return values


def _inert(v: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Fields that have no effect with the resolved values `v`: (why, what would make it act)."""
    reasons = {}
    if v["advantage"] != "group":
        reasons["scale_by_std"] = (f"only the group advantage uses it (advantage is {v['advantage']!r})",
                                   "algorithm.advantage=group")
    if v["loss"] == "pg":
        for key in ("clip_eps", "clip_eps_high"):
            reasons[key] = ("the pg loss has no ratio to clip", "a ratio loss, e.g. algorithm.loss=ppo")
    if v["loss"] not in ("ppo", "gspo"):
        reasons["dual_clip"] = (f"only the ppo and gspo losses have a dual clip (loss is {v['loss']!r})",
                                "algorithm.loss=ppo or gspo")
    if v["loss"] != "cpgd":
        reasons["drift_coef"] = (f"only the cpgd loss has a policy-drift term (loss is {v['loss']!r})",
                                 "algorithm.loss=cpgd")
    if v["kl_coef"] == 0:
        for key in ("kl_in", "kl_estimator", "kl_clamp", "kl_target", "kl_horizon"):
            reasons[key] = ("kl_coef is 0 (no KL term, no reference model)", "algorithm.kl_coef > 0, e.g. 0.01")
    elif v["kl_target"] == 0:
        reasons["kl_horizon"] = ("kl_target is 0 (a fixed KL coefficient)", "algorithm.kl_target > 0")
    if not v["dynamic_sampling"]:
        reasons["dynamic_sampling_max_batches"] = ("dynamic_sampling is off", "algorithm.dynamic_sampling=true")
    return reasons


def problems(name: str, explicit: dict[str, Any], v: dict[str, Any], *, batch_size: int) -> list[str]:
    """Config problems of the resolved algorithm `v` (as `algorithm.<field>: ...` lines)."""
    found = []
    for field, (reason, needs) in _inert(v).items():
        if field in explicit and explicit[field] != resolve(name, {})[field]:
            found.append(f"algorithm.{field}: set to {explicit[field]!r} but has no effect: {reason}. Fix: remove "
                         f"it, or set {needs}.")
    if v["dual_clip"] != 0 and v["dual_clip"] <= 1:
        found.append(f"algorithm.dual_clip: {v['dual_clip']!r} must be > 1 (it caps the loss of a negative "
                     "advantage at dual_clip * |A|). Fix: e.g. 3.0, or 0 to turn it off.")
    for key in ("epochs", "mini_batches"):
        if v["loss"] == "pg" and v[key] > 1:
            found.append(f"algorithm.{key}: {v[key]} with the pg loss: every update after the first would use "
                         "samples of an older policy without an importance ratio. Fix: epochs=1 and "
                         "mini_batches=1, or a ratio loss (loss=ppo).")
    if v["mini_batches"] > batch_size:
        found.append(f"algorithm.mini_batches: {v['mini_batches']} mini-batches cannot split {batch_size} prompts "
                     "(a mini-batch holds whole groups). Fix: at most data.batch_size.")
    if not 0 < v["high_entropy_ratio"] <= 1:
        found.append(f"algorithm.high_entropy_ratio: {v['high_entropy_ratio']!r} must be in (0, 1]. Fix: e.g. "
                     "0.2 (the paper's), or 1 for every token.")
    return found
