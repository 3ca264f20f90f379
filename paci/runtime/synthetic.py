"""Synthetic stages: F/B/U take a configured time without using the CPU, and carry real tensors.

Two CPU cores cannot run eight real compute stages in parallel; sleeping stages can. With them
the runtime's own scheduling, communication and overhead are measured at P = 8 on any machine:
the same Executor, DistTransport and schedules as training, only the arithmetic is replaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticCosts:
    forward_s: float
    backward_s: float
    update_s: float = 0.0
    activation_shape: tuple[int, ...] = (8, 128, 256)  # 1 MiB of float32 per message

    def __post_init__(self) -> None:
        if self.forward_s < 0 or self.backward_s < 0 or self.update_s < 0:
            raise ValueError("synthetic op times must be >= 0")
        if not self.activation_shape or any(d < 1 for d in self.activation_shape):
            raise ValueError(f"activation shape must be positive, got {self.activation_shape}")


class SyntheticStage:
    """Duck-types `Stage` for the executor: same ops, same version bookkeeping, sleeps for compute."""

    def __init__(self, index: int, num_stages: int, costs: SyntheticCosts, device: torch.device) -> None:
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.costs, self.device = costs, device
        self.version = 0
        self.versions: dict[int, tuple[int, int]] = {}
        self._forward_version: dict[int, int] = {}

    def _output(self) -> torch.Tensor:
        return torch.ones(self.costs.activation_shape, device=self.device)

    def forward(self, mb: int, received: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.costs.forward_s)
        self._forward_version[mb] = self.version
        return None if self.is_last else self._output()

    def evaluate(self, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.costs.forward_s)
        return None if self.is_last else self._output()

    def backward(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.costs.backward_s)
        return self._backward_done(mb)

    def backward_input(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.costs.backward_s / 2)
        return self._backward_done(mb)

    def backward_weight(self, mb: int) -> None:
        time.sleep(self.costs.backward_s / 2)

    def _backward_done(self, mb: int) -> torch.Tensor | None:
        self.versions[mb] = (self._forward_version.pop(mb), self.version)
        return None if self.is_first else self._output()

    def step(self) -> None:
        time.sleep(self.costs.update_s)
        self.version += 1
