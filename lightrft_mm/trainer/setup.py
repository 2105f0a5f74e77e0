"""Building a run: everything the GRPO loop needs, set up once before its first step (DESIGN §4).

Every rank calls `build_run`; rank 0 alone creates the run folder and the synthetic data.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightrft_mm.config import Config, to_dict
from lightrft_mm.datasets.loader import (PromptLoader, batches, drop_unsupported, load_samples,
                                         prompt_token_counter)
from lightrft_mm.datasets.synthetic import ensure_synthetic
from lightrft_mm.errors import CheckpointError, ConfigError
from lightrft_mm.models import DTYPES, load_policy
from lightrft_mm.models.trainable import apply_trainable
from lightrft_mm.processors import make_adapter
from lightrft_mm.rewards import build_reward_set, check_routing
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.trainer.checkpoint import MANIFEST, checkpoints, resume_point
from lightrft_mm.trainer.backends import open_logger
from lightrft_mm.trainer.lock import LOCK, RunLock
from lightrft_mm.trainer.warmup import warmup

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What `build_run` sets up. `model` is the prepared (wrapped / sharded) policy and
    `ref_model` the frozen KL reference (None without a KL term; the policy itself, run with
    its LoRA adapters off, when LoRA trains from the loaded weights); `train_data` yields this
    rank's share of every global batch."""

    out: Path
    model: object
    processor: object
    adapter: object
    engine: object  # HFRolloutEngine or VLLMRolloutEngine
    ref_model: object
    sampling: SamplingParams
    train_data: PromptLoader
    eval_samples: list
    reward_fns: object
    eval_fns: object
    parameters: dict  # params/<part>/trainable and /frozen counts
    lock: RunLock | None = None  # the run folder's lock (rank 0)
    resume: Path | None = None  # the checkpoint the strategy state was loaded from
    logger: object = None  # the RunLogger: metrics.jsonl and the logging backends (rank 0 writes)


def build_run(cfg: Config, strategy) -> Run:
    """Model, adapter, data, rewards, the optional warm-up and reference, the strategy's
    prepared policy and the rollout engine on it."""
    lock = take_lock(cfg, strategy)
    try:
        out, resume = prepare_output_dir(cfg, strategy)
        return _build(cfg, strategy, out, lock, resume)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(cfg: Config, strategy, out: Path, lock, resume) -> Run:
    seed_everything(cfg.trainer.seed)
    model, processor = load_policy(cfg.model, seed=cfg.trainer.seed)
    counts = apply_trainable(model, cfg.model)  # frozen parts, activation checkpointing
    if cfg.trainer.padding_free and cfg.model.attn_implementation != "flash_attention_2" and strategy.is_main:
        log.warning("trainer.padding_free with %s attention: the packed sequence's mask is dense, so attention costs "
                    "grow with the square of the whole pack, not of each row (faster only where the MLP and output "
                    "head dominate). On a GPU use model.attn_implementation=flash_attention_2 (varlen kernels); "
                    "trainer.micro_batch_groups bounds the pack.", cfg.model.attn_implementation)
    adapter = make_adapter(model, processor, system_prompt=cfg.data.system_prompt or None,
                           image=cfg.image, video=cfg.video, audio=cfg.audio)
    model.to(strategy.device)

    # Data: each rank takes its share of every global batch, whole prompt groups.
    if strategy.is_main:
        ensure_synthetic(cfg.data)
    strategy.barrier()
    world = strategy.world_size
    token_len = prompt_token_counter(adapter) if cfg.data.max_prompt_tokens else None
    train_data = PromptLoader.from_config(cfg.data, seed=cfg.trainer.seed, token_len=token_len,
                                          modalities=adapter.modalities, rank=strategy.rank, world_size=world,
                                          batch_size=cfg.data.batch_size // world)
    eval_samples, _ = drop_unsupported(load_samples(cfg.data.eval, allow_outside_media=cfg.data.allow_outside_media),
                                       adapter.modalities, where="data.eval")
    if cfg.data.eval_max_samples:
        eval_samples = eval_samples[:cfg.data.eval_max_samples]
    check_media_kinds(train_data.samples + eval_samples, strategy)
    reward_fns = build_reward_set(cfg.rewards, cfg.scoring)
    unrewarded = check_routing(reward_fns, train_data.samples, eval_samples)
    if unrewarded and strategy.is_main:
        log.warning("no reward applies to samples of source(s) %s: their completions are left out of the loss "
                    "(counted in reward/invalid). Fix: the rewards' sources.", ", ".join(unrewarded))

    # Optional format warm-up (answer-free; every rank alike, before sharding), then the frozen
    # reference for the KL term, then the policy's strategy (fp32 master weights + optimizer).
    # A resumed run loads the trained policy from its checkpoint: it warms up again only to
    # rebuild a reference that is the warmed-up model (deterministic, so the same one).
    base_is_reference = cfg.model.lora.r > 0 and not cfg.warmup.steps
    needs_copy = cfg.algorithm.kl_coef > 0 and not base_is_reference
    logger = open_logger(out, cfg.logging, enabled=strategy.is_main, config=to_dict(cfg))
    if cfg.warmup.steps and (resume is None or needs_copy):
        warmup(model, adapter, batches(train_data.samples, cfg.warmup.batch_size, cfg.trainer.seed + 1),
               cfg.warmup, seed=cfg.trainer.seed, device=strategy.device,
               progress=cfg.logging.progress and strategy.is_main, packed=cfg.trainer.padding_free,
               logger=logger if resume is None else None)  # a resumed run logged its warm-up already
    # With LoRA and no warm-up the reference is the policy with its adapters off: no copy.
    ref_model = strategy.prepare_frozen(frozen_copy(model)) if needs_copy else None
    t = cfg.trainer
    model, _ = strategy.prepare(model, functools.partial(
        torch.optim.AdamW, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay))
    if resume is not None:
        strategy.load(resume)  # the policy and optimizer as they were; the loop restores the rest
        if strategy.is_main:
            log.info("resuming from %s", resume)
    if cfg.algorithm.kl_coef > 0 and base_is_reference:
        ref_model = model  # the loop runs it under models.lora.adapters_disabled
    engine = make_engine(cfg, model, processor, adapter, strategy, out)
    r = cfg.rollout
    sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, first_temperature=r.fire_temperature, first_top_k=r.fire_top_k,
                              repetition_penalty=r.repetition_penalty)
    return Run(out, model, processor, adapter, engine, ref_model, sampling, train_data, eval_samples,
               reward_fns, reward_fns.including(t.accuracy_reward), counts, lock, resume, logger)


