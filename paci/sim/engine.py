"""Discrete-event simulation of a schedule under a cost model.

Each stage runs its actions in its fixed order; an action starts when the stage is free and the
message it needs (see `ir.needs`) has arrived. Start times are therefore longest paths in the
dependency graph, independent of the order stages are visited in, and every weight version an F
or B sees follows from the schedule alone. The loop visits a stage until it blocks and wakes it
when its message is sent, so the work is linear in the number of actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paci.ir import Action, Op, Schedule, ScheduleError, needs, render_grid, sends
from paci.sim.costs import CostModel
from paci.trace import NO_MICROBATCH, OP_CODE, Trace, TraceMetrics

U_CODE = OP_CODE[Op.U]
F_CODE = OP_CODE[Op.F]
WEIGHT_CODES = [OP_CODE[Op.B], OP_CODE[Op.W]]
MAX_STAGES = 1024
# Stages x micro-batches: the trace keeps every action (33 bytes each, 2 to 4 per micro-batch and
# stage), so at this limit a simulation takes about 2 GB and a minute or two.
MAX_PASSES = 20_000_000


@dataclass
class Simulation:
    trace: Trace
    metrics: TraceMetrics
    peak_bytes: list[float]  # per rank (per stage where each rank holds one)

    def as_dict(self) -> dict:
        out = self.metrics.as_dict()
        if len(self.peak_bytes) == len(out["per_stage"]):
            for stage, peak in zip(out["per_stage"], self.peak_bytes):
                stage["peak_bytes"] = peak
        else:
            out["peak_bytes_per_rank"] = self.peak_bytes
        return out


def check_size(schedule: Schedule) -> None:
    """Raise ValueError, saying what to shrink, for a schedule too large to simulate (or to run and
    record: a run keeps the same trace of every action and simulates it at the end)."""
    stages, microbatches = schedule.num_stages, schedule.num_microbatches
    if stages > MAX_STAGES:
        raise ValueError(f"{stages:,} stages is more than paci simulates or runs (at most {MAX_STAGES:,}): "
                         "use fewer --stages")
    if stages * microbatches > MAX_PASSES:
        raise ValueError(f"{stages:,} stages x {microbatches:,} micro-batches is more than paci simulates or records "
                         f"(at most {MAX_PASSES:,} stage x micro-batch passes, about 2 GB of trace): use fewer "
                         "--steps or --microbatches")


def simulate(schedule: Schedule, costs: CostModel) -> Simulation:
    """Run `schedule` under `costs`; raise ScheduleError (with the blocked actions) on deadlock, and
    ValueError for a schedule over the size limit (`check_size`)."""
    check_size(schedule)
    if costs.num_stages != schedule.num_stages:
        raise ValueError(f"cost model has {costs.num_stages} stages, schedule {schedule.num_stages}")
    trace = run_trace(schedule, costs)
    metrics = trace.metrics()
    if schedule.ranks == schedule.num_stages:
        peak_bytes = [costs.static_bytes[s] + costs.activation_bytes[s] * m.peak_inflight
                      + costs.weight_bytes[s] * m.weight_copies for s, m in enumerate(metrics.per_stage)]
    else:
        peak_bytes = [_rank_peak(trace, costs, schedule, r, metrics.per_stage) for r in range(schedule.ranks)]
    return Simulation(trace, metrics, peak_bytes)


def _rank_peak(trace: Trace, costs: CostModel, schedule: Schedule, rank: int, per_stage: list) -> float:
    """Peak bytes of a rank holding several stages: their static bytes, plus the activations that
    its stages hold at once, followed through the rank's actions in the order it ran them (plus
    each stage's peak weight copies)."""
    stages = schedule.stages_of(rank)
    starts, deltas = [], []
    for s in stages:
        columns = trace.columns(s)
        starts.append(columns.start)
        sign = np.where(columns.op == F_CODE, 1.0, np.where(np.isin(columns.op, WEIGHT_CODES), -1.0, 0.0))
        deltas.append(sign * costs.activation_bytes[s])
    order = np.argsort(np.concatenate(starts), kind="stable")
    held = np.cumsum(np.concatenate(deltas)[order])
    return (sum(costs.static_bytes[s] + costs.weight_bytes[s] * per_stage[s].weight_copies for s in stages)
            + float(held.max(initial=0.0)))


