"""The Stage executor on the local transport: exact weight-version semantics on stock PyTorch.

Start here when a runtime number looks wrong: these tests pin what F, B, I, W and U compute.
"""

import copy
import gc

import numpy as np
import pytest
import torch
from pipeline_helpers import BATCH, SEED, TINY, feed, make_stages, reference_training, stage_parameters
from torch import nn
from torch.nn import functional as F

from paci.ir import WeightPolicy, stage_delay, with_evaluation
from paci.model import GPT, num_units
from paci.partition import uniform_split
from paci.profiler import profile_units, stage_costs
from paci.runtime.executor import run_local
from paci.runtime.memory import StageMemory
from paci.runtime.stage import OptimizerSpec, Stage
from paci.runtime.transport import LocalTransport
from paci.schedules import ONE_STAGE_PER_RANK, build
from paci.sim import CostModel, simulate


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
@pytest.mark.parametrize("stages", [2, 4])
def test_flush_schedules_match_unsplit_accumulation(name, stages):
    """Flush schedules give the unsplit model's parameters after 3 steps of plain accumulation (≤ 1e-5)."""
    schedule = build(name, stages, 4, 3)
    pipeline = make_stages(schedule)
    run_local(pipeline, schedule, LocalTransport())
    reference = reference_training(schedule)
    diffs = [(a - b).abs().max().item() for a, b in zip(stage_parameters(pipeline), reference.parameters())]
    assert len(diffs) == len(list(reference.parameters()))
    assert max(diffs) <= 1e-5
    untrained = GPT(TINY, SEED).parameters()
    assert max((a - b).abs().max().item() for a, b in zip(reference.parameters(), untrained)) > 1e-3


def test_paci_single_stage_is_plain_accumulation():
    """PACI with P = 1 is bit-identical to plain training with K-step accumulation."""
    schedule = build("paci", 1, 4, 3)
    pipeline = make_stages(schedule)
    run_local(pipeline, schedule, LocalTransport())
    reference = reference_training(schedule)
    assert all(torch.equal(a, b) for a, b in zip(stage_parameters(pipeline), reference.parameters()))


@pytest.mark.parametrize("name", ONE_STAGE_PER_RANK)
def test_recorded_versions_equal_simulator(name):
    """The (v_f, v_b) recorded for every (stage, micro-batch) equal the simulator's, evaluation rounds included."""
    schedule = with_evaluation(build(name, 3, 4, 3), every=2, num_batches=2)
    pipeline = make_stages(schedule)
    run_local(pipeline, schedule, LocalTransport())
    predicted = simulate(schedule, CostModel.per_stage(3)).trace
    for s, stage in enumerate(pipeline):
        v_f, v_b = predicted.versions(s)
        assert stage.versions == {mb: (int(v_f[mb]), int(v_b[mb])) for mb in range(schedule.num_microbatches)}


@pytest.mark.parametrize("name, expected", [("pipedream", [3, 2, 1, 0]), ("2bw", [1, 1, 1, 0])])
def test_stash_count(name, expected):
    """Copy on update: PipeDream keeps P-1-s weight copies at stage s (one per older version still in
    flight; the live one needs none), 2BW at most one, the last stage none (PipeDream, 2BW papers)."""
    schedule = build(name, 4, 4, 3)
    pipeline = make_stages(schedule)
    peak = [0] * 4
    run_local(pipeline, schedule, LocalTransport(),
              lambda stage, action: peak.__setitem__(stage.index, max(peak[stage.index], stage.stash_size)))
    assert peak == expected
    assert all(stage.stash_size == 0 for stage in pipeline)


# ----------------------------------------------------------------------------------------------
# live vs stashed, by hand: a middle stage Linear -> GELU -> Linear, one update between F and B


def _middle_stage(policy: WeightPolicy, recompute: bool = False) -> Stage:
    torch.manual_seed(0)
    modules = [nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)]
    return Stage(1, 3, modules, policy=policy, optim=OptimizerSpec(lr=0.1, weight_decay=0.0, total_steps=4),
                 loss_scale=1.0, train_batch=feed, val_batch=feed, recompute=recompute)


