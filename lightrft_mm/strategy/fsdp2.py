"""PyTorch FSDP2 (`fully_shard`) under torchrun.

Units, bottom up: every decoder layer and vision / audio block, the projector, the tower (so
`generate` and the shared-media paths, which call the tower directly, meet whole weights), the
input embeddings (untied; a tied embedding and head stay in the root), and the root. bf16 / fp16 use
`MixedPrecisionPolicy(param_dtype=<compute>, reduce_dtype=fp32)` over fp32 sharded parameters,
so the optimizer steps fp32 master weights; `offload: all` adds `CPUOffloadPolicy`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

# forward_logprobs slices the root's logits and never writes into them in place, so the view
# FSDP2 warns about at every forward is safe.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

from lightrft_mm.models.parts import model_parts
from lightrft_mm.strategy.dist import (COMPUTE_DTYPES, Collectives, init_process_group, optimizer_step,
                                      resolve_device)


class FSDP2Strategy(Collectives):
    """Fully sharded data parallel (FSDP2).

    Args:
        cfg: the `strategy` config section (device, precision, offload, timeout_s).
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
    """

    sharded_params = True

    def __init__(self, cfg, *, max_grad_norm: float = 1.0):
        self.device = resolve_device(cfg.device)
        init_process_group(self.device, cfg.timeout_s)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.precision, self.offload, self.max_grad_norm = cfg.precision, cfg.offload, max_grad_norm
        self.model = self.optimizer = None
        self.loose: list = []
        self.skipped_steps = 0
        self.scaler = None
        if cfg.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type)

    def _shard(self, model, param_dtype):
        """Broadcast rank 0's weights (every rank starts equal), then shard unit by unit."""
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
        kwargs = {"mesh": self.mesh}
        if param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if self.offload == "all":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        parts = model_parts(model)
        for module in [*parts.blocks, *parts.projectors, *parts.towers]:
            fully_shard(module, **kwargs)
        if parts.embedding is not None:  # untied; a tied embedding and head stay in the root (ModelParts)
            fully_shard(parts.embedding, **kwargs)
        # The base model's own parameters are used by its feature methods outside any forward, where
        # a shard cannot be gathered: they stay whole on every rank, their gradients averaged in step().
        self.loose = parts.loose
        fully_shard(model, **kwargs, ignored_params=set(parts.loose) or None)
        _keep_output_capture(model)
        # FSDP2 picks its root at the first forward, and must meet the root first; transformers'
        # generate and the shared-media path call the towers directly before the root forward,
        # so one short text-only forward through the root settles it.
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=self.device), use_cache=False)
        return self._resharded(model)  # the optimizer must hold the sharded parameters

    def prepare(self, model, make_optimizer):
        compute = None if self.precision == "fp32" else COMPUTE_DTYPES[self.precision]
        self.model = self._shard(model.to(self.device, torch.float32), compute)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        return self.model, self.optimizer

    def prepare_frozen(self, model):
        dtype = COMPUTE_DTYPES[self.precision]
        return self._shard(model.to(self.device, dtype), None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        loose = [p for p in self.loose if p.grad is not None]
        for p in loose:
            p.grad = self.all_reduce(p.grad, "mean")
        sharded = [p for p in self.model.parameters() if isinstance(p.grad, DTensor)]
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded], foreach=True) if sharded else torch.zeros(())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the norm over every rank's shards
        if loose:
            norm = torch.linalg.vector_norm(torch.stack([norm.to(self.device),
                                                          *[torch.linalg.vector_norm(p.grad) for p in loose]]))
        if self.max_grad_norm > 0:
            for group in (sharded, loose):
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, self.max_grad_norm, norm, foreach=True)
        norm = float(norm)
        self.skipped_steps += optimizer_step(self.optimizer, self.scaler, norm)
        return norm

    def _resharded(self, model=None):
        """The model with every unit's parameters back in their sharded form (the root keeps
        its unsharded ones after a forward), as the optimizer and state-dict helpers expect."""
        model = self.model if model is None else model
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return model

    def full_state_dict(self) -> dict:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self._resharded(), options=options)
        return state if self.is_main else {}

    def engine_weights(self):
        from torch.distributed.tensor import DTensor

        for name, value in self._resharded().state_dict().items():
            full = value.full_tensor() if isinstance(value, DTensor) else value  # all-gather of one tensor
            yield name, full.detach().cpu() if self.is_main else None

    def _training_state(self) -> dict:
        model = self._resharded()
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, self.optimizer),
                 "skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, path) -> None:
        """The training state, sharded per rank (torch.distributed.checkpoint) in `path`/optimizer:
        the fp32 model shards (exact, LoRA layers unmerged) and the optimizer's (and the fp16
        scaler's). Loaded back with the same world size."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._training_state(), checkpoint_id=str(Path(path) / "optimizer"))

    def load(self, path) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._training_state()
        dcp.load(state, checkpoint_id=str(Path(path) / "optimizer"))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.skipped_steps = int(state["skipped_steps"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _keep_output_capture(model) -> None:
    """`fully_shard` gives every unit a new (FSDP) class, and transformers looks up the outputs a
    model can record (the hidden states LLaVA selects its image features from) by class: register
    them for the new classes too."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without per-class output capture needs nothing
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and getattr(module, "_can_record_outputs", None):
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
