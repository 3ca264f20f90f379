"""Stash-free compensation for delayed gradients: each is the identity where nothing is delayed.

`OptimizerSpec.for_stage(delay)` gives a stage its optimizer from the largest drift the schedule
fixes for it; PipeMare rescales that stage's learning rate, Nesterov switches it to NAdamW with
beta1 = 0.99. Where the delay is 0 (every synchronous schedule, PACI's last stage) both must train
bit for bit like plain AdamW, and the weights a live backward reads stay exact with NAdamW too.
"""

import dataclasses

import pytest
import torch
from pipeline_helpers import TINY, SEED, make_stages, optimizer_spec, reference_training, stage_parameters

from paci.ir import stage_delay
from paci.model import GPT
from paci.runtime.executor import run_local
from paci.runtime.stage import NESTEROV_BETA1, OptimizerSpec
from paci.runtime.transport import LocalTransport
from paci.schedules import build


def _train(schedule, spec: OptimizerSpec) -> list[torch.Tensor]:
    pipeline = make_stages(schedule, spec=spec)
    run_local(pipeline, schedule, LocalTransport())
    return stage_parameters(pipeline)


@pytest.mark.parametrize("compensate", ["pipemare", "nesterov"])
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
