"""Synthetic stages: F/B/I/W/U take a configured time without using the CPU, and carry real tensors.

Two CPU cores cannot run eight real compute stages in parallel; sleeping stages can. With them
the runtime's own scheduling, communication and overhead are measured at P = 8 on any machine:
the same Executor, DistTransport and schedules as training, only the arithmetic is replaced.
The times can be one number for every stage or one per stage, e.g. a real model's profiled
costs (`paci.bench.synthetic_costs` turns the simulator's cost model into these).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

Times = float | tuple[float, ...]  # seconds: one for every stage, or one per stage


class StageTimes(NamedTuple):
    """One stage's sleep per op, in seconds; a split backward sleeps I = B - W, then W."""

    forward: float
    backward: float
    input_backward: float
    weight: float
    update: float


def _as_tuple(value: float | Sequence[float]) -> tuple[float, ...]:
    return (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)


@dataclass(frozen=True)
class SyntheticCosts:
    """Op times in seconds, each a number (every stage) or a tuple (one per stage).

    `weight_s` is W, the weight-gradient part of the full backward B; None means B/2.
    """

    forward_s: Times
    backward_s: Times
    update_s: Times = 0.0
    activation_shape: tuple[int, ...] = (8, 128, 256)  # 1 MiB of float32 per message
    weight_s: Times | None = None

    def __post_init__(self) -> None:
        given = [self.forward_s, self.backward_s, self.update_s] + ([] if self.weight_s is None else [self.weight_s])
        columns = [_as_tuple(value) for value in given]
        if any(not v >= 0 or math.isinf(v) for column in columns for v in column):
            raise ValueError("synthetic op times must be finite and >= 0")
        lengths = {len(column) for column in columns} - {1}
        if len(lengths) > 1 or 0 in lengths:
            raise ValueError(f"per-stage synthetic times need the same number of values (one per stage) in "
                             f"every op, got {[len(column) for column in columns]}")
        if any(self.at(s).input_backward < 0 for s in range(self.num_stages or 1)):
            raise ValueError("the weight-gradient time W must not exceed the full backward B on any stage")
        if not self.activation_shape or any(d < 1 for d in self.activation_shape):
            raise ValueError(f"activation shape must be positive, got {self.activation_shape}")

    @property
    def num_stages(self) -> int | None:
        """The stage count of the per-stage times; None when every op has one time for all stages."""
        given = (self.forward_s, self.backward_s, self.update_s, self.weight_s)
        longest = max(len(_as_tuple(value)) for value in given if value is not None)
        return longest if longest > 1 else None

    def at(self, stage: int) -> StageTimes:
        """The sleeps of stage `stage`."""
        def pick(value: Times) -> float:
            values = _as_tuple(value)
            return values[0] if len(values) == 1 else values[stage]

        backward = pick(self.backward_s)
        weight = backward / 2 if self.weight_s is None else pick(self.weight_s)
        return StageTimes(pick(self.forward_s), backward, backward - weight, weight, pick(self.update_s))


class SyntheticStage:
    """Duck-types `Stage` for the executor: same ops, same version bookkeeping, sleeps for compute."""

    def __init__(self, index: int, num_stages: int, costs: SyntheticCosts, device: torch.device) -> None:
        if costs.num_stages not in (None, num_stages):
            raise ValueError(f"synthetic costs are given for {costs.num_stages} stages, the run has {num_stages}")
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.costs, self.device = costs, device
        self.times = costs.at(index)
        self.version = 0
        self.versions: dict[int, tuple[int, int]] = {}
        self._forward_version: dict[int, int] = {}

    def _output(self) -> torch.Tensor:
        return torch.ones(self.costs.activation_shape, device=self.device)

    def forward(self, mb: int, received: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.times.forward)
        self._forward_version[mb] = self.version
        return None if self.is_last else self._output()

    def evaluate(self, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.times.forward)
        return None if self.is_last else self._output()

    def backward(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.times.backward)
        return self._backward_done(mb)

    def backward_input(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        time.sleep(self.times.input_backward)
        return self._backward_done(mb)

    def backward_weight(self, mb: int) -> None:
        time.sleep(self.times.weight)

    def _backward_done(self, mb: int) -> torch.Tensor | None:
        self.versions[mb] = (self._forward_version.pop(mb), self.version)
        return None if self.is_first else self._output()

    def step(self) -> None:
        time.sleep(self.times.update)
        self.version += 1
