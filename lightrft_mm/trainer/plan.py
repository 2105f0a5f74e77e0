"""`lightrft-mm train CONFIG --dry-run`: what a run will be and cost, before anything is allocated.

Builds the policy on the meta device from its config (tiny:<family>: the tiny builder's model moved
to meta; a local folder or a cached Hub id: its config.json via `models.hub.read_config`; otherwise
the built-in architecture card of `lightrft_mm.models.cards`; a Hub id without a card: its config.json
alone, downloaded unless offline), applies LoRA / freezing / activation
checkpointing as training would, reads the data's manifests, and prints the plan: world size, prompts
and completions per rank and step, optimizer steps, epochs over the data, tokens per step, and the
per-GPU memory estimate of `lightrft_mm.trainer.plan_memory` next to the GPU's capacity.
No weights, optimizer state, engine or data are allocated or read beyond the manifests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightrft_mm.config import Config
from lightrft_mm.errors import ConfigError, ModelError
from lightrft_mm.trainer.plan_memory import (GIB, Shape, Term, activation_terms, engine_term, human, knobs_for, peak,
                                             reference_term, state_terms, text_shape, vision_shape, vision_term)

ASSUMED_PROMPT_TOKENS = 1024  # when neither data.max_prompt_tokens nor a manifest gives prompt lengths


@dataclass
class Plan:
    """Everything `format_plan` prints."""

    config_path: str
    model_line: str
    source: str
    trains: str
    shape: Shape
    data: list[str]
    rows: int | None  # training rows, when every train folder's manifest gives its count
    prompt_tokens: int
    prompt_from: str
    world: int
    capacity: float
    capacity_from: str
    terms: list[Term] = field(default_factory=list)
    without_ckpt: float = 0.0
    with_ckpt: float = 0.0
    total: float = 0.0
    phase: str = ""
    lines: list[str] = field(default_factory=list)  # the run section


def meta_policy(model_cfg):
    """The policy on the meta device and where its architecture came from.

    Args:
        model_cfg: the `model` config section.

    Returns:
        (model with meta parameters, a sentence naming the architecture's source).

    Raises:
        ModelError: no config.json is available offline and no card matches.
    """
    import torch

    name = model_cfg.name_or_path
    if name.startswith("tiny:"):
        from lightrft_mm.models.tiny import build_tiny

        model, _ = build_tiny(name[len("tiny:"):], tokenizer=model_cfg.tiny_tokenizer)
        return model.to("meta"), "architecture of the tiny builder (random weights, built offline by train)"
    from lightrft_mm.models import hub
    from lightrft_mm.models.cards import card_names, find_card

    revision = getattr(model_cfg, "revision", "") or None
    config = hub.read_config(name, revision)
    source = f"architecture from {name}'s config.json"
    card = find_card(name) if config is None else None
    if card is not None:
        hub_id, config = card
        matched = "" if name == hub_id else f", matched by the folder name of {name}, which is not there yet"
        source = (f"architecture from the built-in card of {hub_id} (lightrft_mm/models/cards{matched}); the real "
                  "config.json wins when downloaded")
    elif config is None:  # no card: config.json alone from the Hub, unless offline
        config = hub.read_config(name, revision, download=True)
        source = f"architecture from {name}'s config.json (downloaded alone, no weights)"
    if config is None:
        raise ModelError(f"model.name_or_path: {name!r} has no config.json here (not a local folder, not in the "
                         "Hugging Face cache, not downloadable now) and no built-in architecture card (cards: "
                         f"{', '.join(card_names())}). Fix: download it first (huggingface-cli download {name} "
                         "config.json), or point model.name_or_path at a local model folder.")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    config = dict(config)
    try:
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    except (KeyError, ValueError) as e:
        raise ModelError(f"model.name_or_path: {name!r}: transformers cannot read its config ({e}).") from e
    auto = (AutoModelForImageTextToText if "vision_config" in config
            else AutoModelForMultimodalLM if "audio_config" in config else AutoModelForCausalLM)
    with torch.device("meta"):
        model = auto.from_config(hf_config, trust_remote_code=model_cfg.trust_remote_code)
    return model, source


def largest_unit(model) -> int:
    """Own parameters (not those of nested units) of the largest unit FSDP2 shards (strategy.fsdp2)."""
    from lightrft_mm.models.parts import model_parts

    parts = model_parts(model)
    embedding = [parts.embedding] if parts.embedding is not None else []  # a tied pair stays in the root
    units = [*parts.blocks, *parts.projectors, *parts.towers, *embedding, model]
    claimed: set[int] = set()
    sizes = []
    for unit in units:  # bottom up: a unit owns what no unit inside it owns
        own = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        sizes.append(sum(p.numel() for p in own))
    return max(sizes)


def model_shape(model, counts: dict[str, int]) -> Shape:
    """The estimate's view of the meta model; `counts`: apply_trainable's params/<part>/* counts."""
    params = list(model.parameters())
    return Shape(params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                 trainable_tensors=sum(1 for p in params if p.requires_grad), largest_unit=largest_unit(model),
                 vision_trains=counts.get("params/vision/trainable", 0) > 0, **text_shape(model.config),
                 **vision_shape(model.config))


def read_data(cfg: Config) -> tuple[list[str], int | None, int | None]:
    """One line per data folder, the training rows (None when a train folder's count is unknown)
    and the longest prompt the manifests record (None when none records one)."""
    lines, rows, longest = [], 0, None
    for key in ("train", "eval"):
        for i, item in enumerate(getattr(cfg.data, key)):
            path = Path(item)
            count, text = None, ""
            if path.is_file():
                count = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
                text = f"{count:,} rows (.jsonl)"
            elif (path / "manifest.json").is_file():
                manifest = json.loads((path / "manifest.json").read_text())
                count, tokens = manifest.get("count"), manifest.get("prompt_tokens") or {}
                text = f"{count:,} rows (manifest)" if count is not None else "manifest without a row count"
                if tokens.get("max"):
                    text += f", prompts {tokens.get('min')}-{tokens['max']} tokens (median {tokens.get('p50')})"
                    longest = max(longest or 0, tokens["max"])
            elif path.is_dir():
                text = "no manifest.json (not written by prepare): rows unknown"
            elif cfg.data.synthetic and i == 0:
                text = f"not prepared yet: data.synthetic={cfg.data.synthetic} generates it when training starts"
            else:
                text = "not prepared yet (run the prepare command of the recipe's first line)"
            lines.append(f"{key:<5} {item}: {text}")
            if key == "train":
                rows = None if rows is None or count is None else rows + count
    return lines, rows, longest


def gpu_capacity(gpu_memory: float | None) -> tuple[float, str]:
    """Bytes of one GPU and where the number came from."""
    import torch

    if gpu_memory is not None:
        return gpu_memory * GIB, "given by --gpu-memory"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"torch.cuda: {props.name}"
    return 80.0 * GIB, "assumed: no GPU here; --gpu-memory GiB sets it"


def make_plan(cfg: Config, *, config_path: str, world_size: int, gpu_memory: float | None = None) -> Plan:
    """Build the meta model, read the manifests and estimate the run (see the module doc).

    Args:
        cfg: the validated config.
        config_path: the YAML file, for the header.
        world_size: processes (GPUs) the run will use.
        gpu_memory: GiB of one GPU (None: torch.cuda's, else 80, labelled as assumed).

    Returns:
        The Plan `format_plan` prints.

    Raises:
        ConfigError: the world size does not fit the strategy or the batch.
        ModelError: the model's architecture is not available offline.
    """
    from lightrft_mm.models.trainable import apply_trainable, trained_text

    if world_size < 1:
        raise ConfigError(f"--world-size: {world_size} is not a number of processes. Fix: 1 or more.")
    if world_size > 1 and cfg.strategy.name == "single":
        raise ConfigError(f"--world-size {world_size}: strategy.name=single runs one process. Fix: "
                          "strategy.name=fsdp2 or deepspeed, or --world-size 1.")
    d, r, alg = cfg.data, cfg.rollout, cfg.algorithm
    if d.batch_size % world_size:
        raise ConfigError(f"data.batch_size: {d.batch_size} prompts per step cannot be split evenly over "
                          f"{world_size} ranks (each rank takes whole prompt groups). Fix: a multiple of {world_size}.")
    model, source = meta_policy(cfg.model)
    counts = apply_trainable(model, cfg.model)
    shape = model_shape(model, counts)
    data_lines, rows, longest = read_data(cfg)
    if d.max_prompt_tokens:
        prompt = min(d.max_prompt_tokens, longest) if longest else d.max_prompt_tokens
        shorter = prompt < d.max_prompt_tokens
        prompt_from = "data.max_prompt_tokens" + (", the longest prompt of the manifests" if shorter else "")
    elif longest:
        prompt, prompt_from = longest, "the longest prompt of the manifests"
    else:
        prompt, prompt_from = ASSUMED_PROMPT_TOKENS, "assumed: set data.max_prompt_tokens"
    capacity, capacity_from = gpu_capacity(gpu_memory)
    plan = Plan(config_path, f"{cfg.model.name_or_path}: {type(model).__name__}, {shape.params:,} parameters",
                source, trained_text(counts, cfg.model), shape, data_lines, rows, prompt, prompt_from, world_size,
                capacity, capacity_from)

    per_rank = d.batch_size // world_size
    seq = prompt + r.max_new_tokens
    steps = cfg.trainer.max_steps * alg.epochs * alg.mini_batches
    groups_per_mini = -(-per_rank // min(alg.mini_batches, per_rank))
    micro_groups = min(cfg.trainer.micro_batch_groups or groups_per_mini, groups_per_mini)
    plan.lines = [
        f"strategy {cfg.strategy.name}" + (f" (ZeRO-{cfg.strategy.zero_stage})" if cfg.strategy.name == "deepspeed"
                                           else "") + f", precision {cfg.strategy.precision}, rollout engine "
        f"{r.engine}" + (f" ({r.vllm.mode})" if r.engine == "vllm" else "") + f", world size {world_size}",
        f"per rank and step: {per_rank} prompts x {r.n} = {per_rank * r.n} completions "
        f"(all ranks: {d.batch_size} prompts, {d.batch_size * r.n} completions)"
        + (f"; DAPO dynamic sampling may draw up to {alg.dynamic_sampling_max_batches}x as many"
           if alg.dynamic_sampling else ""),
        f"optimizer steps: {steps:,} ({cfg.trainer.max_steps} steps x {alg.epochs} epoch(s) x {alg.mini_batches} "
        f"mini-batch(es))",
        "epochs over the data: " + (f"{cfg.trainer.max_steps * d.batch_size / rows:.2f} ({cfg.trainer.max_steps} "
                                    f"steps x {d.batch_size} prompts / {rows:,} rows)" if rows
                                    else "unknown until the training data is prepared (row count)"),
        f"tokens per step (prompt {prompt} [{prompt_from}] + max response {r.max_new_tokens}, an upper bound): "
        f"per rank {per_rank * r.n * seq:,}, total {d.batch_size * r.n * seq:,}",
        f"training pass (micro-batch): {micro_groups} group(s) x {r.n} = {micro_groups * r.n} rows x {seq} tokens",
    ]
    act, head, plan.without_ckpt, plan.with_ckpt = activation_terms(cfg, shape, micro_groups * r.n, seq)
    plan.terms = [*state_terms(cfg, shape, world_size), reference_term(cfg, shape, world_size), act,
                  vision_term(cfg, shape, micro_groups, prompt), head, engine_term(cfg, shape, per_rank * r.n, seq,
                                                                                   capacity)]
    plan.total, plan.phase = peak(plan.terms)
    return plan


def format_plan(plan: Plan) -> str:
    """The printed plan: header, model, data, run, memory table, largest term, warning."""
    gib = human
    out = [f"dry run: {plan.config_path} (no weights allocated: the model's parameters are on the meta device)",
           f"model    {plan.model_line}", f"         {plan.source}", f"         trains: {plan.trains}"]
    out += [f"data     {line}" for line in plan.data]
    out += [f"run      {line}" for line in plan.lines]
    width = max(len(t.name) for t in plan.terms + [Term('total (peak: training phase)', 0, '')]) + 2
    out += ["", "memory per GPU (estimate; formulas: lightrft_mm/trainer/plan_memory.py)",
            f"  {'term':<{width}}{'bytes':>12}  phase    how"]
    for t in plan.terms:
        out.append(f"  {t.name:<{width}}{gib(t.bytes):>12}  {t.phase:<8} {t.how}")
    out.append(f"  (activations without / with model.gradient_checkpointing: {gib(plan.without_ckpt)} / "
               f"{gib(plan.with_ckpt)})")
    out.append(f"  {'total (peak: ' + plan.phase + ' phase)':<{width}}{gib(plan.total):>12}")
    out.append(f"  {'GPU capacity':<{width}}{gib(plan.capacity):>12}  ({plan.capacity_from})")
    counted = [t for t in plan.terms if t.phase in ("both", "train" if plan.phase == "training" else "rollout")]
    largest = max(counted, key=lambda t: t.bytes)
    out.append(f"largest term: {largest.name} ({gib(largest.bytes)}, {largest.bytes / plan.total:.0%} of the "
               f"total)")
    if plan.total > plan.capacity:
        ranked = sorted(counted, key=lambda t: -t.bytes)[:3]
        knobs = "; ".join(f"{t.name}: {knobs_for(t.name)}" for t in ranked if knobs_for(t.name))
        out.append(f"warning: the estimate ({gib(plan.total)}) exceeds the GPU's {gib(plan.capacity)}: this "
                   f"run would run out of memory. What reduces it -- {knobs}.")
    else:
        out.append(f"fits: {gib(plan.total)} of {gib(plan.capacity)} ({plan.total / plan.capacity:.0%}).")
    return "\n".join(out)


def dry_run(config_path: str, overrides: list[str], *, world_size: int | None, gpu_memory: float | None) -> int:
    """`lightrft-mm train CONFIG --dry-run`: load and validate the config, print the plan."""
    from lightrft_mm.config import load_config
    from lightrft_mm.strategy.dist import launched_world_size

    cfg = load_config(config_path, overrides)
    plan = make_plan(cfg, config_path=config_path, world_size=world_size or launched_world_size(),
                     gpu_memory=gpu_memory)
    print(format_plan(plan))
    return 0
