"""The one trace type shared by simulated and measured runs, and the metrics computed from it.

A trace holds, per stage and in that stage's execution order, every compute action with its
start and end time and the weight version it saw. The simulator writes one; so does every rank
of a real run. Both are drawn by the same renderer and summarised by the same `metrics`.

Storage is columnar (`array` per field), so a 10**6-micro-batch trace stays compact.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from paci.ir import COMPUTE_OPS, Op, WeightPolicy

OP_CODE = {op: code for code, op in enumerate(COMPUTE_OPS)}  # F=0 B=1 I=2 W=3 U=4 E=5
_F, _B, _I, _W, _U, _E = (OP_CODE[op] for op in COMPUTE_OPS)
NO_MICROBATCH = -1


class Event(NamedTuple):
    stage: int
    op: Op
    microbatch: int | None
    start: float
    end: float
    version: int  # the stage's version when the action started


@dataclass
class StageTrace:
    op: array = field(default_factory=lambda: array("b"))
    microbatch: array = field(default_factory=lambda: array("q"))
    start: array = field(default_factory=lambda: array("d"))
    end: array = field(default_factory=lambda: array("d"))
    version: array = field(default_factory=lambda: array("q"))
    wait: array = field(default_factory=lambda: array("d"))  # measured runs: time blocked receiving first

    def append(self, op: Op, microbatch: int | None, start: float, end: float, version: int) -> None:
        self.op.append(OP_CODE[op])
        self.microbatch.append(NO_MICROBATCH if microbatch is None else microbatch)
        self.start.append(start)
        self.end.append(end)
        self.version.append(version)

    def __len__(self) -> int:
        return len(self.op)


class Columns(NamedTuple):
    """One stage's actions as numpy arrays (views, no copy); `drift` is Δ for B/I and 0 otherwise."""

    op: np.ndarray
    microbatch: np.ndarray
    start: np.ndarray
    end: np.ndarray
    version: np.ndarray
    drift: np.ndarray


@dataclass
class Trace:
    """Per-stage columns of executed actions.

    `kind` is "simulated" or "measured"; `time_unit` names what a time value counts ("s" for
    measured traces and simulations fed with seconds, "units" for abstract unit costs).
    """

    name: str
    num_stages: int
    num_microbatches: int
    weight_policy: WeightPolicy
    kind: str = "simulated"
    time_unit: str | None = None  # default: "s" when measured, else "units"
    stages: list[StageTrace] = field(default_factory=list)
    num_ranks: int = 0  # 0: one stage per rank; else stage s ran on rank s % num_ranks

    def __post_init__(self) -> None:
        if self.time_unit is None:
            self.time_unit = "s" if self.kind == "measured" else "units"
        if not self.stages:
            self.stages = [StageTrace() for _ in range(self.num_stages)]

    def events(self, stage: int | None = None) -> Iterator[Event]:
        for s in range(self.num_stages) if stage is None else (stage,):
            st = self.stages[s]
            for code, mb, start, end, version in zip(st.op, st.microbatch, st.start, st.end, st.version):
                yield Event(s, COMPUTE_OPS[code], None if mb == NO_MICROBATCH else mb, start, end, version)

    def columns(self, stage: int) -> Columns:
        st = self.stages[stage]
        op = np.frombuffer(st.op, dtype=np.int8)
        mb = np.frombuffer(st.microbatch, dtype=np.int64)
        version = np.frombuffer(st.version, dtype=np.int64)
        v_f, _ = self.versions(stage)
        backward = ((op == _B) | (op == _I)) & (mb >= 0)
        forward_version = np.full(len(op), -1, dtype=np.int64)
        forward_version[backward] = v_f[mb[backward]]
        known = backward & (forward_version >= 0)  # a partial measured trace may lack the F
        drift = np.where(known, version - forward_version, 0)
        return Columns(op, mb, np.frombuffer(st.start, dtype=np.float64), np.frombuffer(st.end, dtype=np.float64),
                       version, drift)

    def versions(self, stage: int) -> tuple[np.ndarray, np.ndarray]:
        """(v_f, v_b) per micro-batch at `stage`: the version at its F and at its backward (B or I).

        -1 where the trace holds no such action.
        """
        st = self.stages[stage]
        ops = np.frombuffer(st.op, dtype=np.int8)
        mbs = np.frombuffer(st.microbatch, dtype=np.int64)
        vers = np.frombuffer(st.version, dtype=np.int64)
        fwd = ops == _F
        bwd = (ops == _B) | (ops == _I)  # E events carry eval indices, not micro-batches: skipped
        used = mbs[fwd | bwd]
        if used.size and used.max() >= self.num_microbatches:
            raise ValueError(f"stage {stage} holds micro-batch {int(used.max())}, beyond the trace's "
                             f"{self.num_microbatches}")
        v_f = np.full(self.num_microbatches, -1, dtype=np.int64)
        v_b = np.full(self.num_microbatches, -1, dtype=np.int64)
        v_f[mbs[fwd]] = vers[fwd]
        v_b[mbs[bwd]] = vers[bwd]
        return v_f, v_b

    def shift(self, offset: float) -> None:
        """Move every time by -offset, in place (measured traces start at wall-clock time)."""
        for st in self.stages:
            st.start = array("d", (t - offset for t in st.start))
            st.end = array("d", (t - offset for t in st.end))

    def metrics(self) -> TraceMetrics:
        return compute_metrics(self)


