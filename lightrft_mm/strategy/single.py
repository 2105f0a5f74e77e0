"""One process, one device."""

from __future__ import annotations

from pathlib import Path

import torch


class SingleStrategy:
    """Plain backward / clip / step on one device.

    Args:
        device: "cpu", "cuda" or "auto".
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
    """

    def __init__(self, device: str = "auto", max_grad_norm: float = 1.0):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            from lightrft_mm.errors import ConfigError

            raise ConfigError("strategy.device: 'cuda' but torch sees no CUDA device (CPU build of "
                              "torch, or no GPU). Fix: strategy.device=auto or cpu.")
        self.device = torch.device(device)
        self.max_grad_norm = max_grad_norm
        self.model = None
        self.optimizer = None

    def prepare(self, model, optimizer):
        self.model = model.to(self.device)
        self.optimizer = optimizer
        return self.model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def all_reduce(self, value: float) -> float:
        return value

    def gather_state_for_engine(self) -> dict:
        return self.model.state_dict()

    def save(self, path) -> None:
        """Optimizer state beside an HF checkpoint written by the trainer."""
        torch.save(self.optimizer.state_dict(), Path(path) / "optimizer.pt")

    def load(self, path) -> None:
        self.optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt", weights_only=True))
