"""`Stage`: one model slice with its own optimizer, LR schedule, version counter and in-flight state.

It executes F, B, I, W, U and E (forward-only evaluation) for one stage and knows nothing of
schedules or transports: the executor hands it tensors and passes its outputs on.

Live weights on stock PyTorch (docs/design.md §2). The optimizer owns *shadow* parameters,
``nn.Parameter(p.data)``: they share the real parameters' storage but have their own autograd
version counter. `U` hands them the accumulated gradients and steps them in place, so a backward
whose forward ran before the step reads the updated weights without autograd's "modified by an
inplace operation" error, and without any copy of the forward-time weights. Forward and backward
code stay untouched. Stashed weights (PipeDream, 2BW) instead run the forward on an alias of the
weights (their storage, but leaves of their own), and copy on update: a `U` that would overwrite
a version that in-flight micro-batches still read moves the live weights to fresh storage
first, so those micro-batches keep the old storage and nothing else is copied. A stage holds
one copy per *older* version still in flight: P-1-s for PipeDream, at most one for 2BW.

Recompute (`recompute=True`) keeps only each in-flight micro-batch's input: F runs without a
graph, and its backward first re-runs the forward with the weights of that moment (live: the
updated ones, so the stage's own Jacobian is taken at the weights its gradient is applied to;
stashed: the forward's copy), then back-propagates. On a flush schedule both weights are the same
and recompute changes no bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from paci.ir import WeightPolicy
from paci.model import autocast, lm_loss
from paci.optim import Muon, MuonAdamW, decay_groups, hidden_matrices
from paci.runtime import payload, split

Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # index -> (inputs, targets)
# parameters -> (optimizer, LR scheduler or None)
MakeOptimizer = Callable[[list[nn.Parameter]],
                         tuple[torch.optim.Optimizer, "torch.optim.lr_scheduler.LRScheduler | None"]]


OPTIMIZERS = ("adamw", "nadamw", "muon")
COMPENSATIONS = ("none", "pipemare", "nesterov", "predict", "predict-window", "dc")
PREDICTIONS = ("predict", "predict-window")  # the compensations that move an overtaken forward's weights
# Nesterov look-ahead for delayed gradients (Ajanthan et al., ICML 2025, arXiv 2505.01099): their
# released recipe is torch's NAdam with decoupled weight decay and beta1 = 0.99. NAdam warms its
# momentum up as mu_t = beta1 (1 - 0.5 * 0.96^(t psi)); their runs take 50 000 steps with psi = 0.004,
# so psi * steps = 200. We keep that product, so the momentum warms up over the same share of a run.
NESTEROV_BETA1 = 0.99
NESTEROV_WARMUP = 200.0
# PipeMare's learning-rate rescheduling (Yang et al., arXiv 1910.05124): a stage whose gradients are
# up to tau updates late steps with lr / tau^p, p falling linearly from 1 to 0 over the first 15% of
# the steps (Ajanthan et al.'s code anneals over 7 of 50 epochs).
PIPEMARE_ANNEAL = 0.15


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of one stage: AdamW (or NAdamW) with decoupled weight decay on >=2-D weights only,
    or Muon on the hidden matrices with that AdamW on the rest (paci.optim.MuonAdamW, one learning
    rate for both); linear warm-up then cosine decay; optionally a stash-free correction for
    delayed gradients.

    `delay` is the stage's largest drift (the most updates one of its backwards crosses, fixed by
    the schedule); `for_stage` sets it. Every compensation is the identity at delay 0, so a
    synchronous schedule, or PACI's last stage, trains exactly as without it:

    * "pipemare": lr / delay^p with p annealed from 1 to 0 (PipeMare); the identity at delay <= 1.
    * "nesterov": a delayed stage steps with NAdamW, beta1 = 0.99 (Ajanthan et al.).
    * "predict": a forward whose backward comes after d updates runs on the weights AdamW's (or
      Muon's) next d steps are predicted to reach (`Stage` does it; weight prediction as in SpecTrain, Chen et
      al., arXiv 1809.02839, and for Adam XPipe, Guan et al., arXiv 1911.04610). Forwards that no
      update overtakes are untouched.
    * "predict-window": as "predict", but the first predicted step's gradient uses what the stage's
      window already holds: the gradient accumulated so far (a share f of the coming update's
      micro-batches) plus (1 - f) times the first moment for the rest.

    `predict_gain` (gamma) scales the predicted displacement of both: 1 is the prediction itself,
    > 1 over-relaxes it (under-prediction is the less stable side in the linear delay model).

    * "dc": delay compensation without a copy (DC-ASGD, Zheng et al., arXiv 1609.08326): a
      micro-batch whose backward crossed d updates contributes g + dc_lambda * d * H (w_t - w_{t-1})
      instead of g. w_t - w_{t-1}, the stage's last update, is recomputed from AdamW's state at
      the step (exact for d <= 1, the last update repeated beyond); no weights are kept. H is the
      diagonal curvature AdamW's own step assumes, (sqrt(v_hat) + eps) / lr, so that H times the
      update is minus its direction (m_hat and the decay): dc_lambda is dimensionless, 1 the
      Newton-consistent value. (DC-ASGD's g * g, or v_hat, measured here at 1e-5..1e-8 of the
      gradient at lambda 1, drifting by three orders over a run; docs/experiments.md.) Since
      the correction does not depend on g, it is added once per step, scaled by the window's
      delayed share (`Stage.step`).
    """

    lr: float = 2e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.1
    name: str = "adamw"  # one of OPTIMIZERS
    compensate: str = "none"  # one of COMPENSATIONS
    delay: int = 0
    clip_grad_norm: float = 0.0  # 0: off (see `Stage.step`)
    momentum: float = 0.95  # Muon's (its AdamW part and AdamW take `betas`)
    predict_gain: float = 1.0  # gamma: the predicted displacement's scale ("predict", "predict-window")
    dc_lambda: float = 1.0  # lambda: the scale of AdamW's implied curvature ("dc")

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown --optimizer {self.name!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.compensate not in COMPENSATIONS:
            raise ValueError(f"unknown --compensate {self.compensate!r}; choose one of: {', '.join(COMPENSATIONS)}")
        if self.compensate in PREDICTIONS and self.name == "nadamw":
            raise ValueError(f"--compensate {self.compensate} predicts AdamW's or Muon's steps; use it with "
                             "--optimizer adamw or muon")
        if not (math.isfinite(self.predict_gain) and self.predict_gain > 0):
            raise ValueError(f"--predict-gain must be a number > 0, got {self.predict_gain}")
        if self.predict_gain != 1.0 and self.compensate not in PREDICTIONS:
            raise ValueError("--predict-gain scales a prediction; use it with --compensate predict or predict-window")
        if not (math.isfinite(self.dc_lambda) and self.dc_lambda > 0):
            raise ValueError(f"--dc-lambda must be a number > 0, got {self.dc_lambda}")
        if self.dc_lambda != 1.0 and self.compensate != "dc":
            raise ValueError("--dc-lambda scales delay compensation; use it with --compensate dc")
        if self.compensate == "dc" and self.name != "adamw":
            raise ValueError("--compensate dc recomputes AdamW's last update from its state; use it with --optimizer adamw")
        if self.compensate == "nesterov" and self.name == "muon":
            raise ValueError("--compensate nesterov gives delayed stages NAdamW instead of their optimizer; use it "
                             "with --optimizer adamw")

    def for_stage(self, delay: int) -> OptimizerSpec:
        """This spec for a stage whose backwards cross at most `delay` updates."""
        spec = dataclasses.replace(self, delay=delay)
        if self.compensate == "nesterov" and delay > 0:
            spec = dataclasses.replace(spec, name="nadamw", betas=(NESTEROV_BETA1, self.betas[1]))
        return spec

    def lr_at(self, step: int) -> float:
        """Learning rate used by optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            lr = self.lr * (step + 1) / self.warmup_steps
        else:
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            lr = self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.compensate == "pipemare" and self.delay > 1:
            anneal = max(1.0, PIPEMARE_ANNEAL * self.total_steps)
            lr /= self.delay ** (1.0 - min(step / anneal, 1.0))
        return lr

    def build(self, params: Sequence[nn.Parameter], hidden: Collection[int] = frozenset()
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer over `params` (weight decay on >=2-D ones only) and its LR schedule; Muon takes
        the parameters whose storage address is in `hidden` (paci.optim.hidden_matrices)."""
        if self.name == "muon":
            optimizer = MuonAdamW(params, hidden, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas,
                                  eps=self.eps, momentum=self.momentum)
        elif self.name == "adamw":
            optimizer = torch.optim.AdamW(decay_groups(params, self.weight_decay), lr=self.lr, betas=self.betas,
                                          eps=self.eps, foreach=False)
        else:
            optimizer = torch.optim.NAdam(decay_groups(params, self.weight_decay), lr=self.lr, betas=self.betas, eps=self.eps,
                                          momentum_decay=NESTEROV_WARMUP / max(1, self.total_steps),
                                          decoupled_weight_decay=True, foreach=False)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_at(step) / self.lr)


