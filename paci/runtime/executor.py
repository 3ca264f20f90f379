"""Drive Stages through their schedules over a Transport, recording a measured Trace.

`Executor` runs one stage's action stream; it contains no schedule-specific code. `run_local`
drives every stage in one process (the local transport), visiting each stage until it would have
to wait for a message; the multi-process runtime runs one Executor per rank with blocking receives.
Because each stage's order is fixed, both produce exactly the same numbers.

`run_in_process` and `run_on_rank` are the one way `paci.Pipeline` and `paci train` run a
schedule, in one process or on this rank of a launched run: the same clipping exchange, the same
version check of every backward against the schedule, the same transport and message layouts;
each caller adds only what it records (its listener) and what it saves at drain points.
"""

from __future__ import annotations

import time
from array import array
from itertools import islice
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from paci.ir import (INPUT_GRAD_OPS, Action, Op, Schedule, ScheduleError, from_step, needs, render_grid, sends,
                     stage_versions)
from paci.runtime import mesh, payload
from paci.runtime.stage import Stage
from paci.runtime.transport import DistTransport, LocalTransport, MessageSpec, Transport, recv_object, send_object
from paci.trace import Trace

Listener = Callable[[Stage, Action], None]
Gate = Callable[[Stage, Action], bool]
Boundary = Callable[["Executor", Action], bool]
Reschedule = Callable[[Action], "Schedule | None"]  # before a forward: the schedule to go on with, if it changes


class StageFailure(RuntimeError):
    """An action failed; the message names the stage, the action and its position in the schedule."""


class Executor:
    """Runs one rank's action stream: the actions of its one stage, or of the several stages it
    holds (interleaved schedules), each on its own `Stage`."""

    def __init__(self, stages: Stage | Sequence[Stage], actions: Iterable[Action], transport: Transport,
                 trace: Trace, clock: Callable[[], float] = time.perf_counter, listener: Listener | None = None,
                 is_drain: Callable[[int], bool] | None = None, on_drain: Callable[[Stage], None] | None = None,
                 gate: Gate | None = None, boundary: Boundary | None = None) -> None:
        self.stages = {stage.index: stage for stage in (stages if isinstance(stages, (list, tuple)) else [stages])}
        self.transport = transport
        self.trace = trace
        self.clock = clock
        self._actions: Iterator[Action] = iter(actions)
        self._head: Action | None = next(self._actions, None)
        self._position = 0
        self.listener = listener  # listener(stage, action) after every action
        # checkpoints: on_drain(stage) for every stage held here once all of them have finished the
        # U of a step where is_drain(step) and the evaluation round that follows it, i.e. where the
        # schedule has nothing in flight (ir.with_drains)
        self.is_drain, self.on_drain = is_drain, on_drain
        self._drained = -1
        self.gate = gate  # gate(stage, action): may the action start now, besides its message (one process only)
        # boundary(executor, action) before each forward: may `switch` the streams (a prompt stop's drain point)
        self.boundary = boundary
        self._dispatch = {index: {Op.F: stage.forward, Op.E: stage.evaluate, Op.B: stage.backward,
                                  Op.I: stage.backward_input, Op.W: lambda mb, _, s=stage: s.backward_weight(mb),
                                  Op.U: lambda mb, _, s=stage: s.step()}
                          for index, stage in self.stages.items()}

    @property
    def done(self) -> bool:
        return self._head is None

    @property
    def head(self) -> Action | None:
        return self._head

    def ready(self) -> bool:
        """Could the next action start now without waiting for a message?"""
        if self._head is None:
            return False
        stage = self.stages[self._head.stage]
        msg = needs(self._head, stage.num_stages)
        return (msg is None or self.transport.ready(msg)) and (self.gate is None or self.gate(stage, self._head))

    def run_next(self) -> Action | None:
        """Run the next action, receiving (blocking) its input first and sending its output after.
        None if, at a forward, `boundary` switched the stream to one that goes on otherwise."""
        action = self._head
        if self.boundary is not None and action.op is Op.F and self.boundary(self, action) and self._head != action:
            return None
        stage = self.stages[action.stage]
        msg = needs(action, stage.num_stages)
        received, waited = None, 0.0
        if msg is not None:
            before = self.clock()
            received = self.transport.recv(msg)
            waited = self.clock() - before
        start, version = self.clock(), stage.version
        try:
            output = self._dispatch[action.stage][action.op](action.microbatch, received)
        except Exception as exc:
            raise StageFailure(f"stage {stage.index}, action {action} (position {self._position}): "
                               f"{type(exc).__name__}: {exc}") from exc
        out = sends(action, stage.num_stages)
        if out is not None:  # issuing the send is part of the action's time
            self.transport.send(out, output)
        record = self.trace.stages[action.stage]
        record.append(action.op, action.microbatch, start, self.clock(), version)
        record.wait.append(waited)
        self._head = next(self._actions, None)
        self._position += 1
        if self.listener is not None:
            self.listener(stage, action)
        if self.on_drain is not None and action.op in (Op.U, Op.E) and (self._head is None or self._head.op is not Op.E):
            self._maybe_drain()
        return action

    def switch(self, actions: Iterable[Action]) -> None:
        """Go on with `actions`, this rank's whole stream of a schedule that equals the current one
        up to where it stands (ir: a drain point added after a step that no forward here has
        started), and drain now if that point is where it stands."""
        self._actions = iter(actions)
        next(islice(self._actions, self._position, self._position), None)  # skip what already ran
        self._head = next(self._actions, None)
        if self.on_drain is not None and (self._head is None or self._head.op is not Op.E):
            self._maybe_drain()

    def _maybe_drain(self) -> None:
        versions = {stage.version for stage in self.stages.values()}
        if len(versions) == 1 and (step := versions.pop()) != self._drained and self.is_drain(step):
            self._drained = step
            for stage in self.stages.values():
                self.on_drain(stage)


