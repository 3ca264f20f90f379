"""What travels between two stages: one tensor, or a tuple, list or dict of tensors.

A user's unit may return hidden states together with a mask or position ids; the next unit gets
the same structure back as its one argument (as in an `nn.Sequential`). Across a stage boundary
the structure is flattened into its tensors ("leaves"), which the transports carry one by one,
and rebuilt on the other side. Only floating-point leaves carry a gradient back: the backward
message holds one gradient per floating-point leaf of the forward message, in leaf order (for a
single tensor, the gradient itself, so the GPT's messages are what they always were).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Payload = torch.Tensor | tuple | list | dict


@dataclass(frozen=True)
class Layout:
    """The structure of a payload and each leaf's (shape, dtype): what a receiver allocates."""

    kind: str  # "tensor", "tuple", "list" or "dict"
    keys: tuple[str, ...]  # a dict's keys, in order; else ()
    leaves: tuple[tuple[tuple[int, ...], torch.dtype], ...]

    @staticmethod
    def single(shape: tuple[int, ...], dtype: torch.dtype) -> Layout:
        return Layout("tensor", (), ((tuple(shape), dtype),))

    def grads(self) -> Layout:
        """The layout of the gradient message that answers a message of this layout."""
        floats = tuple(leaf for leaf in self.leaves if leaf[1].is_floating_point)
        return self if self.kind == "tensor" else Layout("tuple", (), floats)


def leaves(payload: Payload) -> list[torch.Tensor]:
    if torch.is_tensor(payload):
        return [payload]
    return list(payload.values()) if isinstance(payload, dict) else list(payload)


def is_payload(value: object) -> bool:
    """A tensor, or a tuple, list or dict (string keys) of at least one tensor, and nothing else."""
    if torch.is_tensor(value):
        return True
    if isinstance(value, dict) and not all(isinstance(key, str) for key in value):
        return False
    return isinstance(value, (tuple, list, dict)) and len(value) > 0 and all(torch.is_tensor(t) for t in leaves(value))


def to(payload: Payload, device: torch.device) -> Payload:
    return apply(payload, lambda t: t.to(device))


def layout(payload: Payload, where: str) -> Layout:
    """The payload's layout; a TypeError naming `where` for anything but tensors in one level."""
    if torch.is_tensor(payload):
        kind, keys = "tensor", ()
    elif isinstance(payload, (tuple, list)):
        kind, keys = ("list" if isinstance(payload, list) else "tuple"), ()
    elif isinstance(payload, dict):
        kind, keys = "dict", tuple(payload)
        if not all(isinstance(key, str) for key in keys):
            raise TypeError(f"{where} returns a dict whose keys are not all strings")
    else:
        raise TypeError(f"{where} returns {type(payload).__name__}; between stages paci passes a tensor, or a "
                        f"tuple, list or dict of tensors")
    parts = leaves(payload)
    bad = [type(leaf).__name__ for leaf in parts if not torch.is_tensor(leaf)]
    if bad or not parts:
        raise TypeError(f"{where} returns a {kind} holding {', '.join(bad) or 'nothing'}; between stages every "
                        f"element must be a tensor (pass other values as tensors, or compute them in the stage)")
    if not any(leaf.is_floating_point() for leaf in parts):
        raise TypeError(f"{where} returns no floating-point tensor, so no gradient could flow back to it")
    return Layout(kind, keys, tuple((tuple(leaf.shape), leaf.dtype) for leaf in parts))


def rebuild(spec: Layout, parts: list[torch.Tensor]) -> Payload:
    """The payload of layout `spec` made of `parts` (its leaves, in order)."""
    if spec.kind == "tensor":
        return parts[0]
    if spec.kind == "dict":
        return dict(zip(spec.keys, parts))
    return list(parts) if spec.kind == "list" else tuple(parts)


def apply(payload: Payload, fn: Callable[[torch.Tensor], torch.Tensor]) -> Payload:
    """`fn` on every leaf, the structure kept."""
    if torch.is_tensor(payload):
        return fn(payload)
    if isinstance(payload, dict):
        return {key: fn(value) for key, value in payload.items()}
    return type(payload)(fn(leaf) for leaf in payload)


def shard(payload: Payload, index: int, shards: int) -> Payload:
    """Shard `index` of `shards` equal parts of every tensor along dim 0 (a data-parallel
    replica's rows of a micro-batch)."""
    return apply(payload, lambda t: t.chunk(shards)[index])


def float_leaves(payload: Payload) -> list[torch.Tensor]:
    return [leaf for leaf in leaves(payload) if leaf.is_floating_point()]


def as_leaf(payload: Payload) -> Payload:
    """A received payload as the leaves of a new graph: floating-point tensors collect a gradient."""
    return apply(payload, lambda t: t.requires_grad_() if t.is_floating_point() else t)


def pairs(output: Payload, grad: Payload) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The outputs to back-propagate from and their gradients: each floating-point leaf's from the
    backward message, in leaf order, leaving out leaves that depend on no weight or input."""
    if torch.is_tensor(output):
        return [output], [grad]
    kept = [(out, g) for out, g in zip(float_leaves(output), leaves(grad)) if out.requires_grad]
    return [out for out, _ in kept], [g for _, g in kept]


def backprop(output: Payload, grad: Payload | None, inputs: list[torch.Tensor] | None = None) -> None:
    """Back-propagate `grad` (a backward message) from `output` (a forward's payload)."""
    if torch.is_tensor(output):  # one tensor (and the last stage's loss): as it always was
        output.backward(grad, inputs=inputs)
        return
    outputs, grads = pairs(output, grad)
    torch.autograd.backward(outputs, grads, inputs=inputs)


def input_grads(inputs: Payload) -> Payload:
    """The backward message: the gradient of each floating-point leaf of a stage's input."""
    if torch.is_tensor(inputs):
        return inputs.grad
    return tuple(torch.zeros_like(x) if x.grad is None else x.grad for x in float_leaves(inputs))
