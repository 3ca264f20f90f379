"""The simulator equals the closed forms: bubbles, PACI's drift bound, stash counts, memory parity.

If one fails, check paci/sim/engine.py (timing) and paci/trace.py (metrics) before the builders.
"""

import dataclasses
import json
import math

import pytest

from paci import ir
from paci.ir import Action, ScheduleError, WeightPolicy
from paci.schedules import build
from paci.sim import CostModel, parse_costs, simulate

GRID = [(p, m) for p in (2, 3, 4, 8) for m in (1, 2, 4, 8, 13)]


def _run(name, stages, microbatches, steps=1, accum=None, **costs):
    return simulate(build(name, stages, microbatches, steps, accum), CostModel.per_stage(stages, **costs))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, microbatches", GRID)
def test_flush_bubble_is_closed_form(name, stages, microbatches):
    """GPipe and 1F1B-flush with uniform costs: bubble (P-1)/(m+P-1), makespan (m+P-1)(F+B)."""
    metrics = _run(name, stages, microbatches, forward=1.0, backward=2.0).metrics
    assert metrics.makespan == pytest.approx((microbatches + stages - 1) * 3.0)
    assert metrics.bubble_fraction == pytest.approx((stages - 1) / (microbatches + stages - 1))


@pytest.mark.parametrize("stages, microbatches", [(p, m) for p, m in GRID if m >= p])
def test_zb_h1_bubble_is_closed_form_and_memory_matches_1f1b(stages, microbatches):
    """ZB-H1 with F=I=W: makespan m(F+B) + (P-1)(F+I-W), below 1F1B, with 1F1B's peak activations."""
    zb = _run("zb-h1", stages, microbatches, forward=1.0, backward=2.0, weight=1.0)
    flush = _run("1f1b", stages, microbatches, forward=1.0, backward=2.0, weight=1.0)
    assert zb.metrics.makespan == pytest.approx(3.0 * microbatches + (stages - 1) * 1.0)
    if stages > 1:
        assert zb.metrics.bubble_fraction < flush.metrics.bubble_fraction
    assert max(s.peak_inflight for s in zb.metrics.per_stage) == max(s.peak_inflight for s in flush.metrics.per_stage)


@pytest.mark.parametrize("chunks", [2, 3, 4])
@pytest.mark.parametrize("stages, rounds", [(p, r) for p in (2, 3, 4, 8) for r in (1, 2, 4)])
def test_interleaved_bubble_and_memory_are_closed_form(stages, rounds, chunks):
    """Interleaved 1F1B, the model cut into v·P stages of 1/v the cost (F = 1/v, B = 2/v), m = rounds·P:
    makespan m(F+B) + (P-1)(F+B)/v per step, bubble (P-1)/(v·m+P-1), v times smaller than 1F1B's in the
    fill and drain; rank r holds min((v-1)P + 2(P-1-r) + 1, v·m) stages' activations of 1/v at its
    peak, more than 1F1B's P-r on the first ranks (Narayanan et al. 2021)."""
    m, v = rounds * stages, chunks
    schedule = build("interleaved-1f1b", stages, m, 2, chunks=v)
    result = simulate(schedule, parse_costs("1,2", schedule.num_stages, v))
    assert (schedule.num_stages, schedule.ranks) == (v * stages, stages)
    assert result.metrics.makespan == pytest.approx(2 * (m * 3.0 + (stages - 1) * 3.0 / v))  # two steps
    one_step = simulate(build("interleaved-1f1b", stages, m, 1, chunks=v), parse_costs("1,2", v * stages, v))
    assert one_step.metrics.bubble_fraction == pytest.approx((stages - 1) / (v * m + stages - 1))
    assert result.peak_bytes == pytest.approx([4.0 + min((v - 1) * stages + 2 * (stages - 1 - r) + 1, v * m) / v
                                               for r in range(stages)])


@pytest.mark.parametrize("stages, microbatches", GRID)
def test_paci_is_bubble_free_in_steady_state(stages, microbatches):
    """PACI with balanced stages: steady-state bubble 0; overall only the one fill and drain (P-1)/(N+P-1)."""
    steps = 6
    metrics = _run("paci", stages, microbatches, steps, forward=1.0, backward=2.0).metrics
    total = microbatches * steps
    assert metrics.bubble_fraction == pytest.approx((stages - 1) / (total + stages - 1))
    if stages > 1:
        assert metrics.steady_bubble_fraction == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("accum", [1, 2, 3, 4, 7, 8])
def test_paci_drift_bound_is_exact(stages, accum):
    """PACI(K): the largest Δ at stage s is exactly ⌈(P-1-s)/K⌉ (attained, never exceeded)."""
    result = _run("paci", stages, accum, steps=2 * stages + 2)
    for s, stage in enumerate(result.metrics.per_stage):
        assert stage.max_drift == math.ceil((stages - 1 - s) / accum), f"stage {s}"


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1"])
def test_flush_schedules_never_drift(name):
    """Flush schedules see Δ ≡ 0 on every (stage, micro-batch)."""
    result = _run(name, 4, 6, steps=3)
    for s in range(4):
        v_f, v_b = result.trace.versions(s)
        assert (v_f == v_b).all() and (v_f >= 0).all()
    assert result.metrics.max_drift == 0


