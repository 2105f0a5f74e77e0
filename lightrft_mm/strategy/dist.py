"""What every strategy shares: the process group, the rank's device and the collectives the loop
uses to be data-parallel without knowing which strategy runs (DESIGN.md §4).

Under `torchrun` the process group comes from its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): NCCL on GPUs, gloo on CPUs, with `strategy.timeout_s` as the
collective timeout. A sharded strategy started without torchrun runs as a world of one.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os

import torch
import torch.distributed as dist

from lightrft_mm.errors import ConfigError

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("strategy.device: 'cuda' but torch sees no CUDA device (CPU build of torch, or no "
                          "GPU). Fix: strategy.device=auto or cpu.")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join torchrun's process group (or make a world of one); nothing when it already exists."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed reads them
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


class Collectives:
    """rank / world_size / is_main and the collectives over the default process group.

    With no process group (the single strategy, one process) every collective is the identity.
    """

    device: torch.device

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, value, op: str = "sum"):
        """`value` (a number or a tensor) reduced over every rank with op `sum`, `mean`, `max` or
        `min`; a number comes back as a float, a tensor as a new tensor on its device."""
        if op not in (*OPS, "mean"):
            raise ValueError(f"all_reduce: unknown op {op!r}; expected sum, mean, max or min")
        is_tensor = isinstance(value, torch.Tensor)
        if self.world_size == 1:
            return value.clone() if is_tensor else float(value)
        t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
        t = t.to(self._comm_device)
        dist.all_reduce(t, op=OPS["sum" if op == "mean" else op])
        if op == "mean":
            t = t / self.world_size
        return t.to(value.device) if is_tensor else float(t)

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self, *, drain: bool = True) -> None:
        """Leave the process group (at the end of a run). `drain` first meets the other ranks at
        a barrier, so no rank tears its group down while a peer's last exchange with it is in
        flight (gloo then aborts the process: "terminate called without an active exception");
        after an error pass drain=False: a rank may be gone and would not come."""
        if self.distributed:
            if drain:
                self.barrier()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class Local(Collectives):
    """One process on its own (a world of one), whatever process group exists."""

    device = torch.device("cpu")
    distributed = False


LOCAL = Local()


def optimizer_step(optimizer, scaler=None, norm: float = 0.0) -> bool:
    """Step `optimizer` (through the fp16 loss `scaler` when there is one) and zero its gradients;
    True when the step was skipped: a non-finite gradient `norm` (the global one, so every rank
    skips alike) never reaches the weights, and the fp16 scaler skips inf / NaN gradients (its
    scale then drops)."""
    if scaler is None:
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    optimizer.zero_grad(set_to_none=True)
    return skipped


def autocast(device: torch.device, precision: str):
    """Autocast to the compute dtype of `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=COMPUTE_DTYPES[precision])


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
