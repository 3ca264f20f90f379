"""Stash-free compensation for delayed gradients: each is the identity where nothing is delayed.

`OptimizerSpec.for_stage(delay)` gives a stage its optimizer from the largest drift the schedule
fixes for it; PipeMare rescales that stage's learning rate, Nesterov switches it to NAdamW with
beta1 = 0.99, and predict runs each forward that an update will overtake on predicted weights. Where the delay is 0 (every synchronous schedule, PACI's last stage) both must train
bit for bit like plain AdamW, and the weights a live backward reads stay exact with NAdamW too.
"""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from pipeline_helpers import TINY, SEED, make_stages, optimizer_spec, reference_training, stage_parameters

from paci.ir import WeightPolicy, stage_delay
from paci.model import GPT
from paci.runtime.executor import run_local
from paci.runtime.stage import NESTEROV_BETA1, OptimizerSpec, Stage
from paci.runtime.transport import LocalTransport
from paci.schedules import build


def _train(schedule, spec: OptimizerSpec) -> list[torch.Tensor]:
    pipeline = make_stages(schedule, spec=spec)
    run_local(pipeline, schedule, LocalTransport())
    return stage_parameters(pipeline)


@pytest.mark.parametrize("compensate", ["pipemare", "nesterov", "predict", "predict-window", "dc"])
@pytest.mark.parametrize("name", ["1f1b", "gpipe", "zb-h1"])
def test_identity_without_delay(name, compensate):
    """On a synchronous schedule (Δ = 0 on every stage) a compensation changes no bit."""
    schedule = build(name, 4, 4, 3)
    plain = optimizer_spec(schedule)
    assert [stage_delay(schedule, s) for s in range(4)] == [0, 0, 0, 0]
    compensated = _train(schedule, dataclasses.replace(plain, compensate=compensate))
    assert all(torch.equal(a, b) for a, b in zip(compensated, _train(schedule, plain)))
    assert max((a - b).abs().max().item() for a, b in zip(compensated, GPT(TINY, SEED).parameters())) > 1e-3


def test_pipemare_is_the_identity_at_delay_one_and_acts_beyond():
    """PACI with K >= P-1 has Δ <= 1, where PipeMare's lr / Δ^p is lr; at K = 1 it is not."""
    schedule = build("paci", 4, 4, 3)  # K = 4 >= P - 1
    assert [stage_delay(schedule, s) for s in range(4)] == [1, 1, 1, 0]
    plain = optimizer_spec(schedule)
    pipemare = dataclasses.replace(plain, compensate="pipemare")
    assert all(torch.equal(a, b) for a, b in zip(_train(schedule, pipemare), _train(schedule, plain)))
    delayed = build("paci", 4, 4, 3, 1)  # K = 1: Δ = P-1-s
    assert [stage_delay(delayed, s) for s in range(4)] == [3, 2, 1, 0]
    assert not all(torch.equal(a, b) for a, b in zip(_train(delayed, pipemare), _train(delayed, plain)))


def test_pipemare_learning_rate_by_hand():
    """lr / τ^p with p falling linearly from 1 to 0 over the first 15% of the steps."""
    base = OptimizerSpec(lr=1.0, warmup_steps=0, total_steps=100, min_lr_ratio=1.0)  # constant schedule
    spec = dataclasses.replace(base, compensate="pipemare").for_stage(4)
    assert spec.lr_at(0) == pytest.approx(1 / 4)
    assert spec.lr_at(7.5) == pytest.approx(1 / 2)  # p = 1/2
    assert spec.lr_at(15) == pytest.approx(1.0)
    assert spec.lr_at(60) == pytest.approx(1.0)
    assert dataclasses.replace(base, compensate="pipemare").for_stage(1).lr_at(0) == 1.0


def test_nesterov_switches_only_delayed_stages():
    """Delayed stages step with NAdamW (beta1 0.99, decoupled decay); the undelayed last stage keeps AdamW."""
    schedule = build("paci", 4, 4, 3)
    spec = dataclasses.replace(optimizer_spec(schedule), compensate="nesterov")
    pipeline = make_stages(schedule, spec=spec)
    kinds = [(type(stage.optimizer).__name__, stage.optimizer.defaults["betas"][0]) for stage in pipeline]
    assert kinds == [("NAdam", NESTEROV_BETA1)] * 3 + [("AdamW", 0.9)]
    assert all(stage.optimizer.defaults["decoupled_weight_decay"] for stage in pipeline[:3])


