"""Training strategies: how backward, optimizer steps, precision and state are distributed.

The trainer talks to the `Strategy` protocol only and never branches on the strategy's name:
`single` runs in one process, `fsdp2` shards with PyTorch FSDP2 and `deepspeed` with DeepSpeed
ZeRO, both under torchrun (docs/distributed.md).
"""

from __future__ import annotations

from typing import Protocol

from lightrft_mm.registry import Registry

STRATEGIES = Registry("strategy", entry_point_group="lightrft_mm.strategies")
STRATEGIES.register_lazy("single", "lightrft_mm.strategy.single:SingleStrategy")
STRATEGIES.register_lazy("fsdp2", "lightrft_mm.strategy.fsdp2:FSDP2Strategy")
STRATEGIES.register_lazy("deepspeed", "lightrft_mm.strategy.deepspeed:DeepSpeedStrategy")


class Strategy(Protocol):
    """DESIGN.md §4. A strategy is built from the `strategy` config section
    (`STRATEGIES.get(name)(cfg.strategy, max_grad_norm=...)`); building it joins the process group.

    Every method marked collective must be called by every rank, in the same order.
    """

    device: object
    rank: int
    world_size: int
    is_main: bool
    skipped_steps: int  # optimizer steps skipped by fp16 loss scaling (inf / NaN gradients)
    sharded_params: bool  # forwards gather parameters collectively: every rank must run the same modules

    def prepare(self, model, make_optimizer):
        """Wrap / shard the trainable model (fp32 master weights) and build its optimizer with
        `make_optimizer(trainable parameters)`; returns (model, optimizer)."""

    def prepare_frozen(self, model):
        """Place an inference-only model (the KL reference) for this strategy, in the compute dtype."""

    def backward(self, loss) -> None: ...

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the global gradient norm before clipping."""

    def all_reduce(self, value, op: str = "sum"):
        """A number or tensor reduced over every rank (sum, mean, max, min). Collective."""

    def gather(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order. Collective."""

    def barrier(self) -> None: ...

    def full_state_dict(self) -> dict:
        """The model's full state dict (HF names, CPU tensors) on the main rank, {} on the others.
        Collective."""

    def engine_weights(self):
        """Yield `(name, tensor)` over the full state dict, one tensor gathered at a time (the
        weights a separate rollout engine loads; the whole model is never held at once). The
        tensor is the full CPU value on the main rank and None on the others. Collective: every
        rank iterates to the end."""

    def save(self, path) -> None:
        """Optimizer (and, where sharded, engine) state into checkpoint folder `path`. Collective."""

    def load(self, path) -> None: ...

    def close(self, *, drain: bool = True) -> None:
        """Leave the process group (after a barrier unless drain=False, after an error)."""


def strategy_problems(cfg) -> list[str]:
    """Strategy choices that cannot work, found before any model loads (see `load_config`)."""
    import importlib.util

    from lightrft_mm.strategy.dist import launched_world_size

    s, problems = cfg.strategy, []
    world = launched_world_size()
    if world > 1 and s.name == "single":
        problems.append(f"strategy.name: 'single' under torchrun with {world} processes would run {world} "
                        "identical jobs into one folder. Fix: strategy.name=fsdp2 or strategy.name=deepspeed "
                        "(or launch without torchrun).")
    if cfg.data.batch_size % world:
        problems.append(f"data.batch_size: {cfg.data.batch_size} prompts per step cannot be split evenly over "
                        f"{world} ranks (each rank takes whole prompt groups). Fix: a multiple of {world}.")
    if s.precision == "fp16":
        import torch

        if s.device == "cpu" or not torch.cuda.is_available():
            problems.append("strategy.precision: fp16 needs a GPU (fp16 loss scaling is not supported on "
                            "CPU). Fix: strategy.precision=bf16 or fp32.")
    if s.name != "deepspeed" and s.zero_stage != 2:
        problems.append(f"strategy.zero_stage: {s.zero_stage} only applies to strategy.name=deepspeed. Fix: "
                        "remove it, or use the deepspeed strategy.")
    if s.name == "single" and s.offload != "none":
        problems.append("strategy.offload: the single strategy keeps everything on its device. Fix: "
                        "strategy.offload=none, or strategy.name=fsdp2 / deepspeed.")
    if s.name == "fsdp2" and s.offload == "optimizer":
        problems.append("strategy.offload: fsdp2 offloads parameters, gradients and optimizer state together. "
                        "Fix: strategy.offload=all (or none).")
    if s.name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            problems.append("strategy.name: deepspeed is not installed. Fix: pip install 'lightrft_mm[deepspeed]' "
                            "(on CPU machines add -c constraints-cpu.txt to keep the CPU build of torch).")
        if s.zero_stage == 3 and model_type_of(cfg.model.name_or_path, cfg.model.revision) in ZERO3_UNSERVED:
            problems.append(f"strategy.zero_stage: 3 cannot serve {cfg.model.name_or_path!r}: its base model owns "
                            "parameters (image_newline) that its image-feature method uses outside any forward, "
                            "where ZeRO-3 cannot gather them. Fix: strategy.name=fsdp2, or strategy.zero_stage=2.")
        if s.zero_stage == 3 and (cfg.model.lora.r or "llm" in cfg.model.freeze):
            problems.append("strategy.zero_stage: 3 with a frozen output head (model.lora, or model.freeze with "
                            "llm) fails: ZeRO-3 does not gather a frozen module's weights again when the backward "
                            "recomputes the chunked log-probs. Fix: strategy.name=fsdp2, or strategy.zero_stage=2.")
        if s.offload == "all" and s.zero_stage != 3:
            problems.append(f"strategy.offload: 'all' offloads parameters, which ZeRO stage {s.zero_stage} does "
                            "not shard. Fix: strategy.zero_stage=3, or strategy.offload=optimizer.")
    return problems


ZERO3_UNSERVED = ("llava_next",)  # model types whose feature methods read base-owned parameters


def model_type_of(name_or_path: str, revision: str | None = None) -> str:
    """`tiny:<family>`'s family, or the `model_type` of the config.json of a model folder or of a Hub
    id's cached copy, else of a Hub id's built-in card (models.cards); "" if unknown."""
    from lightrft_mm.errors import ModelError
    from lightrft_mm.models.hub import is_hub_id, read_config

    if name_or_path.startswith("tiny:"):
        return name_or_path[len("tiny:"):]
    try:
        config = read_config(name_or_path, revision or None)
    except ModelError:
        config = None
    if config is None and is_hub_id(name_or_path):
        from lightrft_mm.models.cards import find_card

        card = find_card(name_or_path)
        config = card[1] if card and card[0] == name_or_path else None  # the id itself, not a look-alike
    return config.get("model_type", "") if isinstance(config, dict) else ""
