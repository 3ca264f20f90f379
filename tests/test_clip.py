"""--clip-grad-norm: the global norm on a flush schedule equals torch.nn.utils.clip_grad_norm_ on
the unsplit model; each stage's own norm on an asynchronous one; and a bound that is never reached
changes no bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from paci.config import load_config
from paci.model import GPT
from paci.runtime.executor import NormExchange, run_local
from paci.runtime.transport import LocalTransport
from paci.schedules import build
from paci.train import train
from pipeline_helpers import make_stages, optimizer_spec, reference_training, stage_parameters

CLIP = 0.05  # well below the tiny GPT's gradient norms (about 1), so every step clips


def _clipped_reference(schedule, groups_of=None) -> GPT:
    """The unsplit model, plain accumulation, clip_grad_norm_ before each step: over all parameters,
    or over each group of `groups_of(model)` separately (the per-stage rule)."""
    def clip(model: GPT) -> None:
        for group in (groups_of(model) if groups_of else [list(model.parameters())]):
            torch.nn.utils.clip_grad_norm_(group, CLIP)

    return reference_training(schedule, spec=dataclasses.replace(optimizer_spec(schedule), clip_grad_norm=CLIP),
                              before_step=clip)


def _run(name: str, stages: int, exchange: bool, clip: float = CLIP):
    schedule = build(name, stages, 4, 3)
    pipeline = make_stages(schedule, spec=dataclasses.replace(optimizer_spec(schedule), clip_grad_norm=clip))
    gate = NormExchange(pipeline).gate if exchange else None
    run_local(pipeline, schedule, LocalTransport(), gate=gate)
    return schedule, pipeline


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "zb-h1"])
@pytest.mark.parametrize("stages", [2, 4])
def test_global_norm_clipping_equals_clip_grad_norm_on_the_unsplit_model(name, stages):
    schedule, pipeline = _run(name, stages, exchange=True)
    reference = _clipped_reference(schedule)
    unclipped = make_stages(schedule)
    run_local(unclipped, schedule, LocalTransport())
    diffs = [(a - b).abs().max().item() for a, b in zip(stage_parameters(pipeline), reference.parameters())]
    assert max(diffs) <= 1e-6
    apart = [(a - b).abs().max().item() for a, b in zip(stage_parameters(unclipped), reference.parameters())]
    assert max(apart) > 1e-3  # clipping changed the run


def test_per_stage_clipping_clips_each_stage_by_its_own_norm():
    """Without the exchange (the asynchronous rule) a flush schedule equals the unsplit model with
    clip_grad_norm_ applied to each stage's parameters separately."""
    schedule, pipeline = _run("1f1b", 2, exchange=False)
    sizes = [len(list(stage.module.parameters())) for stage in pipeline]

    def per_stage(model):
        params = list(model.parameters())
        return [params[:sizes[0]], params[sizes[0]:]]

    reference = _clipped_reference(schedule, per_stage)
    diffs = [(a - b).abs().max().item() for a, b in zip(stage_parameters(pipeline), reference.parameters())]
    assert max(diffs) <= 1e-6
    globally = _clipped_reference(schedule)
    assert max((a - b).abs().max().item() for a, b in zip(reference.parameters(), globally.parameters())) > 1e-4


@pytest.mark.parametrize("name", ["paci", "1f1b"])
def test_a_bound_never_reached_changes_no_bit(name):
    _, clipped = _run(name, 2, exchange=name == "1f1b", clip=1e6)
    plain = make_stages(build(name, 2, 4, 3))
    run_local(plain, build(name, 2, 4, 3), LocalTransport())
    assert all(torch.equal(a, b) for a, b in zip(stage_parameters(clipped), stage_parameters(plain)))


@pytest.mark.parametrize("name", ["1f1b", "paci"])
def test_each_stages_norm_before_clipping_is_in_metrics(tmp_path, name):
    config = load_config(None, {"model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
                                "pipeline": {"schedule": name, "stages": 3, "microbatches": 4, "split": "uniform"},
                                "optim": {"clip_grad_norm": 0.5},
                                "train": {"steps": 4, "eval_every": 2, "eval_batches": 1, "out": str(tmp_path)}})
    train(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(len(r["grad_norm"]) == 3 and all(n > 0 for n in r["grad_norm"]) for r in steps)
    assert all("grad_norm" not in r for r in records if "loss" not in r)