@dataclass
class StageMetrics:
    busy: float
    idle: float
    steady_window: float  # from the stage's first backward to its last forward
    steady_idle: float
    max_drift: int
    drift_histogram: dict[int, int]
    peak_inflight: int
    weight_copies: int  # peak stashed weight copies (0 unless the policy is stashed)


@dataclass
class TraceMetrics:
    makespan: float
    bubble_fraction: float
    steady_bubble_fraction: float | None  # None when no stage reaches a steady state
    throughput: float  # micro-batches per unit time
    max_drift: int
    per_stage: list[StageMetrics]

    def as_dict(self) -> dict:
        return asdict(self)


def compute_metrics(trace: Trace) -> TraceMetrics:
    t0 = min((st.start[0] for st in trace.stages if len(st)), default=0.0)
    t1 = max((st.end[-1] for st in trace.stages if len(st)), default=0.0)
    makespan = t1 - t0
    per_stage = [_stage_metrics(trace, s, makespan) for s in range(trace.num_stages)]
    busy = sum(m.busy for m in per_stage)
    if trace.num_ranks and trace.num_ranks != trace.num_stages:  # a rank's steady state spans all its stages
        steady = [_steady(*_merged(trace, range(r, trace.num_stages, trace.num_ranks))) for r in range(trace.num_ranks)]
    else:
        steady = [(m.steady_window, m.steady_idle) for m in per_stage]
    window = sum(w for w, _ in steady)
    return TraceMetrics(
        makespan=makespan,
        bubble_fraction=1.0 - busy / ((trace.num_ranks or trace.num_stages) * makespan) if makespan > 0 else 0.0,
        steady_bubble_fraction=sum(idle for _, idle in steady) / window if window > 0 else None,
        throughput=trace.num_microbatches / makespan if makespan > 0 else 0.0,
        max_drift=max((m.max_drift for m in per_stage), default=0),
        per_stage=per_stage,
    )


def _stage_metrics(trace: Trace, stage: int, makespan: float) -> StageMetrics:
    st = trace.stages[stage]
    ops, _, start, end, _, _ = trace.columns(stage)
    busy = float(np.sum(end - start))
    window, idle_in_window = _steady(ops, start, end)
    v_f, v_b = trace.versions(stage)
    done = (v_f >= 0) & (v_b >= 0)
    drift = v_b[done] - v_f[done]
    histogram = {int(k): int(v) for k, v in sorted(Counter(drift.tolist()).items())} if drift.size else {}
    delta = np.where(ops == _F, 1, np.where((ops == _B) | (ops == _W), -1, 0))
    peak_inflight = int(np.max(np.cumsum(delta), initial=0))
    copies = _peak_stash(st, v_f) if trace.weight_policy is WeightPolicy.STASHED else 0
    return StageMetrics(busy, makespan - busy, window, max(idle_in_window, 0.0), int(drift.max(initial=0)),
                        histogram, peak_inflight, copies)


def _steady(ops: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[float, float]:
    """(steady window, idle time in it) of one worker's actions in the order it ran them: the
    window runs from its first backward to its last forward (none if the last forward comes first)."""
    cum_busy = np.concatenate(([0.0], np.cumsum(end - start)))
    backward = np.flatnonzero((ops == _B) | (ops == _I))
    forward = np.flatnonzero(ops == _F)
    if not (len(backward) and len(forward) and forward[-1] > backward[0]):
        return 0.0, 0.0
    first, last = backward[0], forward[-1]
    window = float(end[last] - start[first])
    return window, max(window - float(cum_busy[last + 1] - cum_busy[first]), 0.0)


def _merged(trace: Trace, stages: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ops, start, end) of several stages that one rank ran, in the order it ran them."""
    columns = [trace.columns(s) for s in stages]
    start = np.concatenate([c.start for c in columns])
    order = np.argsort(start, kind="stable")
    return (np.concatenate([c.op for c in columns])[order], start[order],
            np.concatenate([c.end for c in columns])[order])


def _peak_stash(st: StageTrace, v_f: np.ndarray) -> int:
    """Peak number of weight copies under copy-on-update: distinct forward-time versions held by
    in-flight micro-batches that an update has since replaced (the live version needs none)."""
    refs: Counter[int] = Counter()
    peak = 0
    for code, mb, version in zip(st.op, st.microbatch, st.version):
        if code == _F:
            refs[version] += 1
        elif code == _B or code == _W:
            v = int(v_f[mb])
            refs[v] -= 1
            if not refs[v]:
                del refs[v]
        elif code == _U:
            peak = max(peak, sum(v <= version for v in refs))  # after U the live version is version + 1
    return peak