def test_predicted_forward_by_hand():
    """predict: a forward that the schedule says one update will overtake runs on w + (AdamW's next
    step, taken with the current moments), computed here by hand; the weights are bit for bit
    back afterwards; a forward no update overtakes runs on the weights as they are."""
    torch.manual_seed(0)
    modules = [nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)]
    spec = OptimizerSpec(lr=0.1, weight_decay=0.1, warmup_steps=0, total_steps=10, compensate="predict")
    ahead = {0: 0, 1: 1, 2: 0}
    stage = Stage(1, 3, modules, policy=WeightPolicy.LIVE, optim=spec, loss_scale=1.0, train_batch=None,
                  val_batch=None, updates_ahead=ahead.__getitem__)
    x = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    stage.forward(0, x[0].clone())
    stage.backward(0, torch.ones(2, 3))
    stage.step()
    before = [p.detach().clone() for p in stage.module.parameters()]
    predicted = []
    for (name, p), shadow in zip(stage.module.named_parameters(), stage._shadows.values()):
        m, v = stage.optimizer.state[shadow]["exp_avg"], stage.optimizer.state[shadow]["exp_avg_sq"]
        lr, decay = spec.lr_at(1), 0.1 if p.dim() >= 2 else 0.0
        predicted.append(p.detach() * (1 - lr * decay) - lr * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.95 ** 2)).sqrt() + 1e-8))
    w1, b1, w2, b2 = predicted
    expected = F.gelu(x[1] @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(stage.forward(1, x[1].clone()), expected, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(stage.module.parameters(), before))
    torch.testing.assert_close(stage.forward(2, x[2].clone()), stage.module(x[2]).detach(), rtol=0, atol=0)
    stage.backward(1, torch.ones(2, 3))
    stage.backward(2, torch.ones(2, 3))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stage.module.parameters())


@pytest.mark.parametrize("gain", [1.0, 1.5])
def test_window_predicted_forward_by_hand(gain):
    """predict-window: with a share f of the coming update's micro-batches already backpropagated, the
    first predicted step's first moment is beta1 m + (1 - beta1) (g_so_far + (1 - f) m); the gain
    scales the whole displacement; the weights are bit for bit back afterwards, and the share
    starts again from 0 after a step."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    spec = OptimizerSpec(lr=0.1, weight_decay=0.1, warmup_steps=0, total_steps=10, compensate="predict-window",
                         predict_gain=gain)
    ahead = {0: 0, 1: 0, 2: 0, 3: 1}
    stage = Stage(1, 3, [linear], policy=WeightPolicy.LIVE, optim=spec, loss_scale=0.25, train_batch=None,
                  val_batch=None, updates_ahead=ahead.__getitem__)
    x = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    g = [torch.randn(2, 3, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    stage.forward(0, x[0].clone())
    stage.backward(0, g[0])
    stage.step()
    assert stage.window == 0.0
    stage.forward(1, x[1].clone())
    stage.forward(2, x[2].clone())
    stage.backward(1, g[1])
    stage.backward(2, g[2])  # two of the window's four micro-batches: f = 1/2
    assert stage.window == 0.5
    before = [p.detach().clone() for p in linear.parameters()]
    predicted = []
    for p, shadow in zip(linear.parameters(), stage._shadows.values()):
        state = stage.optimizer.state[shadow]
        m = 0.9 * state["exp_avg"] + 0.1 * (p.grad + 0.5 * state["exp_avg"])
        lr, decay = spec.lr_at(1), 0.1 if p.dim() >= 2 else 0.0
        step = p.detach() * (1 - lr * decay) - lr * (m / (1 - 0.9 ** 2)) / ((state["exp_avg_sq"] / (1 - 0.95 ** 2)).sqrt() + 1e-8)
        predicted.append(p.detach() + gain * (step - p.detach()))
    w, b = predicted
    torch.testing.assert_close(stage.forward(3, x[3].clone()), x[3] @ w.T + b, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(linear.parameters(), before))


@pytest.mark.parametrize("compensate", ["predict", "predict-window"])
def test_muon_predicted_forward_by_hand(compensate):
    """predict with Muon: the hidden matrix moves by Muon's next step with the momentum as the coming
    gradient, -lr (scale NS(m) + wd w) (predict-window: the window's gradient so far plus (1 - f) m,
    through the Nesterov momentum), the bias by AdamW's predicted step; weights bit for bit back
    afterwards; the moment-only direction is orthogonalised once per window."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 8)
    spec = OptimizerSpec(lr=0.1, weight_decay=0.1, warmup_steps=0, total_steps=10, name="muon", compensate=compensate)
    ahead = {0: 0, 1: 0, 2: 1, 3: 1}
    stage = Stage(1, 3, [linear], policy=WeightPolicy.LIVE, optim=spec, loss_scale=0.5, train_batch=None,
                  val_batch=None, updates_ahead=ahead.__getitem__)
    muon, adamw = stage.optimizer.muon, stage.optimizer.adamw
    x = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    g = [torch.randn(3, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    stage.forward(0, x[0].clone())
    stage.backward(0, g[0])
    stage.step()
    stage.forward(1, x[1].clone())
    stage.backward(1, g[1])  # half the window: f = 1/2
    w, b = linear.weight, linear.bias
    (w_shadow, b_shadow) = stage._shadows.values()
    buffer = muon.state[w_shadow]["momentum_buffer"]
    lr = spec.lr_at(1)
    estimate = buffer if compensate == "predict" else w.grad + 0.5 * buffer
    nesterov = estimate.lerp(buffer.lerp(estimate, 0.05), 0.95)
    w_pred = w.detach() * (1 - lr * 0.1) - lr * 0.2 * 8 ** 0.5 * paci_orthogonalize(nesterov)
    m, v = adamw.state[b_shadow]["exp_avg"], adamw.state[b_shadow]["exp_avg_sq"]
    if compensate == "predict-window":
        m = 0.9 * m + 0.1 * (b.grad + 0.5 * m)
    b_pred = b.detach() - lr * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.95 ** 2)).sqrt() + 1e-8)
    before = [p.detach().clone() for p in linear.parameters()]
    torch.testing.assert_close(stage.forward(2, x[2].clone()), x[2] @ w_pred.T + b_pred, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, c) for a, c in zip(linear.parameters(), before))
    assert len(stage._directions) == (1 if compensate == "predict" else 0)
    stage.backward(2, g[2])
    stage.step()
    assert not stage._directions and stage.window == 0.0