def run_local(stages: list[Stage], schedule: Schedule, transport: Transport,
              listener: Listener | None = None, is_drain: Callable[[int], bool] | None = None,
              on_drain: Callable[[Stage], None] | None = None, gate: Gate | None = None,
              reschedule: Reschedule | None = None) -> Trace:
    """Run all stages in this process; returns the measured trace (times are sequential here).
    `on_drain(stage)` runs at each of the stage's drain points; `gate` can hold an action back
    (a collective: see `NormExchange`); `reschedule(action)`, asked before each forward, may
    return the schedule every stage goes on with (a prompt stop's: see `Executor.switch`)."""
    trace = Trace(schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.weight_policy,
                  kind="measured")

    def boundary(_: Executor, action: Action) -> bool:
        changed = reschedule(action)
        for s, ex in enumerate(executors if changed is not None else []):
            ex.switch(changed.actions(s))
        return changed is not None

    executors = [Executor(stage, schedule.actions(s), transport, trace, listener=listener, is_drain=is_drain,
                          on_drain=on_drain, gate=gate, boundary=boundary if reschedule is not None else None)
                 for s, stage in enumerate(stages)]
    while not all(ex.done for ex in executors):
        progressed = False
        for ex in executors:
            while ex.ready():
                ex.run_next()
                progressed = True
        if not progressed:
            marks = {s: len(trace.stages[s]) for s, ex in enumerate(executors) if not ex.done}
            detail = ", ".join(f"stage {s} waits at {executors[s].head}" for s in marks)
            raise ScheduleError(f"deadlock: {detail}\n{render_grid(schedule, marks)}")
    return trace


def run_in_process(stages: list[Stage], schedule: Schedule, *, clip_globally: bool = False, start_step: int = 0,
                   listener: Listener | None = None, is_drain: Callable[[int], bool] | None = None,
                   on_drain: Callable[[Stage], None] | None = None, reschedule: Reschedule | None = None) -> Trace:
    """Every stage in this process: `schedule` from after optimizer step `start_step` (a resumed
    run), every backward's (v_f, v_b) checked against the schedule as it happens, clipping by the
    global norm if `clip_globally`, `listener(stage, action)` after each action; `reschedule` as
    for `run_local`, returning a whole schedule (this resumes it after `start_step` too). A
    changed schedule must agree with the old one on every version up to its new drain point (the
    version check stays the old one's: the run stops there)."""
    exchange = NormExchange(stages) if clip_globally else None
    on_action, finish = _checked(schedule, stages, start_step, listener)
    trace = run_local(stages, from_step(schedule, start_step), LocalTransport(), on_action, is_drain, on_drain,
                      exchange.gate if exchange is not None else None, _resumed(reschedule, start_step))
    finish()
    return trace