def _foreign_parameter_copies(stage: Stage) -> int:
    """Tensors shaped like a parameter whose storage is not a parameter, a grad or optimizer state."""
    owned = set()
    for p in stage.module.parameters():
        owned.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            owned.add(p.grad.untyped_storage().data_ptr())
    for state in stage.optimizer.state.values():
        owned.update(t.untyped_storage().data_ptr() for t in state.values() if torch.is_tensor(t) and t.dim())
    shapes = {tuple(p.shape) for p in stage.module.parameters()}
    return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj) and tuple(obj.shape) in shapes
               and obj.untyped_storage().data_ptr() not in owned)


def _update_between_forward_and_backward(policy: WeightPolicy, recompute: bool = False):
    stage = _middle_stage(policy, recompute)
    gc.collect()
    before = _foreign_parameter_copies(stage)  # what the process held already (other tests' tensors of these shapes)
    # numpy snapshots, so the memory probe does not count the test's own copies
    w1_old, b1_old, w2_old = (t.detach().numpy().copy() for t in (stage.module[0].weight, stage.module[0].bias,
                                                                   stage.module[2].weight))
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    g0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    received = x0.clone()
    stage.forward(0, received)
    stage.forward(1, torch.randn(2, 4))
    stage.backward(1, torch.ones(2, 3))
    stage.step()  # version 1: mb 0 was forwarded at version 0
    copies = []
    received.requires_grad_().register_hook(lambda grad: copies.append(_foreign_parameter_copies(stage) - before))
    input_grad = stage.backward(0, g0)
    w1_new, b1_new, w2_new = (t.detach().numpy().copy() for t in (stage.module[0].weight, stage.module[0].bias,
                                                                   stage.module[2].weight))

    def gelu_slope(w1, b1):
        h = (x0 @ torch.from_numpy(w1).T + torch.from_numpy(b1)).requires_grad_()
        return torch.autograd.grad(F.gelu(h).sum(), h)[0]

    def by_hand(w1, w2, slope=gelu_slope(w1_old, b1_old)):  # activations saved at forward time
        return ((g0 @ torch.from_numpy(w2)) * slope) @ torch.from_numpy(w1)

    live_recomputed = by_hand(w1_new, w2_new, gelu_slope(w1_new, b1_new))
    return stage, input_grad, by_hand(w1_new, w2_new), by_hand(w1_old, w2_old), live_recomputed, copies[0]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the gc scan touches deprecated torch objects
def test_live_backward_reads_updated_weights_without_copies():
    """live: after an update between F(mb) and B(mb), the input grad uses the *updated* weights
    (with forward-time activations), and no parameter-sized copy is alive during that backward."""
    stage, input_grad, live, stale, _, copies = _update_between_forward_and_backward(WeightPolicy.LIVE)
    assert stage.versions[0] == (0, 1)
    torch.testing.assert_close(input_grad, live, rtol=1e-5, atol=1e-6)
    assert not np.allclose(input_grad.numpy(), stale.numpy(), atol=1e-4)
    assert copies == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_stashed_backward_reads_forward_time_weights():
    """stashed: the same sequence yields the forward-time answer, from a weight copy held for it."""
    stage, input_grad, live, stale, _, copies = _update_between_forward_and_backward(WeightPolicy.STASHED)
    torch.testing.assert_close(input_grad, stale, rtol=1e-5, atol=1e-6)
    assert not np.allclose(input_grad.numpy(), live.numpy(), atol=1e-4)
    assert copies >= 2  # both Linear weights of version 0 are stashed: the memory probe sees them


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_live_recompute_reads_updated_weights_everywhere():
    """live + recompute: the backward re-runs the forward with the updated weights, so activations
    and weights are both version 1 (the stage's Jacobian at the weights its gradient updates);
    stashed + recompute still gives the forward-time answer."""
    stage, input_grad, live, stale, recomputed, copies = _update_between_forward_and_backward(WeightPolicy.LIVE, True)
    assert stage.versions[0] == (0, 1)
    torch.testing.assert_close(input_grad, recomputed, rtol=1e-5, atol=1e-6)
    assert not np.allclose(input_grad.numpy(), live.numpy(), atol=1e-4)
    assert copies == 0
    _, input_grad, _, stale, _, _ = _update_between_forward_and_backward(WeightPolicy.STASHED, True)
    torch.testing.assert_close(input_grad, stale, rtol=1e-5, atol=1e-6)


