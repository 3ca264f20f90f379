"""Discrete-event simulation of a schedule under a cost model.

Each stage runs its actions in its fixed order; an action starts when the stage is free and the
message it needs (see `ir.needs`) has arrived. Start times are therefore longest paths in the
dependency graph, independent of the order stages are visited in, and every weight version an F
or B sees follows from the schedule alone. The loop visits a stage until it blocks and wakes it
when its message is sent, so the work is linear in the number of actions.
"""

from __future__ import annotations

from dataclasses import dataclass

from paci.ir import Action, Op, Schedule, ScheduleError, needs, render_grid, sends
from paci.sim.costs import CostModel
from paci.trace import NO_MICROBATCH, OP_CODE, Trace, TraceMetrics

U_CODE = OP_CODE[Op.U]
MAX_STAGES = 1024
# Stages x micro-batches: the trace keeps every action (33 bytes each, 2 to 4 per micro-batch and
# stage), so at this limit a simulation takes about 2 GB and a minute or two.
MAX_PASSES = 20_000_000


@dataclass
class Simulation:
    trace: Trace
    metrics: TraceMetrics
    peak_bytes: list[float]

    def as_dict(self) -> dict:
        out = self.metrics.as_dict()
        for stage, peak in zip(out["per_stage"], self.peak_bytes):
            stage["peak_bytes"] = peak
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
    peak_bytes = [costs.static_bytes[s] + costs.activation_bytes[s] * m.peak_inflight
                  + costs.weight_bytes[s] * m.weight_copies for s, m in enumerate(metrics.per_stage)]
    return Simulation(trace, metrics, peak_bytes)


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
    num_stages = schedule.num_stages
    trace = Trace(schedule.name, num_stages, schedule.num_microbatches, schedule.weight_policy,
                  time_unit=costs.time_unit)
    streams = [schedule.actions(s) for s in range(num_stages)]
    heads = [next(it, None) for it in streams]
    tables = [_stage_table(costs, s) for s in range(num_stages)]
    clock = [0.0] * num_stages
    version = [0] * num_stages
    # arrival times of messages, per destination stage and kind, keyed by micro-batch
    arrivals: list[dict[str, dict[int, float]]] = [{"F": {}, "B": {}, "E": {}} for _ in range(num_stages)]
    waiting_on: list[tuple[str, int] | None] = [None] * num_stages
    runnable = list(reversed(range(num_stages)))
    while runnable:
        stage = runnable.pop()
        stream, table, inbox = streams[stage], tables[stage], arrivals[stage]
        columns = trace.stages[stage]
        rec_op, rec_mb, rec_start, rec_end, rec_version = (columns.op.append, columns.microbatch.append,
                                                           columns.start.append, columns.end.append,
                                                           columns.version.append)
        now, v = clock[stage], version[stage]
        action = heads[stage]
        while action is not None:
            _, op, mb = action
            code, duration, need, out, dst, transfer = table[op]
            start = now
            if need is not None:
                arrival = inbox[need].pop(mb, None)
                if arrival is None:
                    waiting_on[stage] = (need, mb)
                    break
                if arrival > start:
                    start = arrival
            now = start + duration
            rec_op(code)
            rec_mb(NO_MICROBATCH if mb is None else mb)
            rec_start(start)
            rec_end(now)
            rec_version(v)
            if code == U_CODE:
                v += 1
            elif out is not None:
                arrivals[dst][out][mb] = now + transfer
                if waiting_on[dst] == (out, mb):
                    waiting_on[dst] = None
                    runnable.append(dst)
            action = next(stream, None)
        heads[stage] = action
        clock[stage], version[stage] = now, v
    blocked = [s for s in range(num_stages) if heads[s] is not None]
    if blocked:
        detail = ", ".join(f"stage {s} waits at {heads[s]}" for s in blocked)
        marks = {s: len(trace.stages[s]) for s in blocked}
        raise ScheduleError(f"deadlock: {detail}\n{render_grid(schedule, marks)}")
    return trace