class NonFiniteError(RuntimeError):
    """A stage dropped more micro-batches or updates for non-finite values than its limit allows."""


@dataclass
class _InFlight:
    inputs: torch.Tensor | None  # the received activation (a leaf that collects its grad); on stage 0 the
    # token ids with recompute, else None
    output: torch.Tensor | None  # the stage output, or the scaled loss on the last stage; None until a
    # recompute re-runs the forward
    version: int
    grad: torch.Tensor | None = None  # kept from I for W (split backward) ...
    weights: split.WeightPass | None = None  # ... or what W needs, found by I (paci.runtime.split)
    dropped: bool = False  # I found it non-finite: W adds nothing


@dataclass
class Stash:
    """The stashed policy's forward-time weights, per version still in flight: aliases of the live
    storage while the version is live, the old storage itself (the copy) once an update moved on."""

    tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)


class Stage:
    def __init__(self, index: int, num_stages: int, modules: Sequence[nn.Module], *, policy: WeightPolicy,
                 optim: OptimizerSpec, loss_scale: float, train_batch: Batch, val_batch: Batch,
                 device: torch.device | str = "cpu", recompute: bool = False,
                 updates_ahead: Callable[[int], int] | None = None, precision: str = "fp32",
                 nonfinite_limit: int = 20, poison: Sequence[int] = (),
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss,
                 make_optimizer: MakeOptimizer | None = None) -> None:
        """`loss_fn(output, targets)` is the last stage's loss (the GPT's by default); `make_optimizer`
        builds the optimizer (and LR scheduler, or None) over the parameters it is given, in place of
        `optim.build` (a user's own: `optim` then only carries clipping)."""
        self.index, self.num_stages = index, num_stages
        # non-finite values never reach the weights (docs/design.md §4): micro-batches dropped here,
        # versions whose update was skipped, the most of both together before the run stops, and
        # micro-batches whose output this stage turns into NaN (fault injection for tests)
        self.dropped: list[int] = []
        self.skipped: list[int] = []
        self.nonfinite_limit = nonfinite_limit
        self.poison = frozenset(poison)
        self.recompute = recompute
        self.precision = precision
        autocast(precision, device)  # checks it
        self.spec = optim
        # mb -> updates between F(mb) and its backward, from the schedule (ir.updates_ahead); "predict" needs it
        self.updates_ahead = updates_ahead
        if optim.compensate in PREDICTIONS and (updates_ahead is None or policy is WeightPolicy.STASHED):
            raise ValueError(f"--compensate {optim.compensate} needs live weights (not pipedream or 2bw) and the schedule's "
                             "updates_ahead")
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.device = torch.device(device)
        self.module = nn.Sequential(*modules).to(self.device)
        self.policy = policy
        self.loss_scale = loss_scale
        self.train_batch, self.val_batch = train_batch, val_batch
        self.version = 0
        self.step_lr = math.nan  # the learning rate of the last step (first param group), for the records
        self.window = 0.0  # the share of the coming update's micro-batches whose backward has run ("predict-window")
        self.late = 0.0  # the same share, each micro-batch counted once per update its backward crossed ("dc")
        self._directions: dict[torch.Tensor, torch.Tensor] = {}  # "predict" with Muon: the window's predicted directions
        self.versions: dict[int, tuple[int, int]] = {}  # mb -> (v_f, v_b)
        self.losses: dict[int, torch.Tensor] = {}  # mb -> unscaled training loss (last stage)
        self.eval_losses: dict[int, float] = {}  # eval index -> loss (last stage)
        self._inflight: dict[int, _InFlight] = {}
        self._stash = Stash()
        # memory accounting (paci.runtime.memory): (pack, unpack) entered around every training forward
        self.saved_tensors_hooks: tuple[Callable, Callable] | None = None
        # clipping (spec.clip_grad_norm): this stage's gradient norm before its last step, and, for the
        # global rule of a flush schedule, `exchange(step, norm)` -> every stage's norm, in stage order
        self.grad_norm: float | None = None
        self.exchange: Callable[[int, torch.Tensor], Sequence[torch.Tensor]] | None = None
        # data parallel: replica_mean(tensors) averages tensors over this stage's replicas, in place
        # (an all-reduce): the accumulated gradients (and a last stage's recorded losses) at its step,
        # a last stage's validation loss at each evaluation; nowhere else
        self.replica_mean: Callable[[list[torch.Tensor]], None] | None = None
        self._params = dict(self.module.named_parameters())
        self._shadows = {name: nn.Parameter(p.data) for name, p in self._params.items()}
        self.loss_fn = loss_fn
        self._checked: payload.Layout | None = None  # the layout of this stage's first output
        shadows = list(self._shadows.values())
        self.optimizer, self.scheduler = make_optimizer(shadows) if make_optimizer else \
            optim.build(shadows, hidden_matrices(list(self.module), holds_output=self.is_last))

    # ------------------------------------------------------------------------------------------
    # forward

    def forward(self, mb: int, received: torch.Tensor | None) -> torch.Tensor | None:
        """F(mb): run the stage with the weights as they are now; keep what backward needs: the
        saved activations, or with recompute only the input."""
        x = payload.to(self.train_batch(mb)[0], self.device) if self.is_first else received
        weights = self._stash_acquire() if self.policy is WeightPolicy.STASHED else None
        ahead = self.updates_ahead(mb) if self.spec.compensate in PREDICTIONS else 0
        with self._predicted_weights(ahead) if ahead else contextlib.nullcontext():
            if self.recompute:
                with torch.no_grad():
                    output = self._graph(mb, x, weights, record=True)
                self._inflight[mb] = _InFlight(x, None, self.version)
            else:
                output = self._graph(mb, x if self.is_first else payload.as_leaf(x), weights, record=True)
                self._inflight[mb] = _InFlight(None if self.is_first else x, output, self.version)
        if self.is_last:
            return None
        if self._checked is None:  # a clear error for anything a transport cannot carry, once
            self._checked = payload.layout(output, f"stage {self.index}")
        return payload.apply(output, torch.Tensor.detach)

    @contextlib.contextmanager
    def _predicted_weights(self, ahead: int) -> Iterator[None]:
        """For the length of one forward, the weights where the optimizer's next `ahead` steps are
        predicted to take them: each step as the current state would make it, the coming gradients
        assumed equal to the first moment (AdamW) or the momentum (Muon); with "predict-window" the
        first one is the window's accumulated gradient plus that estimate for its missing share. The
        LR schedule's rates and the decoupled weight decay apply; the displacement is scaled by
        `predict_gain`. Written through the shadow parameters, so autograd keeps referring to the
        live weights that the backward will read; restored exactly from a copy that lives only this
        long."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.optimizer.state:  # before the first step there are no moments to predict with
            yield
            return
        originals = {p: p.detach().clone() for p in params}
        window = self.spec.compensate == "predict-window"
        grads = {self._shadows[name].data_ptr(): p.grad for name, p in self._params.items()} if window else {}
        optimizer = self.optimizer
        with torch.no_grad():
            if isinstance(optimizer, MuonAdamW):
                if optimizer.muon is not None:
                    self._predict_muon(optimizer.muon, ahead, grads if window else None)
                optimizer = optimizer.adamw
            if optimizer is not None:
                self._predict_adamw(optimizer, ahead, grads if window else None)
            if self.spec.predict_gain != 1.0:
                for p, original in originals.items():
                    p.sub_(original).mul_(self.spec.predict_gain).add_(original)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in originals.items():
                    p.copy_(original)

    def _predict_adamw(self, optimizer: torch.optim.Optimizer, ahead: int, grads: dict | None) -> None:
        """AdamW's next `ahead` steps, written into its parameters (see `_predicted_weights`)."""
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                t = int(state["step"])
                moment = state["exp_avg"]
                if grads is not None:  # beta1 m + (1 - beta1) (g_so_far + (1 - f) m)
                    known = grads.get(p.data_ptr())
                    moment = moment * (1 - (1 - beta1) * self.window)
                    if known is not None:
                        moment.add_(known, alpha=1 - beta1)
                for k in range(1, ahead + 1):
                    lr = self.spec.lr_at(t + k - 1)
                    p.mul_(1 - lr * group["weight_decay"])
                    denom = (state["exp_avg_sq"] / (1 - beta2 ** (t + k))).sqrt_().add_(group["eps"])
                    p.addcdiv_(moment, denom, value=-lr / (1 - beta1 ** (t + k)))

    def _predict_muon(self, muon: Muon, ahead: int, grads: dict | None) -> None:
        """Muon's next `ahead` steps, written into its matrices: the coming gradient taken as the
        momentum (or, with `grads`, the window's gradient so far plus the momentum for the rest),
        so that the direction is the orthogonalised momentum. Without `grads` the direction stays
        the same until the next update, so it is orthogonalised once per window and kept."""
        for group in muon.param_groups:
            for p in group["params"]:
                buffer = muon.state.get(p, {}).get("momentum_buffer")
                if buffer is None:
                    continue
                direction = self._directions.get(p) if grads is None else None
                if direction is None:
                    if grads is None:
                        estimate = buffer
                    else:
                        estimate = buffer * (1 - self.window)
                        if (known := grads.get(p.data_ptr())) is not None:
                            estimate.add_(known)
                    direction = muon.direction(group, estimate, buffer.lerp(estimate, 1 - group["momentum"]))
                    if grads is None:
                        self._directions[p] = direction
                for k in range(1, ahead + 1):
                    lr = self.spec.lr_at(self.version + k - 1)
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(direction, alpha=-lr * muon.scale(group, p))

    def _graph(self, mb: int, x: torch.Tensor, weights: dict[str, torch.Tensor] | None, record: bool) -> torch.Tensor:
        """The stage's forward of x; on the last stage the loss scaled by 1/K (recorded if `record`)."""
        hooks = self.saved_tensors_hooks
        with torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else contextlib.nullcontext(), \
                autocast(self.precision, self.device):
            output = self._run(x, weights)
            if mb in self.poison:
                output = payload.apply(output, lambda t: t * math.nan if t.is_floating_point() else t)
            if self.is_last:
                loss = self.loss_fn(output, payload.to(self.train_batch(mb)[1], self.device))
                if record:
                    self.losses[mb] = loss.detach()
                output = loss * self.loss_scale
        return output

    def _rebuild(self, mb: int, state: _InFlight) -> None:
        """Recompute: run the forward again, with the weights of this moment (live) or of the
        forward's version (stashed), so that backward has a graph."""
        if state.output is None:
            x = state.inputs if self.is_first else payload.as_leaf(state.inputs)
            weights = self._stash.tensors[state.version] if self.policy is WeightPolicy.STASHED else None
            state.output = self._graph(mb, x, weights, record=False)

    @property
    def held_inputs(self) -> list[torch.Tensor]:
        """With recompute, the inputs kept for forwards not yet re-run (for memory accounting)."""
        return [leaf for state in self._inflight.values() if state.output is None
                for leaf in payload.leaves(state.inputs)]

    def evaluate(self, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
        """E(index): forward-only pass over held-out batch `index` with the current weights."""
        inputs, targets = self.val_batch(index) if (self.is_first or self.is_last) else (None, None)
        with torch.no_grad(), autocast(self.precision, self.device):
            output = self.module(payload.to(inputs, self.device) if self.is_first else received)
            if self.is_last:
                loss = self.loss_fn(output, payload.to(targets, self.device)).float()
                if self.replica_mean is not None:
                    self.replica_mean([loss])
                self.eval_losses[index] = loss.item()
                return None
        return output

    def output_layout(self, x: payload.Payload) -> payload.Layout:
        """The layout of what this stage sends for input `x`: one forward as F runs it (autocast),
        without a graph and without drawing from the random generators (dropout stays as it was)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices), autocast(self.precision, self.device):
            return payload.layout(self.module(payload.to(x, self.device)), f"stage {self.index}")

    def _run(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        return self.module(x) if weights is None else functional_call(self.module, weights, (x,))

    # ------------------------------------------------------------------------------------------
    # backward

    def backward(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """B(mb): backward through the saved graph, add into the grads, return the input grad."""
        state = self._inflight.pop(mb)
        self._record_backward(mb, state)
        if not self._finite(mb, grad):
            self._finish(state)
            return self._drop(mb, state)
        self._rebuild(mb, state)
        payload.backprop(state.output, None if self.is_last else grad)
        self._finish(state)
        return None if self.is_first else payload.input_grads(state.inputs)

    def backward_input(self, mb: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """I(mb): only the input gradient; what W needs is kept (paci.runtime.split)."""
        state = self._inflight[mb]
        self._record_backward(mb, state)
        if not self._finite(mb, grad):
            state.dropped = True
            return self._drop(mb, state)
        self._rebuild(mb, state)
        grad = None if self.is_last else grad
        single = torch.is_tensor(state.inputs) and torch.is_tensor(state.output)
        if not self.is_first and single:  # (stage 0 takes no input gradient: its W is the whole backward)
            state.weights = split.plan(state.output, state.inputs, list(self._weights(state).values()))
            if state.weights is not None:
                return split.input_backward(state.output, grad, state.inputs, state.weights)
        state.grad = grad  # W re-walks the graph (see paci.runtime.split)
        if self.is_first:
            return None
        if single:
            (input_grad,) = torch.autograd.grad(state.output, state.inputs, grad, retain_graph=True)
            return input_grad
        outputs, grads = payload.pairs(state.output, grad)
        inputs = payload.float_leaves(state.inputs)
        found = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found))

    def backward_weight(self, mb: int) -> None:
        """W(mb): the weight gradients of a micro-batch whose I already ran."""
        state = self._inflight.pop(mb)
        if state.weights is not None:
            state.weights.run()
        elif not state.dropped:
            payload.backprop(state.output, state.grad, inputs=list(self._weights(state).values()))
        self._finish(state)

    def _weights(self, state: _InFlight) -> dict[str, torch.Tensor]:
        """The leaves micro-batch `state`'s graph differentiates: its stash, or the live parameters."""
        return self._stash.tensors[state.version] if self.policy is WeightPolicy.STASHED else self._params

    def _finite(self, mb: int, grad: torch.Tensor | None) -> bool:
        """Is micro-batch mb's backward safe to add? Not when its loss (last stage) or the gradient
        it brings from downstream is not finite: a dropped micro-batch sends NaN upstream, so every
        stage drops it, and the flag needs no message of its own."""
        if self.is_last:
            return bool(torch.isfinite(self.losses[mb]))
        return all(bool(torch.isfinite(g).all()) for g in payload.leaves(grad))

    def _drop(self, mb: int, state: _InFlight) -> torch.Tensor | None:
        """Leave micro-batch mb out of this stage's gradient; pass the flag upstream as a NaN gradient."""
        self.dropped.append(mb)
        self._check_limit(f"micro-batch {mb} has a non-finite loss or gradient")
        if self.is_first:
            return None
        if torch.is_tensor(state.inputs):
            return torch.full_like(state.inputs, math.nan)
        return tuple(torch.full_like(x, math.nan) for x in payload.float_leaves(state.inputs))

    def _check_limit(self, what: str) -> None:
        if len(self.dropped) + len(self.skipped) > self.nonfinite_limit:
            raise NonFiniteError(f"{what}: stage {self.index} has now dropped {len(self.dropped)} micro-batches and "
                                 f"skipped {len(self.skipped)} updates for non-finite values (limit "
                                 f"{self.nonfinite_limit}); lower --lr or check the data")

    def _record_backward(self, mb: int, state: _InFlight) -> None:
        self.versions[mb] = (state.version, self.version)
        self.window += self.loss_scale
        self.late += self.loss_scale * (self.version - state.version)

    def _finish(self, state: _InFlight) -> None:
        if self.policy is WeightPolicy.STASHED:
            self._stash_release(state.version)

    # ------------------------------------------------------------------------------------------
    # update

    def step(self) -> None:
        """U: optimizer step + LR-scheduler step + zero the grads; the version goes up by one.
        If a gradient is not finite (made inside this stage from finite inputs), the optimizer does
        not step, but the LR schedule and the version do: every later version stays where the
        schedule puts it."""
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if self.replica_mean is not None and grads:  # the last stage's recorded losses too: the replicas' mean
            self.replica_mean(grads + [self.losses[mb] for mb in sorted(self.losses)])
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        self.step_lr = self.lr
        if self.spec.compensate == "dc" and self.late and finite and self.version not in self.skipped:
            self._compensate_delay()
        if self.spec.clip_grad_norm:
            self._clip(grads, finite)
        if self.policy is WeightPolicy.STASHED:
            self._copy_on_update()
        for name, p in self._params.items():
            self._shadows[name].grad = p.grad
        if finite:
            self.optimizer.step()
            self._check_in_place()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.skipped.append(self.version + 1)
            with warnings.catch_warnings():  # torch warns about a scheduler step with no optimizer step: intended
                warnings.simplefilter("ignore", UserWarning)
                if self.scheduler is not None:
                    self.scheduler.step()
        for name, p in self._params.items():
            p.grad = None
            self._shadows[name].grad = None
        self.version += 1
        self.window = self.late = 0.0
        self._directions.clear()
        if not finite:
            self._check_limit(f"step {self.version} has a non-finite gradient")

    def _compensate_delay(self) -> None:
        """"dc": add dc_lambda * late * (sqrt(v_hat) + eps) / lr * (w_t - w_{t-1}) to the accumulated
        gradient, the last update recomputed from AdamW's moments and the rate of its step (see
        `OptimizerSpec`)."""
        shadows = {shadow: name for name, shadow in self._shadows.items()}
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                beta1, beta2 = group["betas"]
                for shadow in group["params"]:
                    state, p = self.optimizer.state.get(shadow), self._params[shadows[shadow]]
                    if not state or p.grad is None:
                        continue
                    t = int(state["step"])
                    lr = self.spec.lr_at(t - 1)
                    denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                    previous = (p + lr * state["exp_avg"] / (1 - beta1 ** t) / denom) / (1 - lr * group["weight_decay"])
                    p.grad.addcmul_(denom, p - previous, value=self.spec.dc_lambda * self.late / lr)

    def _check_in_place(self) -> None:
        """Live weights need the optimizer to write into the parameters' storage (the module reads
        it); one that rebinds `.data` would train a copy the model never sees."""
        for name, p in self._params.items():
            if self._shadows[name].data_ptr() != p.data_ptr():
                raise RuntimeError(f"stage {self.index}: the optimizer replaced the storage of parameter {name!r} "
                                   "instead of updating it in place; paci needs in-place updates (torch.optim's "
                                   "optimizers all do)")

    def local_grad_norm(self) -> torch.Tensor:
        """The 2-norm of this stage's accumulated gradient (as torch.nn.utils.clip_grad_norm_ takes it);
        0 where it is not finite, since such a step is skipped and must not shrink anyone else's."""
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))

    def _clip(self, grads: list[torch.Tensor], finite: bool) -> None:
        """Scale the gradient to norm `clip_grad_norm` where it is larger. The norm is this stage's own
        (asynchronous schedules: no stage waits for another), or with `exchange` the global one over
        every stage's norm (a flush schedule, where all stages step together anyway)."""
        norm = self.local_grad_norm()
        self.grad_norm = float(norm) if finite else math.nan
        total = torch.linalg.vector_norm(torch.stack(list(self.exchange(self.version, norm)))) \
            if self.exchange is not None else norm
        coefficient = torch.clamp(self.spec.clip_grad_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coefficient)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------------------------------
    # stashed weights

    def _stash_acquire(self) -> dict[str, torch.Tensor]:
        """The current version's weights for a forward: leaves of their own on the live storage
        (`.data`: no copy, and a version counter apart from the parameters')."""
        v = self.version
        if v not in self._stash.tensors:
            self._stash.tensors[v] = {n: p.data.requires_grad_() for n, p in self._params.items()}
            self._stash.refs[v] = 0
        self._stash.refs[v] += 1
        return self._stash.tensors[v]

    def _copy_on_update(self) -> None:
        """Before U overwrites the current version: if in-flight micro-batches still read it, leave
        them its storage and give the live weights (and the optimizer's shadows) a fresh copy."""
        if self.version not in self._stash.tensors:
            return
        for name, p in self._params.items():
            fresh = p.detach().clone()
            p.data = fresh
            self._shadows[name].data = fresh

    def _stash_release(self, version: int) -> None:
        copies = self._stash.tensors[version]
        for name, p in self._params.items():
            grad = copies[name].grad
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad.add_(grad)
                copies[name].grad = None
        self._stash.refs[version] -= 1
        if not self._stash.refs[version]:
            del self._stash.tensors[version], self._stash.refs[version]

    @property
    def stash_size(self) -> int:
        """Weight copies held right now (stashed policy): the older versions still in flight."""
        return sum(v != self.version for v in self._stash.tensors)

    @property
    def stashed_weights(self) -> list[torch.Tensor]:
        """The tensors of the weight copies held right now (stashed policy), for memory accounting."""
        return [t for v, copy in self._stash.tensors.items() if v != self.version for t in copy.values()]

    def state_dict(self) -> dict:
        """Everything a resume needs, taken at a drain point (nothing in flight): tensors and plain values."""
        if self._inflight or self._stash.tensors:
            raise RuntimeError(f"stage {self.index}: a checkpoint needs an empty pipeline, but micro-batches "
                               f"{sorted(self._inflight)} are in flight")
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                 "version": self.version, "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output: the weights in place (the shadows share them), the
        optimizer's moments, the LR schedule's position, the version and the RNG."""
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

