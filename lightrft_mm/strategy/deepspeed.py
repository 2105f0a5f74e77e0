"""DeepSpeed ZeRO stage 1 / 2 / 3 under torchrun.

Gradient accumulation is the caller's: the engine runs with `gradient_accumulation_steps: 1`
and `managed_gradient_accumulation: false`, so every `backward` adds to the gradients
unscaled and `step()` is the accumulation boundary, whatever the number of micro-batches
(DeepSpeed's own counter would scale each loss by 1/gas and step every gas micro-batches).
ZeRO averages the accumulated gradients over the ranks.

bf16 / fp16 keep the module in the compute dtype and fp32 master weights and optimizer state
in the ZeRO optimizer; gradients accumulate and reduce in fp32. The optimizer is the caller's
`torch.optim` one (no fused-Adam build). The model is not built under `zero.Init`: ZeRO-3
partitions it in `prepare`, so each rank holds it whole for a moment.

Under ZeRO-3 every forward gathers parameters collectively: `generate` needs
`synced_gpus=True` when ranks may finish at different lengths (without it they stop at the
collective timeout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightrft_mm.errors import ConfigError
from lightrft_mm.models.parts import model_parts
from lightrft_mm.strategy.dist import COMPUTE_DTYPES, Collectives, init_process_group, resolve_device

CHECKPOINT_DIR, TAG = "deepspeed", "state"


def deepspeed_config(cfg, max_grad_norm: float) -> dict:
    """The DeepSpeed config of the `strategy` section (see the module docstring for why).

    Raises:
        ConfigError: for a combination DeepSpeed cannot run.
    """
    if cfg.offload == "all" and cfg.zero_stage != 3:
        raise ConfigError(f"strategy.offload: 'all' offloads parameters, which ZeRO stage {cfg.zero_stage} does "
                          "not shard. Fix: strategy.zero_stage=3, or strategy.offload=optimizer.")
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 1:
        zero["overlap_comm"] = False  # unmanaged accumulation allows overlap only where gradients partition
    if cfg.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # DeepSpeed derives train_batch_size from the world size
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload steps the caller's torch optimizer on the CPU
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.precision != "fp32":
        # Gradients accumulate over micro-batches and reduce over ranks in fp32 (as fsdp2's
        # reduce_dtype); only the forward and backward compute in bf16 / fp16.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


class DeepSpeedStrategy(Collectives):
    """DeepSpeed ZeRO data parallel.

    Args:
        cfg: the `strategy` config section (device, precision, zero_stage, offload, timeout_s).
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
    """

    def __init__(self, cfg, *, max_grad_norm: float = 1.0):
        self.device = resolve_device(cfg.device)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("strategy.precision: fp16 needs a GPU (DeepSpeed's fp16 loss scaling does not run "
                              "on CPU). Fix: strategy.precision=bf16 or fp32.")
        self.config = deepspeed_config(cfg, max_grad_norm)  # bad combinations fail before joining the group
        init_process_group(self.device, cfg.timeout_s)
        import deepspeed  # only here: importing the package must not import DeepSpeed

        self._ds = deepspeed
        self.cfg, self.precision, self.max_grad_norm = cfg, cfg.precision, max_grad_norm
        self.sharded_params = cfg.zero_stage == 3
        self.engine = self.optimizer = None

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps) if self.engine is not None else 0

    def prepare(self, model, make_optimizer):
        """Returns (the engine, its ZeRO optimizer). The engine is called like the model (its
        forward runs the bookkeeping ZeRO needs between micro-batches) and passes every other
        attribute (`generate`, `config`, `model`, ...) through to the HF model; its `train()`
        and `eval()` set the HF model's mode (and return None)."""
        # fp32: cast a model loaded in bf16 up, so the optimizer steps fp32 weights. bf16 / fp16:
        # the engine casts the parameters (not the buffers, e.g. RoPE's inv_freq) and keeps fp32
        # masters of them in the ZeRO optimizer.
        self._check_zero3(model)
        self._register_direct_weights(model)
        model = model.to(self.device, torch.float32) if self.precision == "fp32" else model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = self._ds.initialize(
            model=model, model_parameters=params, optimizer=make_optimizer, config=self.config)
        return self.engine, self.optimizer

    def _register_direct_weights(self, model) -> None:
        """ZeRO-3 gathers a module's parameters when its forward runs; an encoder that reads a
        child embedding's weight without calling it (Qwen2-Audio's `embed_positions.weight`)
        has that weight registered as an external parameter of the encoder."""
        if not self.sharded_params:
            return
        for tower in model_parts(model).towers:
            for child in tower.children():
                if isinstance(child, torch.nn.Embedding):
                    self._ds.zero.register_external_parameter(tower, child.weight)

    def _check_zero3(self, model) -> None:
        """ZeRO-3 gathers a parameter only inside the forward of the module that owns it. A base
        model's own parameters (LLaVA-NeXT's image_newline) are used by its feature methods, which
        transformers' generate calls directly: ZeRO-3 cannot serve them."""
        if self.sharded_params and model_parts(model).loose:
            loose = [n for n, _ in getattr(model, "model", model).named_parameters(recurse=False)]
            raise ConfigError(f"strategy.zero_stage: 3 cannot shard {type(model).__name__}'s own parameters "
                              f"({', '.join(loose)}), which its image-feature method uses outside any forward. Fix: "
                              "strategy.name=fsdp2 (keeps them whole), or strategy.zero_stage=2.")

    def prepare_frozen(self, model):
        """ZeRO-3: sharded by an inference-only engine (its forwards are collective like the
        policy's); otherwise a replicated copy in the compute dtype on the device."""
        model = model.to(self.device, COMPUTE_DTYPES[self.precision]).eval().requires_grad_(False)
        if not self.sharded_params:
            return model
        self._check_zero3(model)
        self._register_direct_weights(model)
        config = {k: v for k, v in self.config.items() if k in ("train_micro_batch_size_per_gpu", "bf16", "fp16")}
        zero = {"stage": 3}
        if self.cfg.offload == "all":
            zero["offload_param"] = {"device": "cpu"}
        engine, *_ = self._ds.initialize(model=model, config={**config, "zero_optimization": zero,
                                                              "steps_per_print": 2**62})
        return engine.module

    def backward(self, loss: torch.Tensor) -> None:
        """Adds this micro-batch's gradients (unscaled; collective under ZeRO 2 and 3, which
        reduce in the backward: every rank runs the same number of micro-batches)."""
        # The engine's forward starts each micro-batch with this; a forward that bypassed it
        # (the HF model called directly) would leave ZeRO-3 copying, not adding, this
        # micro-batch's gradients. Called twice it is a no-op.
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip, step and zero the gradients; the norm is ZeRO's, before clipping, over
        every rank's partitions (inf on an fp16 overflow, whose step is skipped)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def full_state_dict(self) -> dict:
        """fp32 master values of the trainable parameters (gathered one parameter at a time),
        the module's values for frozen parameters and buffers; keys of the HF state dict."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: value for name, value in self._full_values(safe_get_full_fp32_param) if self.is_main}

    def engine_weights(self):
        """One tensor at a time: under ZeRO-3 each parameter is gathered, yielded and released
        before the next (fp32 masters of the trainable ones)."""
        from deepspeed.utils import safe_get_full_fp32_param

        for name, value in self._full_values(safe_get_full_fp32_param, keep=False):
            yield name, value if self.is_main else None

    def _full_values(self, get_fp32, keep: bool = True):
        module = self.engine.module
        if self.sharded_params:
            # Parameters prefetched by the last forwards may still be in flight: settle them
            # before gathering (a frozen one is gathered and re-partitioned below).
            self.engine.empty_partition_cache()
        values: dict[int, torch.Tensor] = {}  # tied tensors gathered once (kept only for a dict)
        for name, tensor in module.state_dict(keep_vars=True).items():
            value = values.get(id(tensor))
            if value is None:
                value = self._full_value(tensor, get_fp32)
                if keep:
                    values[id(tensor)] = value
            yield name, value

    def _full_value(self, tensor, get_fp32) -> torch.Tensor:
        full = get_fp32(tensor) if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad else None
        if full is None and hasattr(tensor, "ds_id"):  # a frozen ZeRO-3 parameter: gather its shards
            with self._ds.zero.GatheredParameters([tensor]):
                full = tensor.detach().clone()
        if full is None:
            full = tensor.detach()
        return full.cpu().clone() if self.is_main else full.new_empty(0)

    def save(self, path) -> None:
        """The engine state (ZeRO partitions, fp32 masters, optimizer state, loss scale) of
        every rank into `path`/deepspeed."""
        self.engine.save_checkpoint(str(Path(path) / CHECKPOINT_DIR), tag=TAG, save_latest=False)

    def load(self, path) -> None:
        """Restore `save`'s state (same world size and ZeRO stage)."""
        folder = Path(path) / CHECKPOINT_DIR
        if not (folder / TAG).is_dir():
            raise ConfigError(f"{folder / TAG}: no DeepSpeed state to resume from (saved by another strategy?). "
                              "Fix: resume with the strategy that wrote the checkpoint.")
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise ConfigError(f"{folder / TAG}: DeepSpeed could not load this checkpoint (see its log above).")


__all__ = ["DeepSpeedStrategy", "deepspeed_config"]