@pytest.mark.parametrize("stages", [2, 4, 8])
def test_pipedream_holds_p_minus_1_minus_s_weight_copies(stages):
    """PipeDream holds one weight version per in-flight micro-batch, P-s at stage s; copied on
    update, all but the live one are copies: P-1-s."""
    result = _run("pipedream", stages, 4, steps=2 * stages)
    assert [s.weight_copies for s in result.metrics.per_stage] == [stages - 1 - s for s in range(stages)]


@pytest.mark.parametrize("stages, accum", [(2, 1), (4, 3), (4, 8), (8, 7), (8, 16)])
def test_2bw_holds_at_most_two_versions(stages, accum):
    """2BW with K >= P-1 never needs more than two weight versions at any stage: one copy."""
    result = _run("2bw", stages, accum, steps=4)
    assert max(s.weight_copies for s in result.metrics.per_stage) == 1
    assert result.metrics.max_drift <= 1


@pytest.mark.parametrize("stages, microbatches", [(p, m) for p, m in GRID if m >= p])
def test_paci_peak_bytes_equal_1f1b(stages, microbatches):
    """PACI needs no weight copies: its peak bytes per stage equal 1F1B-flush's."""
    paci = _run("paci", stages, microbatches, steps=3)
    flush = _run("1f1b", stages, microbatches, steps=3)
    assert paci.peak_bytes == flush.peak_bytes
    assert all(s.weight_copies == 0 for s in paci.metrics.per_stage)


def test_stashing_costs_memory():
    """PipeDream's peak bytes exceed PACI's by one weight copy per in-flight micro-batch whose version
    an update has replaced: P-1-s."""
    paci = _run("paci", 4, 1, steps=8, accum=1)
    pipedream = _run("pipedream", 4, 1, steps=8)
    assert [b - a for a, b in zip(paci.peak_bytes, pipedream.peak_bytes)] == [3.0, 2.0, 1.0, 0.0]


def test_link_latency_adds_two_crossings_per_stage_boundary():
    """GPipe with link latency L: makespan (m+P-1)(F+B) + 2(P-1)L."""
    metrics = _run("gpipe", 4, 5, forward=1.0, backward=2.0, latency=0.25).metrics
    assert metrics.makespan == pytest.approx(8 * 3.0 + 2 * 3 * 0.25)


def test_update_time_is_counted():
    """A U of cost u on every stage adds u per step to a single-stage run."""
    metrics = _run("1f1b", 1, 4, steps=3, forward=1.0, backward=2.0, update=0.5).metrics
    assert metrics.makespan == pytest.approx(3 * (4 * 3.0 + 0.5))


def test_versions_follow_from_the_schedule():
    """At stage 0 of PACI(P=3, K=2), micro-batch mb is forwarded at ⌊(mb-2)/2⌋ and backwarded at ⌊mb/2⌋."""
    result = _run("paci", 3, 2, steps=5)
    v_f, v_b = result.trace.versions(0)
    assert list(v_f) == [max(0, (mb - 2) // 2) for mb in range(10)]
    assert list(v_b) == [mb // 2 for mb in range(10)]


def test_simulator_reports_deadlock():
    """A schedule whose orders cross deadlocks in the simulator too, naming the stuck actions."""
    rows = [[Action.from_str(c) for c in r.split()] for r in ["0F0 0B0 0F1 0B1 0U", "1F1 1B1 1F0 1B0 1U"]]
    schedule = ir.from_rows(rows, "crossed", 2, WeightPolicy.NONE)
    with pytest.raises(ScheduleError, match="stage 0 waits at 0B0, stage 1 waits at 1F1"):
        simulate(schedule, CostModel.per_stage(2))


@pytest.mark.parametrize("text", ["1", "1,2,3,4", "a,b", "1,-2", "0,2", "1,2,3", "nan,1"])
def test_parse_costs_rejects_malformed(text):
    """--costs accepts F,B or F,B,W positive numbers with W <= B only."""
    with pytest.raises(ValueError):
        parse_costs(text, 2)


def test_cost_model_round_trips_through_json():
    """as_dict -> JSON -> from_dict gives the same cost model (per-stage times, bytes, link, unit)."""
    costs = dataclasses.replace(CostModel.per_stage(3, [1.0, 2.0, 3.0], 4.0, weight=[1.0, 2.0, 3.0], update=0.5,
                                                    latency=0.1, message_bytes=8.0, static_bytes=[1, 2, 3]),
                                time_unit="s")
    assert CostModel.from_dict(json.loads(json.dumps(costs.as_dict()))) == costs
    with pytest.raises(ValueError, match="unknown cost-model keys"):
        CostModel.from_dict({"forward": [1.0], "backward": [2.0], "forwards": [1.0]})
    with pytest.raises(ValueError, match="needs per-stage 'forward' and 'backward'"):
        CostModel.from_dict({"forward": [1.0]})