def paci_orthogonalize(update: torch.Tensor) -> torch.Tensor:
    from paci.optim import NS_COEFFICIENTS, orthogonalize

    return orthogonalize(update, NS_COEFFICIENTS, 5, 1e-7, torch.float32)


def test_predict_acts_only_where_updates_overtake():
    """PACI at K >= P-1: prediction changes training (stages 0..P-2 have delayed forwards), and a
    one-stage PACI (no delay anywhere) is bit for bit plain."""
    schedule = build("paci", 4, 4, 3)
    plain = optimizer_spec(schedule)
    predict = dataclasses.replace(plain, compensate="predict")
    assert not all(torch.equal(a, b) for a, b in zip(_train(schedule, predict), _train(schedule, plain)))
    single = build("paci", 1, 4, 3)
    assert all(torch.equal(a, b) for a, b in zip(_train(single, predict), _train(single, plain)))


@pytest.mark.parametrize("name", ["1f1b", "paci"])
def test_nadamw_live_weights_are_exact(name):
    """With NAdamW the stages' shadow-parameter step is as exact as with AdamW: 1F1B equals the unsplit
    model trained with NAdamW (≤ 1e-5), and PACI at P = 1 equals it bit for bit."""
    schedule = build(name, 4 if name == "1f1b" else 1, 4, 3)
    spec = dataclasses.replace(optimizer_spec(schedule), name="nadamw", betas=(0.99, 0.95))
    reference = reference_training(schedule, spec=spec)
    trained = _train(schedule, spec)
    tolerance = 1e-5 if name == "1f1b" else 0.0
    assert max((a - b).abs().max().item() for a, b in zip(trained, reference.parameters())) <= tolerance
    adamw = reference_training(schedule)
    assert max((a - b).abs().max().item() for a, b in zip(reference.parameters(), adamw.parameters())) > 1e-4


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_delay_compensation_by_hand(lam):
    """dc: a micro-batch whose backward crossed one update adds lambda * (its share) * H (w_t - w_{t-1})
    to the step's gradient, H = (sqrt(v_hat) + eps) / lr being AdamW's implied curvature, with the
    last update recomputed from AdamW's state equal to the one measured here; a window with no late
    micro-batch steps on its gradient unchanged."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    spec = OptimizerSpec(lr=0.1, weight_decay=0.1, warmup_steps=0, total_steps=10, compensate="dc", dc_lambda=lam)
    stage = Stage(1, 3, [linear], policy=WeightPolicy.LIVE, optim=spec, loss_scale=0.25, train_batch=None,
                  val_batch=None)
    stepped, moments = [], []  # the gradient each optimizer step sees, and AdamW's second moments then
    step = stage.optimizer.step
    stage.optimizer.step = lambda: (stepped.append([s.grad.clone() for s in stage._shadows.values()]),
                                    moments.append([stage.optimizer.state[s]["exp_avg_sq"].clone()
                                                    for s in stage._shadows.values() if stage.optimizer.state]),
                                    step())[2]
    x = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    g = [torch.randn(2, 3, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    stage.forward(0, x[0].clone())
    stage.backward(0, g[0])
    stage.step()  # version 1
    stage.forward(1, x[1].clone())  # at version 1 ...
    stage.forward(2, x[2].clone())
    stage.backward(2, g[2])
    plain = [p.grad.clone() for p in linear.parameters()]
    w1 = [p.detach().clone() for p in linear.parameters()]
    stage.step()  # version 2: nothing late in this window
    assert all(torch.equal(a, b) for a, b in zip(stepped[1], plain))
    w2 = [p.detach().clone() for p in linear.parameters()]
    stage.backward(1, g[1])  # ... its backward at version 2: one update late
    assert stage.late == 0.25
    plain = [p.grad.clone() for p in linear.parameters()]
    stage.step()
    for got, grad, before, after, v in zip(stepped[2], plain, w1, w2, moments[2]):
        v_hat = v / (1 - 0.95 ** 2)  # the state after step 2
        curvature = (v_hat.sqrt() + 1e-8) / spec.lr_at(1)
        torch.testing.assert_close(got, grad + lam * 0.25 * curvature * (after - before), rtol=1e-5, atol=1e-7)
        assert not torch.equal(got, grad)
    assert stage.late == 0.0