def _resumed(reschedule: Reschedule | None, start_step: int) -> Reschedule | None:
    """`reschedule`'s whole schedules from after `start_step`, as the executors run them."""
    if reschedule is None:
        return None

    def resumed(action: Action) -> Schedule | None:
        changed = reschedule(action)
        return None if changed is None else from_step(changed, start_step)
    return resumed


def _checked(schedule: Schedule, stages: list[Stage], start_step: int, listener: Listener | None
             ) -> tuple[Listener, Callable[[], None]]:
    """`listener` preceded by a `VersionCheck` of every backward of `stages` (from after step
    `start_step`, each stage's versions counted from where it stands now), and the call that checks,
    after the run, that none was missing."""
    checks = {stage.index: VersionCheck(schedule, stage.index, start_step * schedule.accumulation,
                                        stage.version - start_step) for stage in stages}

    def on_action(stage: Stage, action: Action) -> None:
        checks[stage.index](stage, action)
        if listener is not None:
            listener(stage, action)

    return on_action, lambda: [check.finish() for check in checks.values()]


def join_mesh(stages: list[Stage], device: torch.device, dp: int, ranks: int, timeout_s: float,
              clip_globally: bool):
    """Connect this rank's stages to their peers of the (dp, pp) mesh of dp x `ranks` processes (a
    collective: every rank calls it): the replicas of a stage average its gradients at its step,
    and with `clip_globally` the stages of its pipeline exchange their norms. Returns the
    pipeline's group (None when dp = 1 and nothing needs it)."""
    if clip_globally and len(stages) > 1:
        raise ValueError("clipping by the global norm exchanges one norm per rank at its step; a rank holding "
                         "several stages (interleaved) steps them at different times: not supported yet")
    pipeline_group, replica_group = mesh.groups(device, dp, ranks, timeout_s, pipeline=clip_globally)
    for stage in stages:
        if clip_globally:
            stage.exchange = mesh.norm_exchange(pipeline_group, stage.num_stages)
        if replica_group is not None:
            stage.replica_mean = mesh.replica_mean(replica_group, dp)
    return pipeline_group


def run_on_rank(stages: list[Stage], schedule: Schedule, device: torch.device, timeout_s: float, *, offset: int = 0,
                start_step: int = 0, listener: Listener | None = None,
                is_drain: Callable[[int], bool] | None = None,
                on_drain: Callable[[Stage], None] | None = None, reschedule: Reschedule | None = None) -> Trace:
    """This rank's stages over torch.distributed (one, or the several an interleaved schedule puts
    on it; its pipeline's rank p is global rank `offset` + p): message layouts from one forward of
    micro-batch 0 handed down the pipeline, then the rank's part of `schedule` from after step
    `start_step`, every backward's versions checked as in `run_in_process`. Returns the trace with
    these stages' columns filled in."""
    rank = stages[0].index % schedule.ranks
    resumed = from_step(schedule, start_step)
    layouts = exchange_layouts(stages, schedule.ranks, device, offset, start_step * schedule.accumulation)
    transport = DistTransport(resumed, rank, layouts, device, timeout_s, offset=offset)
    trace = Trace(schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.weight_policy, "measured",
                  num_ranks=schedule.num_ranks)
    on_action, finish = _checked(schedule, stages, start_step, listener)
    changes = _resumed(reschedule, start_step)

    def boundary(ex: Executor, action: Action) -> bool:
        changed = changes(action)
        if changed is not None:  # the peers' messages come in the same order up to the new drain point
            ex.switch(changed.rank_actions(rank))
        return changed is not None

    executor = Executor(stages, resumed.rank_actions(rank), transport, trace, listener=on_action,
                        is_drain=is_drain, on_drain=on_drain, boundary=boundary if changes is not None else None)
    while not executor.done:
        executor.run_next()
    transport.flush()
    finish()
    return trace


def exchange_layouts(stages: list[Stage], ranks: int, device: torch.device, offset: int = 0,
                     first: int = 0) -> MessageSpec:
    """What this rank receives and sends, as `DistTransport` needs it: the layout of each payload,
    from one forward of micro-batch `first`, the run's first (stage 0), or of zeros laid out as the stage before reported,
    handed down the pipeline stage by stage (a model's own shapes, never written by hand)."""
    received: dict[int, payload.Layout] = {}
    sent: dict[int, payload.Layout] = {}
    for stage in sorted(stages, key=lambda stage: stage.index):
        if stage.is_first:
            x = stage.train_batch(first)[0]
        else:
            received[stage.index] = layout = recv_object(offset + (stage.index - 1) % ranks)
            x = payload.rebuild(layout, [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in layout.leaves])
        if not stage.is_last:
            sent[stage.index] = stage.output_layout(x)
            send_object(sent[stage.index], offset + (stage.index + 1) % ranks)
    return lambda msg: sent[msg.dst].grads() if msg.kind == "B" else received[msg.dst]


