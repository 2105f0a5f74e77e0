"""Trajectories: every `logging.trajectories_every` steps each prompt group of the step goes to
`<output_dir>/trajectories/step-<step:06d>.jsonl` (one JSON line per group; `lightrft-mm view`
reads them), and every `logging.rollouts_every` steps a few of the same records go to the
logging backends as images, text and tables.

A record (one prompt group)::

    {"step": int, "group": int, "sample_id": str, "source": str,
     "prompt": str,                      # the user turns' text, media placeholders removed
     "media": [{"type": "image" | "video" | "audio", "path": str}],   # absolute paths
     "answer": str | null,
     "completions": [{"text": str,
                      "tokens": [str, ...],      # each real token decoded on its own
                      "logps": [float, ...],     # the policy's log-probs of the sampled tokens
                      "entropy": [float, ...],   # the policy's entropy at each of those positions
                      "reward": float | null,    # combined (null: no reward applied)
                      "rewards": {name: float | null},
                      "advantage": float}]}

`tokens`, `logps` and `entropy` have one entry per real completion token (end-of-turn
included). Log-probs and entropies are those of the policy that sampled (before the step's
update), at the sampling temperature.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from lightrft_mm.algorithms.tokens import masked_mean
from lightrft_mm.schema import MEDIA_TYPES
from lightrft_mm.trainer.metrics import _json_values

# Placeholders some datasets write into the prompt text where the media go.
_PLACEHOLDERS = re.compile(r"<\|(?:image|video|audio)_pad\|>|<\|vision_(?:start|end)\|>|<\|AUDIO\|>"
                           r"|<(?:image|video|audio)>")
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")


def due(logging_cfg, step: int) -> tuple[bool, bool]:
    """(write the trajectory file, send rollouts to the backends) at `step`."""
    every_t, every_r = logging_cfg.trajectories_every, logging_cfg.rollouts_every
    backends = any(b != "jsonl" for b in logging_cfg.backends)
    return bool(every_t and step % every_t == 0), bool(backends and every_r and step % every_r == 0)


def step_groups(step: int, model, forward_logprobs, rollouts, inputs, scored, advantages, *, temps, tokenizer,
                reward_names, comm) -> list[dict]:
    """Every rank's prompt groups of this step as records (rank order; groups numbered across the
    ranks), on every rank. Collective: each rank runs one no-grad forward over its rows for the
    per-token entropy (a sharded model's forward needs every rank).

    Args:
        rollouts: this rank's [N] rows (group-major, `rollouts.n` per group), `logps` recorded.
        inputs: their `RewardInput`s; scored: the `ScoredBatch` (per-reward values in `outcomes`
            where the batch kept them); advantages: [N, T].
        temps: the sampling temperature(s); reward_names: the run's rewards, in config order.
    """
    with torch.no_grad():
        _, entropy = forward_logprobs(model, rollouts.prompts, rollouts.completion_ids, rollouts.completion_mask,
                                      temperature=temps, with_entropy=True, entropy_grad=False)
    local = group_records(step, rollouts, inputs, scored, advantages, entropy, tokenizer, reward_names)
    groups = [g for part in comm.gather(local) for g in part]
    for k, g in enumerate(groups):
        g["group"] = k
    return groups


def group_records(step: int, rollouts, inputs, scored, advantages, entropy, tokenizer, reward_names) -> list[dict]:
    """This rank's records, groups numbered from 0 (see the module docstring)."""
    n = rollouts.n
    mask = rollouts.completion_mask.bool().cpu()
    ids, logps, entropy = rollouts.completion_ids.cpu(), rollouts.logps.float().cpu(), entropy.float().cpu()
    combined, valid = scored.rewards.reshape(-1).tolist(), scored.valid.reshape(-1).tolist()
    advantage = [float(masked_mean(advantages[i].float(), rollouts.completion_mask[i])) for i in range(len(inputs))]
    groups = []
    for start in range(0, len(inputs), n):
        sample = inputs[start].sample
        completions = []
        for i in range(start, start + n):
            real = mask[i]
            token_ids = ids[i][real].tolist()
            completions.append({
                "text": inputs[i].completion,
                "tokens": tokenizer.batch_decode([[t] for t in token_ids]),
                "logps": logps[i][real].tolist(),
                "entropy": entropy[i][real].tolist(),
                "reward": float(combined[i]) if valid[i] else None,
                "rewards": {name: _value(scored, name, i) for name in reward_names},
                "advantage": advantage[i]})
        groups.append({"step": step, "group": start // n, "sample_id": sample.id, "source": sample.source,
                       "prompt": prompt_text(sample), "media": media(sample),
                       "answer": None if sample.answer is None else str(sample.answer), "completions": completions})
    return groups


def _value(scored, name: str, i: int):
    """Reward `name`'s value for row `i`, or None (not applicable, or a batch that dropped the
    per-reward values: dynamic sampling keeps only the combined ones)."""
    outcome = scored.outcomes.get(name)
    if outcome is None or i >= len(outcome.values) or outcome.values[i] is None:
        return None
    return float(outcome.values[i])


def prompt_text(sample) -> str:
    """The text of the sample's user turns, media placeholders removed."""
    texts = [p.text for m in sample.messages if m.role == "user" for p in m.content if p.type == "text" and p.text]
    return _PLACEHOLDERS.sub("", "\n".join(texts)).strip()


def media(sample) -> list[dict]:
    """The sample's media parts in message order, each with its absolute path (URLs as they are)."""
    return [{"type": p.type, "path": p.path if _URL.match(p.path) else os.path.abspath(p.path)}
            for p in sample.media() if p.type in MEDIA_TYPES]


def write_step(out: Path, step: int, groups: list[dict]) -> Path:
    """`<out>/trajectories/step-<step:06d>.jsonl`, one line per group (written whole: a resumed
    run that repeats a step replaces its file)."""
    path = Path(out) / "trajectories" / f"step-{step:06d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(_json_values(g), ensure_ascii=False, allow_nan=False) + "\n" for g in groups),
                   encoding="utf-8")
    tmp.replace(path)
    return path
