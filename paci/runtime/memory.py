"""Memory accounting of a Stage, on any device: the bytes its own tensors hold, by kind.

A schedule changes how many micro-batches' saved activations and how many weight copies a stage
holds at once; parameters, gradients and optimizer state are the stage's static part. The
simulator predicts the peak of their sum (`Simulation.peak_bytes`); `StageMemory` measures it from
the stage's own objects rather than from an allocator, so it works on CPU and counts exactly the
same things:

* weights: the parameters and buffers of the stage's module;
* gradients: the parameters' .grad while they exist (U frees them);
* optimizer: the tensors of the optimizer's state (AdamW's moments, from the first U on);
* activations: the distinct storages autograd keeps for backward, tracked by a saved-tensor pack
  hook that the stage enters around each forward; a storage is released when autograd frees the
  last saved tensor on it, plus with recompute the inputs kept for forwards not yet re-run.
  Parameters and stashed weight copies are not activations;
* stash: the weight copies of the stashed policy (PipeDream, 2BW).

Sample between actions (e.g. as `run_local`'s listener): that is the granularity the simulator
counts at. The hooks return every tensor unchanged, so the stage computes the same numbers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch

from paci.runtime.stage import Stage


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under `tensors` (views and repeats count once, in full)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _Box:
    """What autograd keeps instead of a saved tensor; its death releases the tensor's storage."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedActivations:
    """Live bytes of the storages autograd saved for backward, by pack/unpack hooks.

    `weights()` names the tensors that are not activations (parameters, weight copies); a tensor
    on one of their storages is passed through uncounted.
    """

    def __init__(self, weights: Callable[[], Iterable[torch.Tensor]]) -> None:
        self._weights = weights
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, saved tensors on it]

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Box:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in {w.untyped_storage().data_ptr() for w in self._weights()}:
            return tensor
        entry = self._live.setdefault(address, [storage.nbytes(), 0])
        entry[1] += 1
        box = _Box(tensor.detach())  # a saved output holding its grad_fn would make a cycle through
        # autograd that no collector sees: a graph dropped without a backward would never free it
        weakref.finalize(box, self._release, address)
        return box

    @staticmethod
    def unpack(packed: torch.Tensor | _Box) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Box) else packed

    def _release(self, address: int) -> None:
        entry = self._live[address]
        entry[1] -= 1
        if not entry[1]:
            del self._live[address]

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self._live.values())


@dataclass(frozen=True)
class MemorySample:
    """A stage's bytes at one moment, by kind."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    stash: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


class StageMemory:
    """Counts `stage`'s bytes by kind (`sample()`), from when it is created until `close()`.

    Installs the saved-tensor hooks on the stage; create it before the stage's first forward, so
    every saved activation is seen.
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        params = list(stage.module.parameters())
        self.saved = SavedActivations(lambda: [*params, *stage.stashed_weights])
        stage.saved_tensors_hooks = (self.saved.pack, self.saved.unpack)

    def sample(self) -> MemorySample:
        stage = self.stage
        module = stage.module
        state = [t for s in stage.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return MemorySample(
            weights=storage_bytes([*module.parameters(), *module.buffers()]),
            gradients=storage_bytes(p.grad for p in module.parameters() if p.grad is not None),
            optimizer=storage_bytes(state),
            activations=self.saved.bytes + storage_bytes(stage.held_inputs),
            stash=storage_bytes(stage.stashed_weights))

    def close(self) -> None:
        self.stage.saved_tensors_hooks = None