def make_engine(cfg: Config, model, processor, adapter, strategy, out: Path):
    """The rollout engine: HF generate on the prepared policy, or a vLLM engine process."""
    if cfg.rollout.engine == "hf":
        return HFRolloutEngine(model, adapter, share_prefill=cfg.trainer.encode_prompts_once, comm=strategy)
    from lightrft_mm.models.lora import lora_config
    from lightrft_mm.rollout.vllm import start_engine

    lora = lora_config(getattr(model, "module", model))
    return start_engine(cfg, model, processor, adapter, strategy, folder=out / "vllm-engine", seed=cfg.trainer.seed,
                        dtype=DTYPES[cfg.model.dtype], model_type=getattr(model, "module", model).config.model_type,
                        lora_scaling=lora.lora_alpha / lora.r if lora is not None else None)


def take_lock(cfg: Config, comm) -> RunLock | None:
    """Rank 0 locks the run folder, before any other work; every rank stops when it is held."""
    out, lock, refused = Path(cfg.trainer.output_dir), None, None
    if comm.is_main:
        try:
            lock = RunLock(out).acquire()
        except ConfigError as exc:
            refused = str(exc)
    if comm.all_reduce(float(refused is not None), "max") > 0:
        raise ConfigError(refused or f"trainer.output_dir: {out} is in use by another run (rank 0 says who).")
    return lock


def prepare_output_dir(cfg: Config, comm) -> tuple[Path, Path | None]:
    """Check (every rank) and create (rank 0) the locked run folder; config.json records the run.
    Returns the folder and the checkpoint to resume from (None: a fresh start)."""
    t, out = cfg.trainer, Path(cfg.trainer.output_dir)
    resume = resume_point(out, t.resume)
    manifest = json.loads((resume / MANIFEST).read_text()) if resume else {}
    written_by = manifest.get("world_size", comm.world_size)
    if written_by != comm.world_size:
        raise CheckpointError(f"trainer.resume: {resume} was written by {written_by} process(es), resumed by "
                              f"{comm.world_size}: the sharded optimizer state, the data shards and every rank's RNG "
                              "belong to the first. Fix: resume with the same number of processes.")
    holds_run = any((out / name).exists() for name in RUN_FILES) or bool(checkpoints(out))
    if holds_run and not (t.overwrite or t.resume):
        raise ConfigError(f"trainer.output_dir: {out} already holds a run. Fix: trainer.resume=auto to continue it, "
                          "another output_dir, or trainer.overwrite=true to replace it (its checkpoints are deleted).")
    comm.barrier()  # every rank has looked before rank 0 changes it
    if comm.is_main:
        if holds_run and (t.overwrite or resume is None):
            if t.resume:
                log.warning("trainer.resume=%s: %s holds no checkpoint; starting from step 0", t.resume, out)
            for child in out.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        if resume is not None:
            for name in ("metrics.jsonl", "trajectories.jsonl"):
                _keep_rows_until(out / name, manifest["step"])  # the steps after the checkpoint are trained again
    comm.barrier()
    return out, resume


RUN_FILES = ("config.json", "metrics.jsonl")


def _keep_rows_until(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
                if _step_of(line) <= step]
        path.write_text("".join(rows), encoding="utf-8")


def _step_of(line: str) -> float:
    """A metrics row's step; a line cut short by a crash, and the final evaluation of a run that is
    now continued, count as after any checkpoint."""
    try:
        row = json.loads(line)
    except ValueError:
        return float("inf")
    return float("inf") if row.get("final") else row.get("step", 0)


def check_media_kinds(samples, strategy) -> None:
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


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
