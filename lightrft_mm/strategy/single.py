"""One process, one device; bf16 / fp16 by autocast over fp32 master weights."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from lightrft_mm.models.parts import model_parts
from lightrft_mm.strategy.dist import Collectives, autocast, optimizer_step, resolve_device


def autocast_forwards(model, device: torch.device, precision: str):
    """Run `model`'s forward, and those of its towers and projectors (which the shared-media
    paths call directly), under autocast to the compute dtype; the parameters stay fp32."""
    if precision == "fp32":
        return model
    parts = model_parts(model)
    for module in [model, getattr(model, "model", model), *parts.towers, *parts.projectors]:
        if getattr(module.forward, "_lightrft_autocast", False):
            continue
        forward = module.forward

        @functools.wraps(forward)
        def wrapped(*args, _forward=forward, **kwargs):
            with autocast(device, precision):
                return _forward(*args, **kwargs)

        wrapped._lightrft_autocast = True
        module.forward = wrapped
    return model


def clip_and_norm(params, max_grad_norm: float) -> float:
    """Clip the gradients of `params` to `max_grad_norm` (0 = no clipping); returns the norm before."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


class SingleStrategy(Collectives):
    """Plain backward / clip / step on one device.

    Args:
        cfg: the `strategy` config section (device, precision).
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
    """

    sharded_params = False

    def __init__(self, cfg, *, max_grad_norm: float = 1.0):
        self.device = resolve_device(cfg.device)
        self.precision = cfg.precision
        self.max_grad_norm = max_grad_norm
        self.model = self.optimizer = None
        # fp16: dynamic loss scaling; a step with inf / NaN gradients is skipped and counted.
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.skipped_steps = 0

    def prepare(self, model, make_optimizer):
        self.model = autocast_forwards(model.to(self.device, torch.float32), self.device, self.precision)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        return self.model, self.optimizer

    def prepare_frozen(self, model):
        return autocast_forwards(model.to(self.device), self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_and_norm(self.model.parameters(), self.max_grad_norm)
        self.skipped_steps += optimizer_step(self.optimizer, self.scaler, norm)
        return norm

    def full_state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def engine_weights(self):
        for name, value in self.model.state_dict().items():
            yield name, value.detach()

    def save(self, path) -> None:
        """The training state beside an HF checkpoint written by the trainer: the model's own
        fp32 state (LoRA layers unmerged; `model.safetensors` of the export may be another dtype
        or merged) and the optimizer's (and the fp16 scaler's)."""
        from safetensors.torch import save_model

        save_model(self.model, str(Path(path) / STATE_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "skipped_steps": self.skipped_steps,
                    "scaler": self.scaler.state_dict() if self.scaler else None}, Path(path) / "optimizer.pt")

    def load(self, path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(Path(path) / STATE_FILE), device=str(self.device))
        state = torch.load(Path(path) / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped_steps = state["skipped_steps"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


STATE_FILE = "training_model.safetensors"  # the single strategy's exact model state


__all__ = ["SingleStrategy", "autocast_forwards", "clip_and_norm"]
