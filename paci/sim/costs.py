"""The simulator's cost model: per-stage op times, P2P link, and per-stage bytes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from paci.ir import Op
from paci.trace import OP_CODE, Trace


def _per_stage(value: float | Sequence[float], num_stages: int, what: str) -> tuple[float, ...]:
    values = (float(value),) * num_stages if isinstance(value, (int, float)) else tuple(map(float, value))
    if len(values) != num_stages:
        raise ValueError(f"{what}: expected {num_stages} per-stage values, got {len(values)}")
    if not all(0 <= v < math.inf for v in values):
        raise ValueError(f"{what}: values must be finite and >= 0, got {values}")
    return values


@dataclass(frozen=True)
class CostModel:
    """Times in any one unit (seconds, or abstract units); bytes in any one unit.

    backward is the full B; weight is the W part of it, so a split backward costs
    I = backward - weight and W = weight. message_bytes[s] is the size of stage s's output
    activation (and of the gradient sent back to it). A message takes latency + bytes/bandwidth
    and overlaps compute.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    weight: tuple[float, ...]
    update: tuple[float, ...]
    latency: float = 0.0
    bandwidth: float = math.inf
    message_bytes: tuple[float, ...] = ()
    static_bytes: tuple[float, ...] = ()
    activation_bytes: tuple[float, ...] = ()
    weight_bytes: tuple[float, ...] = ()
    time_unit: str = "units"  # "s" when the times are measured seconds

    @property
    def num_stages(self) -> int:
        return len(self.forward)

    @classmethod
    def per_stage(cls, num_stages: int, forward: float | Sequence[float] = 1.0,
                  backward: float | Sequence[float] = 2.0, weight: float | Sequence[float] | None = None,
                  update: float | Sequence[float] = 0.0, latency: float = 0.0, bandwidth: float = math.inf,
                  message_bytes: float | Sequence[float] = 0.0, static_bytes: float | Sequence[float] = 4.0,
                  activation_bytes: float | Sequence[float] = 1.0,
                  weight_bytes: float | Sequence[float] = 1.0) -> CostModel:
        """Scalars apply to every stage. Default bytes are in units of one stage's weights:
        static = weights + grads + two AdamW moments = 4, one micro-batch's activations = 1."""
        n = num_stages
        backward_t = _per_stage(backward, n, "backward")
        weight_t = tuple(b / 2 for b in backward_t) if weight is None else _per_stage(weight, n, "weight")
        if any(w > b for w, b in zip(weight_t, backward_t)):
            raise ValueError(f"weight-grad time W must not exceed the full backward B (W={weight_t}, B={backward_t})")
        if latency < 0 or not bandwidth > 0:
            raise ValueError(f"latency must be >= 0 and bandwidth > 0, got {latency}, {bandwidth}")
        return cls(_per_stage(forward, n, "forward"), backward_t, weight_t, _per_stage(update, n, "update"),
                   float(latency), float(bandwidth), _per_stage(message_bytes, n, "message_bytes"),
                   _per_stage(static_bytes, n, "static_bytes"), _per_stage(activation_bytes, n, "activation_bytes"),
                   _per_stage(weight_bytes, n, "weight_bytes"))

    def as_dict(self) -> dict:
        """Every field by name, per-stage values as lists: what `from_dict` reads back."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        """A cost model from `as_dict`'s keys (e.g. a JSON file): per-stage forward and backward
        times are required, the rest default as in `per_stage`; scalars apply to every stage."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown cost-model keys {unknown}; the keys are {sorted(known)}")
        if "forward" not in data or "backward" not in data:
            raise ValueError("a cost model needs per-stage 'forward' and 'backward' times, e.g. "
                             '{"forward": [0.01, 0.01], "backward": [0.02, 0.02]}')
        forward = data["forward"]
        num_stages = 1 if isinstance(forward, (int, float)) else len(forward)
        options = {k: v for k, v in data.items() if k not in ("forward", "time_unit")}
        return replace(cls.per_stage(num_stages, forward, **options), time_unit=data.get("time_unit", "units"))

    def recomputed(self, first_input_bytes: float = 0.0) -> CostModel:
        """The same stages with activation recomputation (`paci train --recompute`): a backward
        first re-runs the forward (B and I cost F more; W is unchanged), and an in-flight
        micro-batch holds only its input: the previous stage's message, or `first_input_bytes`
        (the token ids) on stage 0. Counted between actions, like every byte here: the recomputed
        activations of the one micro-batch inside a backward come on top while it runs."""
        inputs = (float(first_input_bytes), *self.message_bytes[:-1]) if self.message_bytes else ()
        return replace(self, backward=tuple(b + f for b, f in zip(self.backward, self.forward)),
                       activation_bytes=inputs)

    def transfer(self, stage: int) -> float:
        """Time for stage `stage`'s output activation (or the gradient of it) to cross one link."""
        return self.latency + self.message_bytes[stage] / self.bandwidth

    @classmethod
    def from_trace(cls, trace: Trace) -> CostModel:
        """Per-stage mean time of each op in a (measured) trace, to predict the same schedule with.

        The link latency is the median delay from a sender's end to the receiver's start over the
        messages the receiver was blocked on (0 when the trace records no waits); evaluation
        forwards are charged the forward time.
        """
        means: dict[str, list[float]] = {op: [] for op in "FBIWU"}
        for stage in range(trace.num_stages):
            cols = trace.columns(stage)
            durations = cols.end - cols.start
            for op in "FBIWU":
                picked = durations[cols.op == OP_CODE[Op(op)]]
                means[op].append(float(picked.mean()) if picked.size else 0.0)
        backward = [b if b else i + w for b, i, w in zip(means["B"], means["I"], means["W"])]
        weight = [w if w else b / 2 for w, b in zip(means["W"], backward)]
        costs = cls.per_stage(trace.num_stages, means["F"], backward, weight, means["U"],
                              latency=_link_latency(trace))
        return replace(costs, time_unit=trace.time_unit)


