"""The GRPO-family loop, top to bottom: rollout -> reward -> advantages -> loss -> step.

Everything model-, strategy- or engine-specific sits behind the adapter, strategy and engine
protocols; the algorithm math is the pure functions of `lightrft_mm.algorithms`, chosen by
`cfg.algorithm` (presets and fields: docs/algorithms.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time

import torch

from lightrft_mm.algorithms.advantages import compute_advantages
from lightrft_mm.algorithms.kl import adaptive_kl_coef, kl_reward_penalty
from lightrft_mm.algorithms.losses import policy_loss
from lightrft_mm.algorithms.stabilisers import (RunningMoments, clip_advantages, finished, high_entropy_threshold,
                                                normalize_rewards)
from lightrft_mm.algorithms.tokens import loss_units, masked_mean, micro_batch_weight
from lightrft_mm.config import Config
from lightrft_mm.errors import CheckpointError, MediaError, TrainingError
from lightrft_mm.models import logprobs
from lightrft_mm.models.lora import adapters_disabled
from lightrft_mm.models.trainable import trained_text
from lightrft_mm.processors.adapter import collate
from lightrft_mm.rewards import RewardInput, prompt_messages, score_rewards
from lightrft_mm.strategy import STRATEGIES
from lightrft_mm.trainer.checkpoint import prune, read_trainer_state, save_hf, set_rng_state
from lightrft_mm.trainer.evaluate import evaluate
from lightrft_mm.trainer.experience import (equal_groups, informative_batch, micro_batch_rows, mini_batch_rows,
                                            select_rows)
from lightrft_mm.trainer import trajectories
from lightrft_mm.trainer.metrics import open_writer, reduce_metrics
from lightrft_mm.trainer.setup import build_run

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict:
    """Run a whole training job described by `cfg`; returns the summary written to summary.json.

    Under torchrun every rank calls this; the strategy joins the process group first.
    """
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, max_grad_norm=cfg.trainer.max_grad_norm)
    try:
        summary = _train(cfg, strategy)
    except BaseException:
        strategy.close(drain=False)  # another rank may have failed: do not wait for it
        raise
    strategy.close()
    return summary


def _train(cfg: Config, strategy) -> dict:
    started = time.time()
    run = build_run(cfg, strategy)  # model, adapter, data, rewards, reference, prepared policy, engine
    try:
        return _loop(cfg, strategy, run, started)
    finally:
        run.logger.close()  # metrics.jsonl and the logging backends (a W&B run is finished)
        run.engine.close()  # a vLLM engine this run started
        if run.lock is not None:
            run.lock.release()


def _loop(cfg: Config, strategy, run, started: float) -> dict:
    out, model, adapter, engine, sampling = run.out, run.model, run.adapter, run.engine, run.sampling
    ref_model, train_data, eval_samples, reward_fns = run.ref_model, run.train_data, run.eval_samples, run.reward_fns
    world, batch_iter = strategy.world_size, iter(run.train_data)

    def run_eval() -> dict:
        if not eval_samples:
            return {}
        return evaluate(engine, adapter, eval_samples, run.eval_fns, accuracy_reward=cfg.trainer.accuracy_reward,
                        max_new_tokens=cfg.rollout.max_new_tokens, comm=strategy,
                        system_prompt=cfg.data.system_prompt or None)

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

    metrics = run.logger  # metrics.jsonl and every logging backend (rank 0)
    completions = open_writer(out / "trajectories.jsonl", strategy.is_main and cfg.logging.completions > 0)
    alg = cfg.algorithm
    pad_id = adapter.pad_token_id
    forward_logprobs = functools.partial(logprobs.forward_logprobs, share_media=cfg.trainer.encode_prompts_once,
                                         packed=cfg.trainer.padding_free)
    # The loop's own state: what a checkpoint keeps beside the model and optimizer (resume).
    reward_stats = RunningMoments()  # reward_norm=running (global over the ranks)
    state = {"step": 0, "kl_coef": alg.kl_coef,  # the adaptive controller (kl_target > 0) moves it
             "bad_steps": 0, "before": None}
    skipped_media = 0  # this rank's
    if run.resume is None:
        before = run_eval()
        state["before"] = before.get("accuracy")
        metrics.write({"step": 0, **run.parameters, **{f"eval/{k}": v for k, v in before.items()}})
    else:
        saved, rng = read_trainer_state(run.resume, strategy.rank)
        state.update({k: saved[k] for k in state})
        skipped_media = saved["skipped_media"][strategy.rank]
        reward_stats.__dict__.update(saved["reward_stats"])
        train_data.load_state_dict(saved["loader"])
        set_rng_state(rng)  # last: building the run drew from the generators
    kl_coef = state["kl_coef"]
    bar = _progress(cfg, strategy.is_main, initial=state["step"])
    for step in range(state["step"] + 1, cfg.trainer.max_steps + 1):
        t_step = time.time()
        # 1-2. Rollout (n completions per prompt, with their sampling log-probs) and rewards
        #      (every reward sees the completion and its whole Sample). DAPO dynamic sampling
        #      keeps only the groups whose rewards differ and rolls out more prompts to fill up.
        #      Every rank ends with as many groups as the others (its forwards are collective).
        if alg.dynamic_sampling:
            rollouts, inputs, scored, skipped, sampled = informative_batch(
                rollout_and_score, batch_iter, cfg.data.batch_size // world, alg.dynamic_sampling_max_batches,
                pad_id, strategy)
        else:
            _, rollouts, inputs, scored, skipped = rollout_and_score(next(batch_iter))
            rollouts, inputs, scored = equal_groups(rollouts, inputs, scored, strategy, pad_id)
            sampled = {}
        skipped_media += skipped
        rewards, reward_valid = scored.rewards, scored.valid
        engine.sleep()  # a colocated vLLM engine hands its memory to training until the next rollout
        temps = sampling.temperatures(rollouts.completion_ids.shape[1])  # per position with FIRE
        if not engine.records_policy_logps:
            # vLLM returns the log-probs of the distribution it sampled (after top-k / top-p /
            # suppression: the behaviour policy); the policy's own at the sampling temperature,
            # what the ratio's old side is, come from the trainer's forward.
            with torch.no_grad():
                logps, _ = forward_logprobs(model, rollouts.prompts, rollouts.completion_ids,
                                            rollouts.completion_mask, temperature=temps)
            rollouts.logps = logps * rollouts.completion_mask

        # 3. The tokens the loss counts: not those of completions no reward applied to, nor (with
        #    overlong filtering) those of completions cut at the token budget.
        mask = rollouts.completion_mask * reward_valid.view(-1, 1).to(rollouts.completion_mask)
        done = finished(rollouts.completion_ids, adapter.eos_token_id)
        if alg.overlong_filter:
            mask = mask * done.unsqueeze(1).to(mask)

        # 4. Advantages [N, T]: rewards normalised / clipped (statistics over every rank's batch),
        #    a completion no reward applied to given its group's mean, the KL penalty subtracted
        #    when it goes into the reward.
        rewards = normalize_rewards(rewards, reward_valid, alg.reward_norm, running=reward_stats,
                                    clip=alg.reward_clip, sum_across=strategy.all_reduce)
        rewards = _fill_invalid(rewards, reward_valid)
        ref_logps = kl_penalty = None
        if ref_model is not None:
            with torch.no_grad(), adapters_disabled(model) if ref_model is model else contextlib.nullcontext():
                ref_logps, _ = forward_logprobs(ref_model, rollouts.prompts, rollouts.completion_ids,
                                                rollouts.completion_mask, temperature=temps)
            if alg.kl_in == "reward":
                kl_penalty = kl_reward_penalty(rollouts.logps, ref_logps, mask, coef=kl_coef,
                                               estimator=alg.kl_estimator, clamp=alg.kl_clamp)
        advantages = compute_advantages(alg.advantage, rewards, mask, scale_by_std=alg.scale_by_std,
                                        kl_penalty=kl_penalty, sum_across=strategy.all_reduce)
        advantages = clip_advantages(advantages, alg.adv_clip)
        # Trajectories (every logging.trajectories_every steps) and the rollouts the backends show
        # (every logging.rollouts_every): every group with its rewards, advantages and the sampling
        # policy's per-token log-probs and entropies, so recorded before the update. Collective.
        to_file, to_backends = trajectories.due(cfg.logging, step)
        groups = trajectories.step_groups(
            step, model, forward_logprobs, rollouts, inputs, scored, advantages, temps=temps,
            tokenizer=adapter.tokenizer, reward_names=[r.name for r in reward_fns.rewards],
            comm=strategy) if to_file or to_backends else []

        # 5. Optimise: epochs x mini-batches of whole groups, on the policy's recomputed log-probs
        #    (same positions as generation). old_logps stay fixed over the updates: the engine's
        #    policy log-probs at the sampling temperature, or (TIS) the trainer's own from before
        #    the first update; the distribution the tokens were drawn from (after top-k / top-p /
        #    penalties, `behaviour_logps`) is then the behaviour policy of the importance weight.
        old_logps = rollouts.logps
        if alg.tis_cap > 0 and engine.records_policy_logps:
            with torch.no_grad():
                old_logps, _ = forward_logprobs(model, rollouts.prompts, rollouts.completion_ids,
                                                rollouts.completion_mask, temperature=temps)
        stats = optimise(model, strategy, rollouts, old_logps, advantages, mask, alg=alg, temps=temps,
                         ref_logps=ref_logps, kl_coef=kl_coef, max_tokens=cfg.rollout.max_new_tokens,
                         micro_batch_groups=cfg.trainer.micro_batch_groups, forward_logprobs=forward_logprobs,
                         pad_id=pad_id)
        engine.sync(strategy)  # a separate engine gets the updated weights before the next rollout
        # A non-finite gradient norm skips its update (the strategies never apply one); a run
        # whose every update fails for max_bad_steps steps in a row stops below.
        state["bad_steps"] = state["bad_steps"] + 1 if stats["skipped"] == stats["updates"] else 0

        # 6. Metrics over every rank (counts summed, means averaged), written by rank 0.
        local = {**scored.metrics, "data/skipped_media": skipped_media,
                 "completion/length": rollouts.completion_mask.sum(1).float().mean().item(),
                 "completion/truncated": 1.0 - done.float().mean().item(),
                 "completion/zero_std_groups": int((scored.rewards.std(dim=1) == 0).sum()),
                 **{f"loss/{k}": v for k, v in stats.items() if k not in ("grad_norm", "skipped", "updates")}}
        row = {"step": step, **reduce_metrics(strategy, local), **sampled,
               "data/filtered_long": train_data.filtered, "data/unsupported": train_data.unsupported,
               "grad_norm": stats["grad_norm"], "train/skipped_steps": strategy.skipped_steps,
               **engine.metrics(),
               "time/step": strategy.all_reduce(time.time() - t_step, "max")}
        if alg.kl_target > 0 and ref_model is not None:
            kl_coef = adaptive_kl_coef(kl_coef, row["loss/kl"], target=alg.kl_target, horizon=alg.kl_horizon,
                                       n_steps=len(inputs) * world)
        if ref_model is not None:
            row["kl/coef"] = kl_coef
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps:
            row.update({f"eval/{k}": v for k, v in run_eval().items()})
        metrics.write(row)
        if strategy.is_main and to_file:
            trajectories.write_step(out, step, groups)
        if to_backends:
            metrics.log_rollouts(step, groups)
        for i in range(min(cfg.logging.completions, len(inputs))):
            completions.write({"step": step, "id": inputs[i].sample.id, "completion": inputs[i].completion,
                                "reward": float(scored.rewards.view(-1)[i]),
                                "advantage": float(masked_mean(advantages[i], rollouts.completion_mask[i]))})
        if state["bad_steps"] >= cfg.trainer.max_bad_steps:
            raise TrainingError(
                f"steps {step - state['bad_steps'] + 1}-{step}: every optimizer update had a non-finite gradient "
                f"norm (NaN / inf loss or gradients), {state['bad_steps']} steps in a row "
                f"(trainer.max_bad_steps); none was applied, the weights are those of step "
                f"{step - state['bad_steps']}. Fix: a lower trainer.lr (now {cfg.trainer.lr:g}) or "
                "trainer.max_grad_norm, check the rewards; resume from the last checkpoint with trainer.resume.")
        state.update(step=step, kl_coef=kl_coef)
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step < cfg.trainer.max_steps:
            save_hf(model, run.processor, out / f"checkpoint-{step}", strategy=strategy, dtype=cfg.model.dtype,
                    trainer_state=_trainer_state(state, reward_stats, train_data, strategy, skipped_media))
            if strategy.is_main:
                prune(out, cfg.trainer.keep_checkpoints)
        bar.update(1)
        bar.set_postfix(reward=_fmt(row["reward/mean"], 3), acc=_fmt(row.get("eval/accuracy")))
    bar.close()

    after = run_eval()
    metrics.write({"step": cfg.trainer.max_steps, "final": True, **{f"eval/{k}": v for k, v in after.items()}})
    metrics.close()
    completions.close()
    summary = {"before": state["before"], "after": after.get("accuracy"),
               "heldout": len(eval_samples), "seconds": round(time.time() - started, 1),
               "steps": cfg.trainer.max_steps, "skipped_media": int(strategy.all_reduce(skipped_media)),
               "world_size": world,
               "checkpoint": str(out / "checkpoint-final"), "trained": trained_text(run.parameters, cfg.model)}
    try:
        save_hf(model, run.processor, out / "checkpoint-final", strategy=strategy, dtype=cfg.model.dtype,
                trainer_state=_trainer_state(state, reward_stats, train_data, strategy, skipped_media), final=True)
    except CheckpointError as exc:
        if strategy.is_main:  # the run's results are still recorded
            summary["checkpoint_error"] = str(exc)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        raise
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
            micros = micro_batch_rows(rows, rollouts.n, lengths, micro_batch_groups)
            # High-entropy selection: the threshold is the whole (global) mini-batch's; when it is
            # split into passes or ranks, one no-grad pass over it finds the threshold first.
            selecting = alg.high_entropy_ratio < 1
            threshold = selected_units = None
            if selecting and (len(micros) > 1 or strategy.world_size > 1):
                threshold, selected_units = _selection_threshold(
                    model, strategy, rollouts, micros, mask, alg, temps, forward_logprobs, pad_id)
            parts = []
            for micro in micros:
                part = rollouts if len(micro) == n_rows else select_rows(rollouts, micro, pad_id)
                idx, width = torch.tensor(micro, device=mask.device), part.completion_ids.shape[1]
                cut = lambda t: None if t is None else t[idx, :width]  # noqa: E731
                logps, entropy = forward_logprobs(
                    model, part.prompts, part.completion_ids, part.completion_mask,
                    temperature=_first(temps, width),
                    with_entropy=alg.entropy_coef > 0 or selecting, entropy_grad=alg.entropy_coef > 0)
                weight = micro_batch_weight(cut(mask), units, alg.aggregation, world_size=strategy.world_size)
                select, pg_scale = None, 1.0
                if selecting:
                    if threshold is None:  # one pass on one rank: this forward's entropies decide
                        threshold = high_entropy_threshold(entropy, cut(mask), alg.high_entropy_ratio)
                    select = (entropy.detach() >= threshold) & cut(mask).bool()
                    selected_units = selected_units or loss_units(select, alg.aggregation)
                    pg_weight = micro_batch_weight(select, selected_units, alg.aggregation,
                                                   world_size=strategy.world_size)
                    pg_scale = pg_weight / weight if weight else 0.0  # the policy term averages the selection
                loss, stats = policy_loss(
                    logps, cut(old_logps), cut(advantages), cut(mask), loss=alg.loss,
                    aggregation=alg.aggregation, clip_eps=alg.clip_eps, clip_eps_high=alg.clip_eps_high,
                    dual_clip=alg.dual_clip, max_tokens=max_tokens, drift_coef=alg.drift_coef,
                    behaviour_logps=cut(rollouts.behaviour_logps), tis_cap=alg.tis_cap, token_select=select,
                    ref_logps=cut(ref_logps), kl_coef=kl_coef if alg.kl_in == "loss" else 0.0,
                    kl_estimator=alg.kl_estimator, kl_clamp=alg.kl_clamp, entropy=entropy,
                    entropy_coef=alg.entropy_coef, pg_scale=pg_scale)
                strategy.backward(loss * weight)
                parts.append((stats, weight))
            updates.append({**{k: sum(st[k] * w for st, w in parts) for k in parts[0][0]},
                            "grad_norm": strategy.step()})
    # An update with a non-finite gradient norm was skipped by the strategy: counted, and left out
    # of the mean norm (its loss statistics stay, NaN where they were).
    norms = [u.pop("grad_norm") for u in updates]
    finite = [n for n in norms if math.isfinite(n)]
    means = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}
    return {**means, "grad_norm": sum(finite) / len(finite) if finite else float("nan"),
            "skipped": len(norms) - len(finite), "updates": len(norms)}


def _trainer_state(state: dict, reward_stats, train_data, strategy, skipped_media: int) -> dict:
    """What a checkpoint keeps of the loop (`trainer_state.json`; per-rank counts by rank).
    Collective."""
    return {**state, "skipped_media": strategy.gather(skipped_media), "reward_stats": dict(vars(reward_stats)),
            "loader": train_data.state_dict(), "world_size": strategy.world_size}


def _selection_threshold(model, strategy, rollouts, micros, mask, alg, temps, forward_logprobs, pad_id):
    """The high-entropy threshold of the whole mini-batch (every pass, every rank) and the loss
    units it selects (summed over the ranks), from one no-grad pass over the mini-batch."""
    entropies, masks = [], []
    with torch.no_grad():
        for micro in micros:
            part = select_rows(rollouts, micro, pad_id)
            width = part.completion_ids.shape[1]
            _, entropy = forward_logprobs(model, part.prompts, part.completion_ids, part.completion_mask,
                                          temperature=_first(temps, width),
                                          with_entropy=True, entropy_grad=False)
            entropies.append(entropy)
            masks.append(mask[torch.tensor(micro, device=mask.device), :width])
    flat = torch.cat([e[m.bool()] for e, m in zip(entropies, masks)])
    threshold = high_entropy_threshold(flat, torch.ones_like(flat, dtype=torch.bool), alg.high_entropy_ratio,
                                       gather=strategy.gather if strategy.world_size > 1 else None)
    units = sum(loss_units((e >= threshold) & m.bool(), alg.aggregation) for e, m in zip(entropies, masks))
    return threshold, strategy.all_reduce(units)


def _first(temps, width: int):
    """The temperatures of a micro-batch's `width` completion positions (per position with FIRE)."""
    return temps[:width] if isinstance(temps, torch.Tensor) else temps


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


def _progress(cfg: Config, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.trainer.max_steps, initial=initial, desc="grpo",
                disable=not (cfg.logging.progress and enabled), dynamic_ncols=True)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