def _bf16_stage(modules, policy=WeightPolicy.LIVE) -> Stage:
    return Stage(1, 3, modules, policy=policy, optim=OptimizerSpec(lr=0.1, weight_decay=0.0, total_steps=4),
                 loss_scale=1.0, train_batch=feed, val_batch=feed, precision="bf16")


def _input_grad(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module(x)
    output.backward(grad)
    return x.grad


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bf16_linear_reads_forward_time_weights_layernorm_live_ones():
    """Under bf16 autocast a Linear's backward reads the bf16 copy of its weight made at forward
    time, so after an update between F and B the input gradient is the forward-time one, and the
    stage holds that copy (half a weight copy per in-flight micro-batch): bf16 PACI is not
    stash-free. LayerNorm runs in fp32 on the live weight, so it reads the updated one."""
    torch.manual_seed(0)
    stage = _bf16_stage([nn.LayerNorm(4), nn.Linear(4, 3)])
    with torch.no_grad():
        stage.module[0].weight.uniform_(0.5, 1.5)
    old_state = {k: v.numpy().copy() for k, v in stage.module.state_dict().items()}  # numpy: invisible to the probe
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    g0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    saved = []
    stage.saved_tensors_hooks = (lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t)
    stage.forward(0, x0.clone())
    stage.saved_tensors_hooks = None
    stage.forward(1, torch.randn(2, 4))
    stage.backward(1, torch.ones(2, 3))
    stage.step()
    input_grad = stage.backward(0, g0)
    old = copy.deepcopy(stage.module)
    old.load_state_dict({k: torch.from_numpy(v) for k, v in old_state.items()})
    mixed = copy.deepcopy(old)  # what bf16 PACI computes: LayerNorm's weights live, the Linear's forward-time
    mixed[0].load_state_dict(stage.module[0].state_dict())
    assert torch.equal(input_grad, _input_grad(mixed, x0, g0))
    assert not torch.equal(input_grad, _input_grad(stage.module, x0, g0))  # all live
    assert not torch.equal(input_grad, _input_grad(old, x0, g0))  # all forward-time
    assert (torch.bfloat16, (4, 3)) in saved  # micro-batch 0's bf16 copy of the Linear weight (as W^T), held until B
    assert (torch.float32, (4,)) in saved  # LayerNorm's weight: the parameter itself, read when B runs


@pytest.mark.parametrize("name", ["1f1b", "paci"])
def test_bf16_peak_bytes_equal_the_simulators(name):
    """The bf16 copies that in-flight forwards hold are activations to the meter and to a profile
    taken under autocast, so the measured peak still equals the prediction to the byte (as in fp32,
    stage 0 keeps its (batch, T+1) token tensor alive)."""
    schedule = build(name, 3, 4, 3)
    profiles = profile_units(TINY, BATCH, TINY.block_size, "cpu", "bf16", repeats=1, warmup=0, cache=False)
    fp32 = profile_units(TINY, BATCH, TINY.block_size, "cpu", repeats=1, warmup=0, cache=False)
    assert sum(p.activation_bytes for p in profiles) > sum(p.activation_bytes for p in fp32) * 0.5
    predicted = simulate(schedule, stage_costs(profiles, uniform_split(num_units(TINY), 3)))
    measured = _measured_peaks(_run_measured(schedule, precision="bf16")[2])
    token_column = predicted.metrics.per_stage[0].peak_inflight * BATCH * 8
    assert measured == [predicted.peak_bytes[0] + token_column, *predicted.peak_bytes[1:]]


@pytest.mark.parametrize("name", ONE_STAGE_PER_RANK)
def test_recompute_changes_no_bit_unless_weights_are_live_and_move(name):
    """Recompute re-runs the forward with the weights backward would read anyway on flush schedules
    (nothing moved) and stashed ones (the same copy): every parameter ends bit-identical. On the
    live asynchronous schedules the re-run sees updated weights, which is the point."""
    schedule = build(name, 3, 4, 3)
    plain, recomputed = make_stages(schedule), make_stages(schedule, recompute=True)
    run_local(plain, schedule, LocalTransport())
    run_local(recomputed, schedule, LocalTransport())
    same = all(torch.equal(a, b) for a, b in zip(stage_parameters(recomputed), stage_parameters(plain)))
    moves = schedule.weight_policy is WeightPolicy.LIVE and max(stage_delay(schedule, s) for s in range(3)) > 0
    assert same != moves
    assert torch.equal(recomputed[-1].losses[0], plain[-1].losses[0])  # the loss of a forward before any update
    assert all(not stage._inflight for stage in recomputed)


# ----------------------------------------------------------------------------------------------
# memory accounting: the stage's own bytes against the simulator's prediction


def _run_measured(schedule, **options):
    """Run `schedule` (stages built with `options`) with a StageMemory per stage, sampled after every action."""
    pipeline = make_stages(schedule, **options)
    meters = [StageMemory(stage) for stage in pipeline]
    samples = [[] for _ in pipeline]
    run_local(pipeline, schedule, LocalTransport(), lambda stage, _: samples[stage.index].append(
        meters[stage.index].sample()))
    return pipeline, meters, samples


def _measured_peaks(samples) -> list[int]:
    """Per stage: the largest static bytes plus the peak of saved activations + weight copies."""
    return [max(s.weights + s.gradients + s.optimizer for s in taken) + max(s.activations + s.stash for s in taken)
            for taken in samples]


@pytest.mark.parametrize("name", ONE_STAGE_PER_RANK)
def test_memory_meter_changes_no_number(name):
    """With the saved-tensor hooks installed every parameter ends bit-identical, and every saved
    activation is released once its backward has run."""
    schedule = build(name, 3, 4, 3)
    reference = make_stages(schedule)
    run_local(reference, schedule, LocalTransport())
    pipeline, meters, _ = _run_measured(schedule)
    assert all(torch.equal(a, b) for a, b in zip(stage_parameters(pipeline), stage_parameters(reference)))
    assert all(meter.saved.bytes == 0 for meter in meters)
    meters[0].close()
    assert pipeline[0].saved_tensors_hooks is None


@pytest.mark.parametrize("name", [n for n in ONE_STAGE_PER_RANK if n != "zb-h1"])
def test_recompute_peak_bytes_equal_the_simulators(name):
    """With recompute a stage holds only inputs: the measured peak equals the simulator's with
    `CostModel.recomputed` (stage 0 holds its (batch, T+1) token tensor, of which the ids are a
    view). ZB-H1 is left out: between I and W it holds the re-run's activations, which the
    simulator's per-micro-batch input count does not model."""
    schedule = build(name, 3, 4, 3)
    profiles = profile_units(TINY, BATCH, TINY.block_size, "cpu", repeats=1, warmup=0, cache=False)
    message = BATCH * TINY.block_size * TINY.n_embd * 4  # fp32 hidden states
    costs = stage_costs(profiles, uniform_split(num_units(TINY), 3), message_bytes=message).recomputed(
        BATCH * (TINY.block_size + 1) * 8)
    predicted = simulate(schedule, costs)
    measured = _measured_peaks(_run_measured(schedule, recompute=True)[2])
    assert measured == list(predicted.peak_bytes)
    plain = simulate(schedule, stage_costs(profiles, uniform_split(num_units(TINY), 3)))
    assert all(r < p for r, p in zip(predicted.peak_bytes, plain.peak_bytes))


@pytest.mark.parametrize("name", ONE_STAGE_PER_RANK)
def test_measured_peak_bytes_equal_the_simulators(name):
    """Per stage, the largest static bytes plus the peak of saved activations + weight copies, counted
    from the stage's own tensors, equal the simulator's peak fed with the profiled bytes; except that
    stage 0's token ids are a view of a (batch, T+1) tensor, whose extra column it keeps alive."""
    schedule = build(name, 3, 4, 3)
    profiles = profile_units(TINY, BATCH, TINY.block_size, "cpu", repeats=1, warmup=0, cache=False)
    costs = stage_costs(profiles, uniform_split(num_units(TINY), 3))
    predicted = simulate(schedule, costs)
    measured = _measured_peaks(_run_measured(schedule)[2])
    token_column = predicted.metrics.per_stage[0].peak_inflight * BATCH * 8  # int64 ids
    assert measured == [predicted.peak_bytes[0] + token_column, *predicted.peak_bytes[1:]]
