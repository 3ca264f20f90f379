"""Schedule builders: every schedule validates over a grid, streams lazily, and steps on the right data."""

import itertools
import math
import time

import pytest

from paci import ir
from paci.ir import Op, WeightPolicy
from paci.schedules import REGISTRY, build

K1 = {"async-1f1b", "pipedream"}
FLUSH = {"gpipe", "1f1b", "zb-h1", "interleaved-1f1b"}


def _grid():
    for name, stages, microbatches, steps in itertools.product(REGISTRY, (1, 2, 3, 5), (1, 2, 4, 7), (1, 3)):
        for accum in (None, 1, 2, 4):
            if name in FLUSH and accum is not None:
                continue
            if name in K1 and accum not in (None, 1):
                continue
            k = microbatches if accum is None else accum
            if name in ("paci", "2bw") and (microbatches * steps) % k:
                continue
            if name == "2bw" and k < stages - 1:
                continue
            if name == "interleaved-1f1b" and microbatches % max(1, microbatches // stages):
                continue
            yield name, stages, microbatches, steps, accum


@pytest.mark.parametrize("name, stages, microbatches, steps, accum", list(_grid()))
def test_schedule_validates(name, stages, microbatches, steps, accum):
    """Every registered schedule is complete, well-ordered and deadlock-free over a grid of (P, M, S, K)."""
    ir.validate(build(name, stages, microbatches, steps, accum))


@pytest.mark.parametrize("name", REGISTRY)
def test_step_k_accumulates_microbatches_kK_to_kK_plus_K(name):
    """Between U number k and k+1, every stage's weight-backwards are exactly micro-batches kK..(k+1)K-1."""
    schedule = build(name, 4, 4, 3, None if name in FLUSH | K1 else 3)
    k = schedule.accumulation
    for stage in range(schedule.num_stages):
        groups, current = [], []
        for action in schedule.actions(stage):
            if action.op in (Op.B, Op.W):
                current.append(action.microbatch)
            elif action.op is Op.U:
                groups.append(sorted(current))
                current = []
        assert groups == [list(range(i * k, (i + 1) * k)) for i in range(schedule.num_steps)]


def test_async_streams_are_lazy():
    """A 10**9-micro-batch PACI schedule builds instantly and yields its first actions without a list."""
    start = time.perf_counter()
    schedule = build("paci", 8, 8, 125_000_000)
    head = [str(a) for a in itertools.islice(schedule.actions(0), 9)]
    assert time.perf_counter() - start < 1.0
    assert schedule.num_microbatches == 10**9
    assert head == ["0F0", "0F1", "0F2", "0F3", "0F4", "0F5", "0F6", "0F7", "0B0"]


def test_paci_is_1f1b_without_the_drain():
    """PACI(K=M) equals 1F1B-flush's order once the per-step drains are removed: same U after every M-th B."""
    paci = [str(a) for a in build("paci", 3, 4, 1).actions(0)]
    flush = [str(a) for a in build("1f1b", 3, 4, 1).actions(0)]
    assert paci == flush  # one step: nothing to overlap
    two_steps = [str(a) for a in build("paci", 3, 4, 2).actions(0)]
    assert two_steps[:8] == ["0F0", "0F1", "0F2", "0B0", "0F3", "0B1", "0F4", "0B2"]
    assert two_steps[8:10] == ["0F5", "0B3"] and two_steps[10] == "0U"


def test_policies_and_accumulation():
    """Each schedule carries the weight policy and K that DESIGN.md §2 assigns it."""
    expected = {"gpipe": (WeightPolicy.NONE, 4), "1f1b": (WeightPolicy.NONE, 4), "zb-h1": (WeightPolicy.NONE, 4),
                "async-1f1b": (WeightPolicy.LIVE, 1), "pipedream": (WeightPolicy.STASHED, 1),
                "2bw": (WeightPolicy.STASHED, 4), "paci": (WeightPolicy.LIVE, 4),
                "interleaved-1f1b": (WeightPolicy.NONE, 4)}
    for name, (policy, k) in expected.items():
        schedule = build(name, 3, 4, 2)
        assert (schedule.weight_policy, schedule.accumulation) == (policy, k), name


@pytest.mark.parametrize("args, fragment", [
    (("nope", 2, 2), "unknown schedule 'nope'; choose one of: gpipe"),
    (("paci", 0, 2), "stages must be an integer >= 1"),
    (("paci", 2, 0), "micro-batches must be an integer >= 1"),
    (("paci", 2, 2, 0), "steps must be an integer >= 1"),
    (("paci", 2, 4, 1, 0), "K must be >= 1"),
    (("paci", 2, 4, 1, 3), "must divide the 4 micro-batches"),
    (("1f1b", 2, 4, 1, 2), "drop --accum"),
    (("pipedream", 2, 4, 1, 2), "use --schedule 2bw"),
    (("2bw", 8, 4, 1, 4), "2bw needs K >= P-1 = 7"),
])
def test_build_rejects_bad_arguments(args, fragment):
    """Bad sizes raise ValueError with the fix in the message."""
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        build(*args)


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_interleaved_order_is_torch_pipelinings(ranks, chunks):
    """Every rank's order equals torch.distributed.pipelining's ScheduleInterleaved1F1B, action for
    action, for every m torch accepts (its "flex" rounds included); paci only adds the U's."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    checked = 0
    for m in range(1, 13):
        try:
            theirs = visualizer.get_schedule_ops("Interleaved1F1B", ranks, m, num_stages_per_rank=chunks)
        except ValueError:
            with pytest.raises(ValueError, match="equal rounds"):
                build("interleaved-1f1b", ranks, m, 1, chunks=chunks)
            continue
        schedule = build("interleaved-1f1b", ranks, m, 1, chunks=chunks)
        ir.validate(schedule)
        ours = [[str(a) for a in schedule.rank_actions(r) if a.op is not Op.U] for r in range(ranks)]
        assert ours == [[str(a) for a in row if a is not None] for row in theirs], m
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("name, accum", [("paci", None), ("paci", 2), ("2bw", None), ("async-1f1b", None)])
def test_a_synchronous_start_is_1f1b_flush_then_the_schedule(name, accum):
    """--sync-steps N: the first N optimizer steps are 1F1B-flush's with the same K (every backward
    reads its forward's version), the rest the schedule's own on the micro-batches after them, as one
    valid schedule; the simulator times it between the two."""
    from paci.sim import CostModel, simulate

    whole = build(name, 4, 4, 6, accum)
    k = whole.accumulation
    sync = 4 if k == 1 else 2
    started = build(name, 4, 4, 6, accum, sync_steps=sync)
    ir.validate(started)
    assert started.num_steps == whole.num_steps and started.weight_policy is whole.weight_policy
    assert dict(started.params)["sync_steps"] == sync
    flush = build("1f1b", 4, k, sync)
    for s in range(4):
        actions = list(started.actions(s))
        assert actions[:len(list(flush.actions(s)))] == list(flush.actions(s))
        deltas = [v_b - v_f for mb, v_f, v_b in ir.stage_versions(started, s)]
        assert not any(deltas[:sync * k])
    assert max(v_b - v_f for mb, v_f, v_b in ir.stage_versions(started, 0)) > 0
    time = {label: simulate(schedule, CostModel.per_stage(4)).metrics.makespan
            for label, schedule in (("async", whole), ("started", started),
                                    ("flush", build("1f1b", 4, k, whole.num_steps)))}
    assert time["async"] < time["started"] < time["flush"], time


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name="1f1b", sync_steps=2), "synchronous already"),
    (dict(name="paci", sync_steps=6), "must be below"),
    (dict(name="paci", accumulation=2, sync_steps=1), "whole mini-batches"),
    (dict(name="paci", sync_steps=3, drain_every=2), "multiple of --checkpoint-every"),
])
def test_a_synchronous_start_rejects_what_it_cannot_do(kwargs, fragment):
    args = dict(num_stages=4, num_microbatches=4, num_steps=6) | kwargs
    with pytest.raises(ValueError, match=fragment):
        build(**args)


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("m, k", [(4, 4), (4, 2), (2, 4), (4, 1)])
def test_a_drain_added_at_a_step_changes_nothing_a_rank_runs_before_that_steps_first_forward(name, m, k):
    """What a prompt stop relies on: the schedule with an extra drain point after step S is, on
    every rank, the schedule without it up to the rank's first forward of a micro-batch of step
    S + 1 (so a run that has not started step S + 1 on stage 0 can switch to it), and the whole
    stream is unchanged for the flush schedules (which drain every step anyway). Also with
    evaluation rounds and periodic drain points around it."""
    try:
        plain = build(name, 4, m, 6, k)
    except ValueError:  # async-1f1b and pipedream take K = 1 only
        return
    steps = plain.num_steps
    for every in (0, 2 * (m // math.gcd(m, k))):
        old = ir.with_evaluation(build(name, 4, m, 6, k, drain_every=every), 3, 2)
        for step in range(1, steps):
            if step * k % m or (every and step % every == 0):
                continue
            new = ir.with_evaluation(build(name, 4, m, 6, k, drain_every=every, drains=(step,)), 3, 2)
            assert dict(new.params)["drains"] == (step * k // m,) and new.num_microbatches == old.num_microbatches
            for rank in range(old.ranks):
                before, after = list(old.rank_actions(rank)), list(new.rank_actions(rank))
                cut = next(i for i, a in enumerate(before) if a.op is Op.F and a.microbatch >= step * k)
                assert before[:cut] == after[:cut]
                if old.weight_policy is WeightPolicy.NONE:
                    assert before == after