def _stage_table(costs: CostModel, stage: int) -> dict[Op, tuple[int, float, str | None, str | None, int, float]]:
    """Per op: (trace code, duration, kind needed, kind sent, destination, transfer time of the send).

    Derived once per stage from `ir.needs` / `ir.sends`, so the dependency rule stays in one place
    while the hot loop below does only dict lookups.
    """
    durations = {Op.F: costs.forward[stage], Op.B: costs.backward[stage],
                 Op.I: costs.backward[stage] - costs.weight[stage], Op.W: costs.weight[stage],
                 Op.U: costs.update[stage], Op.E: costs.forward[stage]}
    table = {}
    for op, duration in durations.items():
        probe = Action(stage, op, 0)
        need, out = needs(probe, costs.num_stages), sends(probe, costs.num_stages)
        # the link carries the activation of the lower of the two stages (or its gradient)
        transfer = costs.transfer(min(stage, out.dst)) if out else 0.0
        table[op] = (OP_CODE[op], duration, need and need.kind, out and out.kind, out.dst if out else -1, transfer)
    return table


def run_trace(schedule: Schedule, costs: CostModel) -> Trace:
    """Each rank runs its stream in order on one clock (several stages' actions where it holds
    several); an action waits for the rank and for its message; versions count per stage."""
    num_stages, num_ranks = schedule.num_stages, schedule.ranks
    trace = Trace(schedule.name, num_stages, schedule.num_microbatches, schedule.weight_policy,
                  time_unit=costs.time_unit, num_ranks=schedule.num_ranks)
    streams = [schedule.rank_actions(r) for r in range(num_ranks)]
    heads = [next(it, None) for it in streams]
    tables = [_stage_table(costs, s) for s in range(num_stages)]
    clock = [0.0] * num_ranks
    version = [0] * num_stages
    # arrivals of messages, per destination stage and kind, keyed by micro-batch
    arrivals: list[dict[str, dict[int, float]]] = [{"F": {}, "B": {}, "E": {}} for _ in range(num_stages)]
    waiting_on: list[tuple[int, str, int] | None] = [None] * num_ranks  # (stage, kind, mb)
    recorders = [(c.op.append, c.microbatch.append, c.start.append, c.end.append, c.version.append)
                  for c in trace.stages]
    runnable = list(reversed(range(num_ranks)))
    while runnable:
        rank = runnable.pop()
        stream = streams[rank]
        now = clock[rank]
        action = heads[rank]
        while action is not None:
            stage, op, mb = action
            code, duration, need, out, dst, transfer = tables[stage][op]
            start = now
            if need is not None:
                arrival = arrivals[stage][need].pop(mb, None)
                if arrival is None:
                    waiting_on[rank] = (stage, need, mb)
                    break
                if arrival > start:
                    start = arrival
            now = start + duration
            rec_op, rec_mb, rec_start, rec_end, rec_version = recorders[stage]
            rec_op(code)
            rec_mb(NO_MICROBATCH if mb is None else mb)
            rec_start(start)
            rec_end(now)
            rec_version(version[stage])
            if code == U_CODE:
                version[stage] += 1
            elif out is not None:
                arrivals[dst][out][mb] = now + transfer
                peer = dst % num_ranks
                if waiting_on[peer] == (dst, out, mb):
                    waiting_on[peer] = None
                    runnable.append(peer)
            action = next(stream, None)
        heads[rank] = action
        clock[rank] = now
    blocked = [r for r in range(num_ranks) if heads[r] is not None]
    if blocked:
        detail = ", ".join(f"{_where(schedule, r)} waits at {heads[r]}" for r in blocked)
        marks = {s: len(trace.stages[s]) for s in {heads[r].stage for r in blocked}}
        raise ScheduleError(f"deadlock: {detail}\n{render_grid(schedule, marks)}")
    return trace


def _where(schedule: Schedule, rank: int) -> str:
    return f"rank {rank}" if schedule.ranks != schedule.num_stages else f"stage {rank}"
