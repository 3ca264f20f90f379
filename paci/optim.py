"""Muon for pipeline stages: torch.optim.Muon on the hidden layers' matrices, AdamW on the rest.

Muon (Jordan et al., 2024; "Muon is Scalable for LLM Training", Liu et al., arXiv 2502.16982)
orthogonalises each matrix's momentum with a Newton–Schulz iteration. It is for the 2-D weights of
hidden layers; embeddings, the output layer and 1-D parameters (biases, norm gains) take AdamW,
the modded-nanogpt / Moonlight convention. With ``adjust_lr_fn="match_rms_adamw"`` (Moonlight) the
update's RMS matches AdamW's, so both halves share one learning rate, weight decay and LR schedule.

Why paci ships it: a one-update delay, PACI's, costs AdamW far more than Muon (Zmushko et al.,
arXiv 2606.30634: 0.28 nats against 0.012 on a 360M model; docs/results.md measures it here).

Two things differ from plain ``torch.optim.Muon``:

* the Newton–Schulz precision is chosen per device: torch runs it in bf16, which is the fast choice
  where matrix units take bf16 (GPUs) but 17-59x slower than fp32 on CPUs without them (measured:
  `benchmarks/muon_ns.py`), so on a CPU it runs in fp32. The iteration is torch's own, in that dtype
  (with bf16 it equals ``torch.optim.Muon``'s step bit for bit: tests/test_optim.py);
* `MuonAdamW` is the two optimizers as one ``torch.optim.Optimizer``: one ``step``, one LR schedule
  over all its groups, one state dict. Both update in place, as PACI's live weights need.

A stage's optimizer receives paci's shadow parameters (they share the real parameters' storage,
docs/design.md §2), so the hidden matrices are named by storage address: `hidden_matrices`.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn

__all__ = ["Muon", "MuonAdamW", "decay_groups", "hidden_matrices", "muon", "ns_dtype_for"]

# Keller Jordan's quintic coefficients, as torch.optim.Muon's defaults
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def ns_dtype_for(device: torch.device | str) -> torch.dtype:
    """The Newton–Schulz precision for `device`: bf16 on CUDA (its tensor cores), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's Newton–Schulz iteration (five quintic steps towards U V^T of update = U S V^T),
    in `dtype`: the same operations in the same order, so bf16 gives torch's result bit for bit."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def decay_groups(params: Sequence[nn.Parameter], weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on the >= 2-D parameters and none on the others (biases,
    norm gains), leaving out an empty group."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """torch's optimizer convention: re-evaluate the loss with gradients on, if asked to."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (its arguments, checks, state and maths) with the Newton–Schulz iteration
    in `ns_dtype` (default: `ns_dtype_for` the parameters' device)."""

    def __init__(self, params, *, ns_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if ns_dtype is None:
            first = next((p for group in self.param_groups for p in group["params"]), None)
            ns_dtype = ns_dtype_for(first.device if first is not None else "cpu")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            lr = float(group["lr"])
            for p, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - group["momentum"])
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                p.add_(self.direction(group, grad, buffer), alpha=-lr * self.scale(group, p))
        return loss

    def direction(self, group: dict, grad: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """The orthogonalised (Nesterov) momentum of a matrix with gradient `grad` and momentum
        `buffer` (already updated with it); the step is -lr * scale * direction."""
        update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
        return orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)

    @staticmethod
    def scale(group: dict, p: torch.Tensor) -> float:
        return _rms_ratio(group["adjust_lr_fn"], p.shape)


def _rms_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment for an A x B matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":  # Moonlight: the update's RMS is AdamW's typical 0.2
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):  # Keller Jordan's
        return math.sqrt(max(1, rows / cols))
    return 1.0


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameters whose storage address is in `hidden`, AdamW on the others (weight decay
    on those of >= 2 dimensions only), as one optimizer whose param_groups are the two optimizers'
    own: an LR scheduler over it sets both, and `state` reads both."""

    def __init__(self, params: Sequence[nn.Parameter], hidden: Collection[int], *, lr: float = 2e-3,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, ns_dtype: torch.dtype | None = None) -> None:
        params = list(params)
        matrices = [p for p in params if p.data_ptr() in hidden]
        rest = [p for p in params if p.data_ptr() not in hidden]
        if any(p.dim() != 2 for p in matrices):
            raise ValueError("Muon takes 2-D matrices only; `hidden` names a parameter of another shape")
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                         adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype) if matrices else None
        groups = decay_groups(rest, weight_decay)
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False) if groups else None
        self._parts = [o for o in (self.muon, self.adamw) if o is not None]
        if not self._parts:
            raise ValueError("MuonAdamW got no parameters")
        super().__init__([g for o in self._parts for g in o.param_groups], {})  # no defaults to add to them
        self.defaults = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps, "momentum": momentum}
        self.state = collections.ChainMap(*(o.state for o in self._parts))  # read-only view of both

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for part in self._parts:
            part.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict() if self.muon else None,
                "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a MuonAdamW state dict (it needs 'muon' and 'adamw')")
        for name in ("muon", "adamw"):
            part, state = getattr(self, name), state_dict[name]
            if (part is None) != (state is None):
                raise ValueError(f"the state dict's {name} part does not match this optimizer's parameters")
            if part is not None:
                part.load_state_dict(state)
        # torch's load_state_dict makes new group dicts: share them again, so an LR scheduler reaches both
        self.param_groups = [g for o in self._parts for g in o.param_groups]


def hidden_matrices(modules: Sequence[nn.Module], *, holds_output: bool = True) -> set[int]:
    """The storage addresses of the hidden layers' matrices in `modules` (a model's units in order,
    or a contiguous slice of them): every 2-D parameter except those of nn.Embedding modules and of
    the output layer, the model's last nn.Linear (in the slice when `holds_output`, i.e. the slice
    ends the model). Addresses rather than objects, because a stage's optimizer gets shadow
    parameters that share the real ones' storage."""
    found = [m for unit in modules for m in unit.modules()]
    excluded = {id(p) for m in found if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    linears = [m for m in found if isinstance(m, nn.Linear)]
    if holds_output and linears:
        excluded |= {id(p) for p in linears[-1].parameters(recurse=False)}
    return {p.data_ptr() for unit in modules for p in unit.parameters() if p.dim() == 2 and id(p) not in excluded}


def muon(units: Sequence[nn.Module], *, lr: float = 2e-3, weight_decay: float = 0.1,
         betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
         ns_dtype: torch.dtype | None = None) -> Callable[[list[nn.Parameter]], MuonAdamW]:
    """An optimizer factory for ``paci.Pipeline(units, ..., optimizer=paci.optim.muon(units, lr=...))``:
    each stage gets `MuonAdamW` over its parameters, Muon on the hidden matrices of the whole model
    `units` (see `hidden_matrices`), AdamW with `betas` on the rest, one `lr` and `weight_decay`."""
    units = list(units)

    def make(params: list[nn.Parameter]) -> MuonAdamW:
        # computed when the stage is built: its units may have moved to their device since
        return MuonAdamW(params, hidden_matrices(units), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         momentum=momentum, ns_dtype=ns_dtype)

    return make