def parse_costs(text: str, num_stages: int, stages_per_rank: int = 1) -> CostModel:
    """`F,B[,W]` (uniform over stages) from the command line, e.g. "1,2" or "1,2,1": the times of one
    stage of a one-stage-per-rank split. Where each rank holds v stages (interleaved), the same model
    is cut v times finer: each stage takes 1/v of those times and of the default bytes."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or any(v <= 0 or math.isnan(v) or math.isinf(v) for v in values):
        raise ValueError(f"--costs expects F,B or F,B,W as positive numbers (e.g. 1,2 or 1,2,1), got {text!r}")
    forward, backward, *rest = [value / stages_per_rank for value in values]
    v = stages_per_rank
    return CostModel.per_stage(num_stages, forward, backward, rest[0] if rest else None, static_bytes=4.0 / v,
                               activation_bytes=1.0 / v, weight_bytes=1.0 / v)


def _link_latency(trace: Trace) -> float:
    """Median (receiver start - sender end) over messages the receiver was already waiting for
    when the sender finished (so the delay is the link's, not the receiver's own backlog)."""
    ends: dict[tuple[str, int, int], float] = {}  # (kind, sending stage, mb) -> end time
    columns = [trace.columns(s) for s in range(trace.num_stages)]
    for stage, cols in enumerate(columns):
        for code, mb, end in zip(cols.op.tolist(), cols.microbatch.tolist(), cols.end.tolist()):
            if code == OP_CODE[Op.F]:
                ends[("F", stage, mb)] = end
            elif code in (OP_CODE[Op.B], OP_CODE[Op.I]):
                ends[("B", stage, mb)] = end
    delays = []
    for stage, cols in enumerate(columns):
        waits = trace.stages[stage].wait
        if len(waits) != len(cols.op):
            continue
        for code, mb, start, wait in zip(cols.op.tolist(), cols.microbatch.tolist(), cols.start.tolist(), waits):
            kind, sender = ("F", stage - 1) if code == OP_CODE[Op.F] else ("B", stage + 1)
            sent = ends.get((kind, sender, mb)) if code in (OP_CODE[Op.F], OP_CODE[Op.B], OP_CODE[Op.I]) else None
            if sent is not None and start - wait <= sent:
                delays.append(start - sent)
    return max(0.0, statistics.median(delays)) if delays else 0.0
