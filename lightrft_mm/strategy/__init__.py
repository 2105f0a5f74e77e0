"""Training strategies: how backward, optimizer steps and state are distributed.

The trainer talks to the `Strategy` protocol only; `single` runs in one process.
"""

from __future__ import annotations

from typing import Protocol

from lightrft_mm.registry import Registry

STRATEGIES = Registry("strategy", entry_point_group="lightrft_mm.strategies")
STRATEGIES.register_lazy("single", "lightrft_mm.strategy.single:SingleStrategy")


class Strategy(Protocol):
    """DESIGN.md §4."""

    device: object

    def prepare(self, model, optimizer): ...

    def backward(self, loss) -> None: ...

    def step(self) -> float: ...

    def all_reduce(self, value: float) -> float: ...

    def gather_state_for_engine(self) -> dict: ...

    def save(self, path) -> None: ...

    def load(self, path) -> None: ...