class VersionCheck:
    """Every (v_f, v_b) a stage records must equal the schedule's prediction; a mismatch is a runtime
    bug. Checked as each backward happens (the stage's record is consumed), so nothing grows with
    the length of the run; `finish` checks that every backward was seen. `first`: the first
    micro-batch run (a resumed run checks those it ran); `base`: the stage's version when the
    schedule started (a Pipeline fitted again continues its versions)."""

    def __init__(self, schedule: Schedule, stage: int, first: int = 0, base: int = 0) -> None:
        self.stage, self.first, self.base = stage, first, base
        self.expected = (item for item in stage_versions(schedule, stage) if item[0] >= first)
        self.checked, self.total = 0, schedule.num_microbatches - first

    def __call__(self, stage: Stage, action: Action) -> None:
        if action.op not in INPUT_GRAD_OPS:
            return
        mb, v_f, v_b = next(self.expected, (None, None, None))
        v_f_run, v_b_run = stage.versions.pop(action.microbatch)
        recorded = (v_f_run - self.base, v_b_run - self.base)
        if mb != action.microbatch or recorded != (v_f, v_b):
            raise RuntimeError(f"stage {self.stage}, micro-batch {action.microbatch}: recorded (v_f, v_b) = "
                               f"{recorded}, the schedule predicts micro-batch {mb} with {(v_f, v_b)}")
        self.checked += 1

    def finish(self) -> None:
        if self.checked != self.total:
            raise RuntimeError(f"stage {self.stage} ran {self.checked} backwards, the schedule has {self.total}")


class NormExchange:
    """Every stage's gradient norm at each step, for clipping by the global norm in one process.

    As a gate, it holds each stage's U back until every stage has reached its U of the same step
    and posted its norm (the gradient is final there), as an all-gather holds the ranks of a
    multi-process run; as each stage's `exchange`, it then hands out all the norms in stage order.
    """

    def __init__(self, stages: list[Stage]) -> None:
        self.num_stages = len(stages)
        self._posted: dict[int, dict[int, torch.Tensor]] = {}  # step -> stage -> norm
        self._read: dict[int, int] = {}
        for stage in stages:
            stage.exchange = self

    def gate(self, stage: Stage, action: Action) -> bool:
        if action.op is not Op.U:
            return True
        posted = self._posted.setdefault(stage.version, {})
        if stage.index not in posted:
            posted[stage.index] = stage.local_grad_norm()
        return len(posted) == self.num_stages

    def __call__(self, step: int, norm: torch.Tensor) -> list[torch.Tensor]:
        norms = [self._posted[step][s] for s in range(self.num_stages)]
        self._read[step] = self._read.get(step, 0) + 1
        if self._read[step] == self.num_stages:
            del self._posted[step], self._read[step]
        return norms


def gather_trace(trace: Trace, held: int | Sequence[int], extra: Any = None, group=None
                 ) -> tuple[Trace, list[Any]] | None:
    """Collect every rank's columns of `trace` on rank 0 (a collective: every rank of `group` calls
    it with the stage, or the stages, it ran).

    Each rank's times are moved onto the wall clock, then the whole trace onto its first action,
    so ranks on different machines line up as well as their clocks do. Rank 0 (the one holding
    stage 0) gets the full trace and every rank's `extra`, in rank order; the others get None.
    """
    held = [held] if isinstance(held, int) else list(held)
    offset = time.time() - time.perf_counter()
    mine = (held, [trace.stages[i] for i in held], offset, extra)
    parts = mesh.gather_objects(mine, group)
    if parts is None:
        return None
    for indices, columns_list, rank_offset, _ in parts:
        for index, columns in zip(indices, columns_list):
            columns.start = array("d", (t + rank_offset for t in columns.start))
            columns.end = array("d", (t + rank_offset for t in columns.end))
            trace.stages[index] = columns
    trace.shift(min(c.start[0] for c in trace.stages if len(c)))
    return trace, [part[3] for part in sorted(parts, key=lambda part: part[0][0])]
