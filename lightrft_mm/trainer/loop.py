"""The GRPO-family loop, top to bottom: rollout -> reward -> advantages -> loss -> step.

Everything model-, strategy- or engine-specific sits behind the adapter, strategy and engine
protocols; the algorithm math is the pure functions of `lightrft_mm.algorithms`, chosen by
`cfg.algorithm` (presets and fields: docs/algorithms.md).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lightrft_mm.algorithms.advantages import compute_advantages
from lightrft_mm.algorithms.kl import adaptive_kl_coef, kl_reward_penalty
from lightrft_mm.algorithms.losses import policy_loss
from lightrft_mm.algorithms.stabilisers import (RunningMoments, clip_advantages, finished, high_entropy_mask,
                                                informative_groups, normalize_rewards)
from lightrft_mm.algorithms.tokens import loss_units, masked_mean, micro_batch_weight
from lightrft_mm.config import Config, to_dict
from lightrft_mm.datasets.loader import (PromptLoader, batches, drop_unsupported, load_samples,
                                         prompt_token_counter)
from lightrft_mm.datasets.synthetic import ensure_synthetic
from lightrft_mm.errors import ConfigError, MediaError
from lightrft_mm.models import load_policy
from lightrft_mm.models import logprobs
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import collate
from lightrft_mm.rewards import RewardInput, build_reward_set, check_routing, prompt_messages, score_rewards
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.strategy import STRATEGIES
from lightrft_mm.strategy.dist import LOCAL
from lightrft_mm.trainer.checkpoint import save_hf
from lightrft_mm.trainer.evaluate import evaluate
from lightrft_mm.trainer.experience import (concat_rollouts, group_rows, micro_batch_rows, mini_batch_rows,
                                            renumber_groups, select_rows)
from lightrft_mm.trainer.metrics import open_writer
from lightrft_mm.trainer.warmup import warmup

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    """Run a whole training job described by `cfg`; returns the summary written to summary.json.

    Under torchrun every rank calls this; the strategy joins the process group first.
    """
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, max_grad_norm=cfg.trainer.max_grad_norm)
    try:
        return _train(cfg, strategy)
    finally:
        strategy.close()


def _train(cfg: Config, strategy) -> dict:
    started = time.time()
    out = _prepare_output_dir(cfg, strategy)
    _seed_everything(cfg.trainer.seed)
    world = strategy.world_size

    # Model and adapter; the rollout engine is built on the prepared (sharded) model below.
    model, processor = load_policy(cfg.model, seed=cfg.trainer.seed)
    adapter = make_adapter(model, processor, system_prompt=cfg.data.system_prompt or None,
                           image=cfg.image, video=cfg.video, audio=cfg.audio)
    model.to(strategy.device)
    sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                              first_temperature=cfg.rollout.fire_temperature)

    # Data (each rank takes its share of every global batch, whole prompt groups) and rewards.
    if strategy.is_main:
        ensure_synthetic(cfg.data)
    strategy.barrier()
    token_len = prompt_token_counter(adapter) if cfg.data.max_prompt_tokens else None
    train_data = PromptLoader.from_config(cfg.data, seed=cfg.trainer.seed, token_len=token_len,
                                          modalities=adapter.modalities, rank=strategy.rank, world_size=world,
                                          batch_size=cfg.data.batch_size // world)
    train_samples = train_data.samples
    eval_samples, _ = drop_unsupported(load_samples(cfg.data.eval), adapter.modalities, where="data.eval")
    if cfg.data.eval_max_samples:
        eval_samples = eval_samples[:cfg.data.eval_max_samples]
    _check_media_kinds(train_samples + eval_samples, strategy)
    batch_iter = iter(train_data)
    reward_fns = build_reward_set(cfg.rewards, cfg.scoring)
    unrewarded = check_routing(reward_fns, train_samples, eval_samples)
    if unrewarded and strategy.is_main:
        log.warning("no reward applies to samples of source(s) %s: their completions are left out of the loss "
                    "(counted in reward/invalid). Fix: the rewards' sources.", ", ".join(unrewarded))
    acc_name = cfg.trainer.accuracy_reward
    eval_fns = reward_fns.including(acc_name)

    # Optional format warm-up (answer-free; every rank alike, before sharding), then the frozen
    # reference for the KL term, then the policy's strategy (fp32 master weights + optimizer).
    if cfg.warmup.steps:
        warmup(model, adapter, batches(train_samples, cfg.warmup.batch_size, cfg.trainer.seed + 1),
               cfg.warmup, seed=cfg.trainer.seed, device=strategy.device,
               progress=cfg.logging.progress and strategy.is_main)
    ref_model = strategy.prepare_frozen(_frozen_copy(model)) if cfg.algorithm.kl_coef > 0 else None
    model, optimizer = strategy.prepare(model, functools.partial(
        torch.optim.AdamW, lr=cfg.trainer.lr, betas=(cfg.trainer.adam_beta1, cfg.trainer.adam_beta2),
        weight_decay=cfg.trainer.weight_decay))
    engine = HFRolloutEngine(model, adapter, share_prefill=cfg.trainer.encode_prompts_once, comm=strategy)

    def run_eval() -> dict:
        if not eval_samples:
            return {}
        return evaluate(engine, adapter, eval_samples, eval_fns, accuracy_reward=acc_name,
                        max_new_tokens=cfg.rollout.max_new_tokens, comm=strategy)

    def rollout_and_score(batch):
        """Encode a prompt batch, sample n completions each, score them with every reward."""
        samples, prompts, skipped = _encode(adapter, batch, cfg.data.on_media_error)
        rollouts = engine.generate(prompts.to(strategy.device), cfg.rollout.n, sampling)
        seen = [prompt_messages(s, cfg.data.system_prompt) for s in samples]  # the prompts as the policy saw them
        inputs = [RewardInput(text, tuple(ids[m.bool()].tolist()), samples[i // cfg.rollout.n], i // cfg.rollout.n,
                              messages=seen[i // cfg.rollout.n])
                  for i, (text, ids, m) in enumerate(zip(rollouts.texts, rollouts.completion_ids,
                                                         rollouts.completion_mask))]
        return samples, rollouts, inputs, score_rewards(reward_fns, inputs, cfg.rollout.n), skipped

    metrics = open_writer(out / "metrics.jsonl", strategy.is_main)
    trajectories = open_writer(out / "trajectories.jsonl", strategy.is_main and cfg.logging.completions > 0)
    before = run_eval()
    metrics.write({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
    alg = cfg.algorithm
    pad_id = adapter.pad_token_id
    reward_stats = RunningMoments()  # reward_norm=running (global over the ranks)
    kl_coef = alg.kl_coef  # the adaptive controller (kl_target > 0) moves it
    forward_logprobs = functools.partial(logprobs.forward_logprobs, share_media=cfg.trainer.encode_prompts_once)
    skipped_media = 0
    bar = _progress(cfg, strategy.is_main)
    for step in range(1, cfg.trainer.max_steps + 1):
        t_step = time.time()
        # 1-2. Rollout (n completions per prompt, with their sampling log-probs) and rewards
        #      (every reward sees the completion and its whole Sample). DAPO dynamic sampling
        #      keeps only the groups whose rewards differ and rolls out more prompts to fill up.
        #      Every rank ends with as many groups as the others (its forwards are collective).
        if alg.dynamic_sampling:
            rollouts, inputs, scored, skipped, sampled = _informative_batch(
                rollout_and_score, batch_iter, cfg.data.batch_size // world, alg.dynamic_sampling_max_batches,
                pad_id, strategy)
        else:
            _, rollouts, inputs, scored, skipped = rollout_and_score(next(batch_iter))
            rollouts, inputs, scored = _equal_groups(rollouts, inputs, scored, strategy, pad_id)
            sampled = {}
        skipped_media += skipped
        rewards, reward_valid = scored.rewards, scored.valid

        # 3. The tokens the loss counts: not those of completions no reward applied to, nor (with
        #    overlong filtering) those of completions cut at the token budget.
        mask = rollouts.completion_mask * reward_valid.view(-1, 1).to(rollouts.completion_mask)
        done = finished(rollouts.completion_ids, adapter.eos_token_id)
        if alg.overlong_filter:
            mask = mask * done.unsqueeze(1).to(mask)
        temps = sampling.temperatures(rollouts.completion_ids.shape[1])  # per position with FIRE

        # 4. Advantages [N, T]: rewards normalised / clipped (statistics over every rank's batch),
        #    a completion no reward applied to given its group's mean, the KL penalty subtracted
        #    when it goes into the reward.
        rewards = normalize_rewards(rewards, reward_valid, alg.reward_norm, running=reward_stats,
                                    clip=alg.reward_clip, sum_across=strategy.all_reduce)
        rewards = _fill_invalid(rewards, reward_valid)
        ref_logps = kl_penalty = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logps, _ = forward_logprobs(ref_model, rollouts.prompts, rollouts.completion_ids,
                                                rollouts.completion_mask, temperature=temps)
            if alg.kl_in == "reward":
                kl_penalty = kl_reward_penalty(rollouts.logps, ref_logps, mask, coef=kl_coef,
                                               estimator=alg.kl_estimator, clamp=alg.kl_clamp)
        advantages = compute_advantages(alg.advantage, rewards, mask, scale_by_std=alg.scale_by_std,
                                        kl_penalty=kl_penalty, sum_across=strategy.all_reduce)
        advantages = clip_advantages(advantages, alg.adv_clip)

        # 5. Optimise: epochs x mini-batches of whole groups, on the policy's recomputed log-probs
        #    (same positions as generation). old_logps stay fixed over the updates: the sampling
        #    log-probs, or (TIS) the trainer's own from before the first update, the sampling
        #    ones then being the behaviour policy of the truncated importance weight.
        old_logps = rollouts.logps
        if alg.tis_cap > 0:
            with torch.no_grad():
                old_logps, _ = forward_logprobs(model, rollouts.prompts, rollouts.completion_ids,
                                                rollouts.completion_mask, temperature=temps)
        stats = optimise(model, strategy, rollouts, old_logps, advantages, mask, alg=alg, temps=temps,
                         ref_logps=ref_logps, kl_coef=kl_coef, max_tokens=cfg.rollout.max_new_tokens,
                         micro_batch_groups=cfg.trainer.micro_batch_groups, forward_logprobs=forward_logprobs,
                         pad_id=pad_id)

        # 6. Metrics over every rank (counts summed, means averaged), written by rank 0.
        local = {**scored.metrics, "data/skipped_media": skipped_media,
                 "completion/length": rollouts.completion_mask.sum(1).float().mean().item(),
                 "completion/truncated": 1.0 - done.float().mean().item(),
                 "completion/zero_std_groups": int((scored.rewards.std(dim=1) == 0).sum()),
                 **{f"loss/{k}": v for k, v in stats.items() if k != "grad_norm"}}
        row = {"step": step, **reduce_metrics(strategy, local), **sampled,
               "data/filtered_long": train_data.filtered, "data/unsupported": train_data.unsupported,
               "grad_norm": stats["grad_norm"], "loss/skipped_steps": strategy.skipped_steps,
               "time/step": strategy.all_reduce(time.time() - t_step, "max")}
        if alg.kl_target > 0 and ref_model is not None:
            kl_coef = adaptive_kl_coef(kl_coef, row["loss/kl"], target=alg.kl_target, horizon=alg.kl_horizon,
                                       n_steps=len(inputs) * world)
        if ref_model is not None:
            row["kl/coef"] = kl_coef
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps:
            row.update({f"eval/{k}": v for k, v in run_eval().items()})
        metrics.write(row)
        for i in range(min(cfg.logging.completions, len(inputs))):
            trajectories.write({"step": step, "id": inputs[i].sample.id, "completion": inputs[i].completion,
                                "reward": float(scored.rewards.view(-1)[i]),
                                "advantage": float(masked_mean(advantages[i], rollouts.completion_mask[i]))})
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            save_hf(model, processor, out / f"checkpoint-{step}", strategy=strategy, dtype=cfg.model.dtype)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/mean']:.3f}", acc=_fmt(row.get("eval/accuracy")))
    bar.close()

    after = run_eval()
    metrics.write({"step": cfg.trainer.max_steps, **{f"eval/{k}": v for k, v in after.items()}})
    metrics.close()
    trajectories.close()
    save_hf(model, processor, out / "checkpoint-final", strategy=strategy, dtype=cfg.model.dtype)
    summary = {"before": before.get("accuracy"), "after": after.get("accuracy"),
               "heldout": len(eval_samples), "seconds": round(time.time() - started, 1),
               "steps": cfg.trainer.max_steps, "skipped_media": row["data/skipped_media"], "world_size": world, "checkpoint": str(out / "checkpoint-final")}
    if strategy.is_main:
        if cfg.logging.plot:
            from lightrft_mm.trainer.plot import plot_curves

            summary["curves"] = str(plot_curves(out / "metrics.jsonl", out / "curves.png",
                                                keys=("reward/mean", "eval/accuracy")))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def optimise(model, strategy, rollouts, old_logps, advantages, mask, *, alg, temps, ref_logps, kl_coef: float,
             max_tokens: int, micro_batch_groups: int, forward_logprobs, pad_id: int) -> dict:
    """Step 5 of the loop: `alg.epochs` passes of `alg.mini_batches` optimizer steps over this
    rank's groups, each step accumulating micro-batches of whole groups (bucketed by length).

    Each micro-batch's loss is weighted so that the sum over micro-batches and ranks is the
    aggregate over the global mini-batch (`micro_batch_weight`, with the loss units summed over
    the ranks), so the averaged gradient is that of one process holding every rank's batch.

    Args:
        rollouts: this rank's completions ([N] rows, group-major); old_logps, advantages, mask
            [N, T] and ref_logps ([N, T] or None) belong to them.
        alg: the resolved `AlgorithmConfig`.
        temps: the sampling temperature(s) (`SamplingParams.temperatures`).
        pad_id: the tokenizer's pad id (to re-collate micro-batches).

    Returns:
        Mean over the optimizer steps of the loss statistics (this rank's share: their mean over
        the ranks is the global value) and `grad_norm` (global).
    """
    model.train()
    updates = []
    lengths = rollouts.prompts.attention_mask.sum(1) + rollouts.completion_mask.sum(1)
    n_rows = rollouts.completion_ids.shape[0]
    for _ in range(alg.epochs):
        for rows in mini_batch_rows(n_rows // rollouts.n, rollouts.n, alg.mini_batches):
            units = strategy.all_reduce(loss_units(mask[rows], alg.aggregation))
            parts = []
            for micro in micro_batch_rows(rows, rollouts.n, lengths, micro_batch_groups):
                part = rollouts if len(micro) == n_rows else select_rows(rollouts, micro, pad_id)
                idx, width = torch.tensor(micro, device=mask.device), part.completion_ids.shape[1]
                cut = lambda t: None if t is None else t[idx, :width]  # noqa: E731
                logps, entropy = forward_logprobs(
                    model, part.prompts, part.completion_ids, part.completion_mask,
                    temperature=temps[:width] if isinstance(temps, torch.Tensor) else temps,
                    with_entropy=alg.entropy_coef > 0 or alg.high_entropy_ratio < 1)
                select = (None if alg.high_entropy_ratio == 1
                          else high_entropy_mask(entropy, cut(mask), alg.high_entropy_ratio))
                loss, stats = policy_loss(
                    logps, cut(old_logps), cut(advantages), cut(mask), loss=alg.loss,
                    aggregation=alg.aggregation, clip_eps=alg.clip_eps, clip_eps_high=alg.clip_eps_high,
                    dual_clip=alg.dual_clip, max_tokens=max_tokens, drift_coef=alg.drift_coef,
                    behaviour_logps=cut(rollouts.logps), tis_cap=alg.tis_cap, token_select=select,
                    ref_logps=cut(ref_logps), kl_coef=kl_coef if alg.kl_in == "loss" else 0.0,
                    kl_estimator=alg.kl_estimator, kl_clamp=alg.kl_clamp, entropy=entropy,
                    entropy_coef=alg.entropy_coef)
                weight = micro_batch_weight(cut(mask), units, alg.aggregation, world_size=strategy.world_size)
                strategy.backward(loss * weight)
                parts.append((stats, weight))
            updates.append({**{k: sum(st[k] * w for st, w in parts) for k in parts[0][0]},
                            "grad_norm": strategy.step()})
    return {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}


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


def _informative_batch(rollout_and_score, batch_iter, want: int, max_batches: int, pad_id: int, comm=LOCAL):
    """DAPO dynamic sampling: roll out batches until every rank has kept `want` prompt groups
    whose rewards differ, or `max_batches` batches were tried; join the kept groups into one
    step batch. Every rank trains on as many groups as the rank that kept fewest (their
    forwards are collective), so the global kept count is that times the world size.

    If no group of any rank was informative, the last batch is used as it is (its advantages
    are 0; only the KL and entropy terms act).

    Returns:
        (rollouts, inputs, scored, skipped media, stats). `scored.metrics` cover every batch
        rolled out (means weighted by completions, counts summed); `stats` holds
        sampling/kept_fraction (informative groups / groups rolled out, over every rank) and
        sampling/batches.
    """
    parts, metrics, seen, informative, skipped, kept = [], [], 0, 0, 0, 0
    for tries in range(1, max_batches + 1):
        _, rollouts, inputs, scored, skip = rollout_and_score(next(batch_iter))
        skipped += skip
        metrics.append((scored.metrics, len(inputs)))
        groups = informative_groups(scored.rewards, scored.valid).nonzero().flatten().tolist()
        seen, informative = seen + scored.rewards.shape[0], informative + len(groups)
        groups = groups[:want - kept]
        if groups:
            rows = group_rows(groups, rollouts.n)
            parts.append((select_rows(rollouts, rows, pad_id), [inputs[i] for i in rows], scored, groups))
            kept += len(groups)
        if comm.all_reduce(kept, "min") >= want:
            break
    stats = {"sampling/kept_fraction": comm.all_reduce(informative) / comm.all_reduce(seen),
             "sampling/batches": tries}
    keep = int(comm.all_reduce(kept, "min"))
    if keep == 0:
        rollouts, inputs, scored = _equal_groups(rollouts, inputs, scored, comm, pad_id)
        return rollouts, inputs, scored, skipped, stats
    trimmed = []
    for part_rollouts, part_inputs, sc, groups in parts:
        take = min(len(groups), keep - sum(len(g) for *_, g in trimmed))
        if take == 0:
            break
        if take < len(groups):
            rows = list(range(take * part_rollouts.n))
            part_rollouts, part_inputs = select_rows(part_rollouts, rows, pad_id), part_inputs[:len(rows)]
        trimmed.append((part_rollouts, part_inputs, sc, groups[:take]))
    joined = type(scored)(torch.cat([sc.rewards[g] for _, _, sc, g in trimmed]),  # a ScoredBatch
                          torch.cat([sc.valid[g] for _, _, sc, g in trimmed]), _merge_metrics(metrics))
    inputs = renumber_groups([x for _, part_inputs, _, _ in trimmed for x in part_inputs], rollouts.n)
    return concat_rollouts([r for r, _, _, _ in trimmed], pad_id), inputs, joined, skipped, stats


def _equal_groups(rollouts, inputs, scored, comm, pad_id: int):
    """Cut this rank's batch to as many prompt groups as the rank with fewest has (a sample
    skipped for broken media leaves its rank one short): every rank then runs the same number
    of (collective) forwards and optimizer steps."""
    groups = scored.rewards.shape[0]
    keep = int(comm.all_reduce(groups, "min"))
    if keep == groups:
        return rollouts, inputs, scored
    log.warning("rank %d: training on %d of its %d prompt groups this step (another rank has only %d)",
                comm.rank, keep, groups, keep)
    rows = list(range(keep * rollouts.n))
    cut = type(scored)(scored.rewards[:keep], scored.valid[:keep], scored.metrics)
    return select_rows(rollouts, rows, pad_id), inputs[:len(rows)], cut


def _merge_metrics(metrics: list[tuple[dict, int]]) -> dict:
    """Metrics of several scored batches: integer counts summed, other numbers averaged, each
    batch weighted by its completions (over the batches that report the key)."""
    merged = {}
    for key in dict.fromkeys(k for m, _ in metrics for k in m):
        values = [(m[key], w) for m, w in metrics if key in m]
        if all(isinstance(v, int) and not isinstance(v, bool) for v, _ in values):
            merged[key] = sum(v for v, _ in values)
        else:
            merged[key] = sum(float(v) * w for v, w in values) / max(sum(w for _, w in values), 1)
    return merged


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


def _prepare_output_dir(cfg: Config, comm) -> Path:
    """Check (every rank) and create (rank 0) the run folder; config.json records the run."""
    out = Path(cfg.trainer.output_dir)
    if (out / "metrics.jsonl").exists() and not cfg.trainer.overwrite:
        raise ConfigError(f"trainer.output_dir: {out} already holds a run. Fix: choose another "
                          "output_dir, or set trainer.overwrite=true to replace it.")
    comm.barrier()  # every rank has looked before rank 0 replaces it
    if comm.is_main:
        if (out / "metrics.jsonl").exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    comm.barrier()
    return out


def _check_media_kinds(samples, strategy) -> None:
    """Sharded forwards are collective: when one rank's batch runs the vision tower and another's
    does not, the first waits for the second forever. Until the towers run on placeholders for
    batches without media, a sharded run needs data whose samples all hold the same media kinds."""
    if strategy.world_size == 1 or not strategy.sharded_params:
        return
    kinds = {frozenset(p.type for p in s.media()) for s in samples}
    if len(kinds) > 1:
        names = sorted("+".join(sorted(k)) or "text only" for k in kinds)
        raise ConfigError(f"data: the samples mix media kinds ({', '.join(names)}); with a parameter-sharding "
                          f"strategy on {strategy.world_size} ranks a rank whose batch has no such media would "
                          "skip the tower the others gather. Fix: train each kind in its own run, or use "
                          "strategy.name=deepspeed with zero_stage 1 or 2 (parameters not sharded).")


def reduce_metrics(comm, row: dict) -> dict:
    """One rank's metrics combined over every rank: integer counts summed, other numbers
    averaged over the ranks that report them (each rank holds an equal share of the groups)."""
    rows = comm.gather(row)
    merged = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r[key] for r in rows if key in r]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        else:
            merged[key] = sum(float(v) for v in values) / len(values)
    return merged


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(cfg: Config, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, desc="grpo", disable=not (cfg.logging.progress and enabled),
                dynamic_ncols=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"

