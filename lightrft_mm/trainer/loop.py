"""The GRPO loop, top to bottom: rollout -> reward -> advantages -> loss -> step.

Everything model-, strategy- or engine-specific sits behind the adapter, strategy and engine
protocols; the algorithm math is the pure functions of `lightrft_mm.algorithms`.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lightrft_mm.algorithms.grpo import group_advantages, policy_loss
from lightrft_mm.config import Config, to_dict
from lightrft_mm.datasets.loader import (PromptLoader, batches, drop_unsupported, load_samples,
                                         prompt_token_counter)
from lightrft_mm.errors import ConfigError, MediaError
from lightrft_mm.models import load_policy
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import collate
from lightrft_mm.rewards import REWARDS, RewardInput, resolve, score_rewards
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.strategy import STRATEGIES
from lightrft_mm.trainer.checkpoint import save_hf
from lightrft_mm.trainer.evaluate import evaluate
from lightrft_mm.trainer.metrics import JsonlWriter
from lightrft_mm.trainer.warmup import warmup

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    """Run a whole training job described by `cfg`; returns the summary written to summary.json."""
    started = time.time()
    out = _prepare_output_dir(cfg)
    _seed_everything(cfg.trainer.seed)

    # Model, adapter, rollout engine, strategy.
    model, processor = load_policy(cfg.model, seed=cfg.trainer.seed)
    adapter = make_adapter(model, processor, system_prompt=cfg.data.system_prompt or None,
                           image=cfg.image, video=cfg.video, audio=cfg.audio)
    strategy = STRATEGIES.get(cfg.strategy.name)(device=cfg.strategy.device,
                                                 max_grad_norm=cfg.trainer.max_grad_norm)
    model.to(strategy.device)
    engine = HFRolloutEngine(model, adapter)
    sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)

    # Data and rewards.
    token_len = prompt_token_counter(adapter) if cfg.data.max_prompt_tokens else None
    train_data = PromptLoader.from_config(cfg.data, seed=cfg.trainer.seed, token_len=token_len,
                                          modalities=adapter.modalities)
    train_samples = train_data.samples
    eval_samples, _ = drop_unsupported(load_samples(cfg.data.eval), adapter.modalities, where="data.eval")
    if cfg.data.eval_max_samples:
        eval_samples = eval_samples[:cfg.data.eval_max_samples]
    batch_iter = iter(train_data)
    reward_fns = resolve(cfg.rewards)
    acc_name = cfg.trainer.accuracy_reward
    eval_fns = reward_fns + ([] if any(n == acc_name for n, _, _ in reward_fns)
                             else [(acc_name, REWARDS.get(acc_name), 0.0)])

    def run_eval() -> dict:
        if not eval_samples:
            return {}
        return evaluate(engine, adapter, eval_samples, eval_fns, accuracy_reward=acc_name,
                        max_new_tokens=cfg.rollout.max_new_tokens)

    # Optional format warm-up (answer-free), then the frozen reference for the KL term.
    if cfg.warmup.steps:
        warmup(model, adapter, batches(train_samples, cfg.warmup.batch_size, cfg.trainer.seed + 1),
               cfg.warmup, seed=cfg.trainer.seed, device=strategy.device, progress=cfg.logging.progress)
    ref_model = _frozen_copy(model) if cfg.algorithm.kl_coef > 0 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.trainer.lr,
                                  betas=(cfg.trainer.adam_beta1, cfg.trainer.adam_beta2),
                                  weight_decay=cfg.trainer.weight_decay)
    model, optimizer = strategy.prepare(model, optimizer)

    def rollout_and_score(batch):
        """Encode a prompt batch, sample n completions each, score them with every reward."""
        samples, prompts, skipped = _encode(adapter, batch, cfg.data.on_media_error)
        rollouts = engine.generate(prompts.to(strategy.device), cfg.rollout.n, sampling)
        inputs = [RewardInput(text, tuple(ids[m.bool()].tolist()), samples[i // cfg.rollout.n], i // cfg.rollout.n)
                  for i, (text, ids, m) in enumerate(zip(rollouts.texts, rollouts.completion_ids,
                                                         rollouts.completion_mask))]
        return samples, rollouts, inputs, score_rewards(reward_fns, inputs, cfg.rollout.n), skipped

    metrics = JsonlWriter(out / "metrics.jsonl")
    trajectories = JsonlWriter(out / "trajectories.jsonl") if cfg.logging.completions else None
    before = run_eval()
    metrics.write({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
    skipped_media = 0
    bar = _progress(cfg)
    for step in range(1, cfg.trainer.max_steps + 1):
        t_step = time.time()
        # 1-2. Rollout (n completions per prompt, with their sampling log-probs) and rewards
        #      (every reward sees the completion and its whole Sample).
        samples, rollouts, inputs, scored, skipped = rollout_and_score(next(batch_iter))
        skipped_media += skipped
        mask = rollouts.completion_mask
        rewards, reward_valid = scored.rewards, scored.valid

        # 3. Advantages: group-normalised rewards, one per completion.
        #    A completion no reward applied to takes its group's mean (advantage 0) and is left
        #    out of the loss.
        rewards = _fill_invalid(rewards, reward_valid)
        advantages = group_advantages(rewards, scale_by_std=cfg.algorithm.scale_by_std).view(-1)
        advantages = advantages.to(strategy.device)
        mask = mask * reward_valid.view(-1, 1).to(mask.device, mask.dtype)

        # 4. Loss on the policy's recomputed log-probs (same positions as generation), and step;
        #    old_logps stay the sampling log-probs across epochs.
        ref_logps = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logps, _ = forward_logprobs(ref_model, rollouts.prompts, rollouts.completion_ids, mask,
                                                temperature=sampling.temperature)
        model.train()
        for _ in range(cfg.algorithm.epochs):
            logps, entropy = forward_logprobs(model, rollouts.prompts, rollouts.completion_ids, mask,
                                              temperature=sampling.temperature,
                                              with_entropy=cfg.algorithm.entropy_coef > 0)
            loss, stats = policy_loss(logps, rollouts.logps, advantages, mask, clip_eps=cfg.algorithm.clip_eps,
                                      ref_logps=ref_logps, kl_coef=cfg.algorithm.kl_coef,
                                      entropy=entropy, entropy_coef=cfg.algorithm.entropy_coef)
            strategy.backward(loss)
            grad_norm = strategy.step()

        row = {"step": step, **scored.metrics, "data/skipped_media": skipped_media,
               "data/filtered_long": train_data.filtered, "data/unsupported": train_data.unsupported,
               "completion/length": mask.sum(1).float().mean().item(),
               "completion/zero_std_groups": int((rewards.std(dim=1) == 0).sum()),
               "grad_norm": grad_norm, "time/step": time.time() - t_step,
               **{f"loss/{k}": v for k, v in stats.items()}}
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps:
            row.update({f"eval/{k}": v for k, v in run_eval().items()})
        metrics.write(row)
        if trajectories is not None:
            for i in range(min(cfg.logging.completions, len(inputs))):
                trajectories.write({"step": step, "id": inputs[i].sample.id, "completion": inputs[i].completion,
                                    "reward": float(rewards.view(-1)[i]), "advantage": float(advantages[i])})
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            save_hf(model, processor, out / f"checkpoint-{step}", strategy=strategy)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", acc=_fmt(row.get("eval/accuracy")))
    bar.close()

    after = run_eval()
    metrics.write({"step": cfg.trainer.max_steps, **{f"eval/{k}": v for k, v in after.items()}})
    metrics.close()
    if trajectories is not None:
        trajectories.close()
    save_hf(model, processor, out / "checkpoint-final", strategy=strategy)
    summary = {"before": before.get("accuracy"), "after": after.get("accuracy"),
               "heldout": len(eval_samples), "seconds": round(time.time() - started, 1),
               "steps": cfg.trainer.max_steps, "skipped_media": skipped_media,
               "checkpoint": str(out / "checkpoint-final")}
    if cfg.logging.plot:
        from lightrft_mm.trainer.plot import plot_curves

        summary["curves"] = str(plot_curves(out / "metrics.jsonl", out / "curves.png",
                                            keys=("reward/mean", "eval/accuracy")))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _encode(adapter, samples, policy: str):
    """Encode prompts; a sample whose media fails to decode is skipped (or raises, per policy)."""
    encodings, kept = [], []
    for s in samples:
        try:
            encodings.append(adapter.encode_one(s))
            kept.append(s)
        except MediaError as e:
            if policy == "fail":
                raise
            log.warning("skipping sample: %s", e)
    if not kept:
        raise MediaError("every sample of a training batch failed to decode; see the warnings above.")
    return kept, collate(encodings, adapter.pad_token_id), len(samples) - len(kept)


def _fill_invalid(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace rewards where `valid` is False by the mean of the group's valid ones (or 0)."""
    if bool(valid.all()):
        return rewards
    v = valid.to(rewards.dtype)
    mean = (rewards * v).sum(1, keepdim=True) / v.sum(1, keepdim=True).clamp(min=1)
    return torch.where(valid, rewards, mean)


def _frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _prepare_output_dir(cfg: Config) -> Path:
    out = Path(cfg.trainer.output_dir)
    if (out / "metrics.jsonl").exists():
        if not cfg.trainer.overwrite:
            raise ConfigError(f"trainer.output_dir: {out} already holds a run. Fix: choose another "
                              "output_dir, or set trainer.overwrite=true to replace it.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(cfg: Config):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, desc="grpo", disable=not cfg.logging.progress,
                dynamic_ncols=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"

