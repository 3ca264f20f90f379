"""Memory-aware stage partitioning: an exact split of the model's units into contiguous stages.

The PACI paper's appendix (arXiv 2606.07881, §4.2 of its appendix) profiles, per partitionable unit l, a
time t_l, static bytes s_l (parameters + gradients + optimizer state) and activation bytes a_l
(what autograd saves for one micro-batch; `paci.profiler` measures all three), then cuts the
unit list into P contiguous stages that

    minimise max_j T_j   subject to   M_j = Σ s_l + inflight_j·Σ a_l + copies_j·Σ w_l ≤ budget,

where w_l is the bytes of one weight copy. When no split fits it minimises (max overshoot,
max T_j) lexicographically. Differences from the paper, on purpose:

* T_j sums forward **and** backward time (the paper uses forward only). In the steady state of a
  1F1B/PACI pipe every stage does one F and one B per period, so the slowest stage's F + B is the
  period; the backward/forward ratio differs between units (an embedding's backward is a scatter,
  a Linear's is two matmuls), so forward time alone misranks stages.
* inflight_j and copies_j are not a closed form: they are read from the simulator's accounting of
  the same schedule (`stage_memory_model`), so GPipe (m), 1F1B/PACI (P−j), PipeDream (P−j weight
  copies) and 2BW (≤ 2 copies) all come from the one place that defines the schedules.
* The last unit is profiled together with the loss, because the last stage computes it.

Solved exactly by three dynamic programs over suffixes, O(P·L²) each: the first finds the least
achievable max overshoot O* (0 when a split fits), the second the least max time T* among splits
whose every overshoot is ≤ O*, the third, among splits within O* and T*, the most even one
(least Σ T_j²), so stages that are not the bottleneck are not packed up to it and an error in
one unit's profile moves the real bottleneck less. Remaining ties go to the lexicographically
smallest list of stage boundaries, so results are deterministic.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

from paci import schedules
from paci.checks import format_bytes
from paci.schedules.common import check_sizes
from paci.sim import CostModel, simulate

if TYPE_CHECKING:
    from paci.profiler import UnitProfile

logger = logging.getLogger(__name__)

SPLIT_SPECS = ("profile", "uniform")  # besides an explicit "0:5,5:9,..." list


# ----------------------------------------------------------------------------------------------
# The memory model, from the simulator's accounting of the schedule


def stage_memory_model(schedule_name: str, num_stages: int, microbatches: int,
                       accum: int | None = None, chunks: int | None = None) -> tuple[list[int], list[int]]:
    """(peak in-flight micro-batches, peak stashed weight copies) per stage, as the simulator counts them.

    Both follow from each stage's fixed action order alone, so unit costs suffice; the run is
    long enough (at least 3 steps and 4·P micro-batches) for the asynchronous schedules to pass
    their warm-up and reach the steady state.
    """
    check_sizes(num_stages, microbatches, 1)  # before dividing by M
    steps = max(3, math.ceil(4 * num_stages / microbatches))
    schedule = schedules.build(schedule_name, num_stages, microbatches, steps, accum, chunks=chunks)
    per_stage = simulate(schedule, CostModel.per_stage(schedule.num_stages)).metrics.per_stage
    return [m.peak_inflight for m in per_stage], [m.weight_copies for m in per_stage]


def predicted_efficiency(forward: Sequence[float], backward: Sequence[float], schedule_name: str,
                         microbatches: int, accum: int | None = None, steps: int = 8) -> float:
    """busy / (P · time) of every stage over its steady window (1 − the simulator's steady bubble).

    The schedule is simulated with the split's per-stage forward and backward times, so both the
    schedule's own bubble (a flush) and the imbalance between stages lower it; a perfectly balanced
    PACI pipe scores 1.
    """
    num_stages = len(forward)
    schedule = schedules.build(schedule_name, num_stages, microbatches, steps, accum)
    metrics = simulate(schedule, CostModel.per_stage(num_stages, forward, backward)).metrics
    bubble = metrics.steady_bubble_fraction
    return 1.0 - (metrics.bubble_fraction if bubble is None else bubble)


# ----------------------------------------------------------------------------------------------
# The exact partitioner


@dataclass(frozen=True)
class UnitCosts:
    """What the partitioner needs per unit: time (s), static, activation (per micro-batch), weight bytes."""

    time: tuple[float, ...]
    static: tuple[float, ...]
    activation: tuple[float, ...]
    weight: tuple[float, ...]

    def __post_init__(self) -> None:
        columns = (self.time, self.static, self.activation, self.weight)
        if not self.time or len({len(c) for c in columns}) != 1:
            raise ValueError(f"unit costs need one value per unit in every column, got lengths "
                             f"{[len(c) for c in columns]}")
        if any(not v >= 0 or math.isinf(v) for c in columns for v in c):
            raise ValueError("unit times and bytes must be finite and >= 0")

    @classmethod
    def of(cls, units: UnitCosts | Sequence[UnitProfile]) -> UnitCosts:
        if isinstance(units, UnitCosts):
            return units
        return cls(tuple(u.time_s for u in units), tuple(float(u.static_bytes) for u in units),
                   tuple(float(u.activation_bytes) for u in units), tuple(float(u.param_bytes) for u in units))

    def __len__(self) -> int:
        return len(self.time)


@dataclass(frozen=True)
class Split:
    """Contiguous [start, stop) unit ranges, one per stage, with each stage's time and peak bytes."""

    ranges: tuple[tuple[int, int], ...]
    stage_time: tuple[float, ...]  # Σ (forward + backward) seconds of the stage's units
    stage_bytes: tuple[float, ...]  # M_j = static + inflight_j·activation + copies_j·weight
    inflight: tuple[int, ...]
    copies: tuple[int, ...]
    budget: float | None

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    @property
    def bottleneck(self) -> int:
        """The slowest stage (the first of equals)."""
        return max(range(self.num_stages), key=lambda j: (self.stage_time[j], -j))

    @property
    def max_time(self) -> float:
        return self.stage_time[self.bottleneck]

    @property
    def overshoot(self) -> tuple[float, ...]:
        """Bytes by which each stage exceeds the budget (0 where it fits, or without a budget)."""
        return tuple(0.0 if self.budget is None else max(0.0, m - self.budget) for m in self.stage_bytes)

    @property
    def overshoot_stage(self) -> int | None:
        """The stage that exceeds the budget most, None when every stage fits."""
        worst = max(range(self.num_stages), key=lambda j: (self.overshoot[j], -j))
        return worst if self.overshoot[worst] > 0 else None

    @property
    def feasible(self) -> bool:
        return self.overshoot_stage is None

    @property
    def spec(self) -> str:
        return split_spec(self.ranges)

    def as_dict(self) -> dict:
        worst = self.overshoot_stage
        return {"split": self.spec, "ranges": [list(r) for r in self.ranges],
                "stage_time_s": list(self.stage_time), "stage_bytes": list(self.stage_bytes),
                "inflight": list(self.inflight), "copies": list(self.copies), "budget_bytes": self.budget,
                "bottleneck": self.bottleneck, "max_stage_time_s": self.max_time, "feasible": self.feasible,
                "max_overshoot_bytes": 0.0 if worst is None else self.overshoot[worst], "overshoot_stage": worst}


class _StageModel:
    """Time, bytes and overshoot of "units [i, e) as stage j", from prefix sums."""

    def __init__(self, costs: UnitCosts, inflight: Sequence[int], copies: Sequence[int], budget: float | None):
        self.T, self.S, self.A, self.W = (list(accumulate(c, initial=0.0)) for c in
                                          (costs.time, costs.static, costs.activation, costs.weight))
        self.inflight, self.copies, self.budget = inflight, copies, budget

    def time(self, j: int, i: int, e: int) -> float:
        return self.T[e] - self.T[i]

    def bytes(self, j: int, i: int, e: int) -> float:
        return ((self.S[e] - self.S[i]) + self.inflight[j] * (self.A[e] - self.A[i])
                + self.copies[j] * (self.W[e] - self.W[i]))

    def overshoot(self, j: int, i: int, e: int) -> float:
        return 0.0 if self.budget is None else max(0.0, self.bytes(j, i, e) - self.budget)


StageCost = Callable[[int, int, int], float]  # (stage j, start i, stop e) -> value
Allowed = Callable[[int, int, int], bool]


def _solve(num_units: int, num_stages: int, cost: StageCost, allowed: Allowed,
           combine: Callable[[float, float], float], empty: float) -> list[list[float]]:
    """best[j][i]: over splits of units [i, L) into stages j..P-1 (each non-empty and allowed), the
    least value of combine(stage j's cost, the rest's); `combine` is max or +, `empty` its identity;
    inf where there is no such split. O(P·L²) calls of `cost`."""
    L, P = num_units, num_stages
    best = [[math.inf] * (L + 1) for _ in range(P + 1)]
    best[P][L] = empty  # no units left for no stages
    for j in range(P - 1, -1, -1):
        for i in range(L):
            best[j][i] = min((combine(cost(j, i, e), best[j + 1][e]) for e in range(i + 1, L + 1)
                              if best[j + 1][e] < math.inf and allowed(j, i, e)), default=math.inf)
    return best


def _first_least_sum(num_units: int, num_stages: int, cost: StageCost, allowed: Allowed,
                     best: list[list[float]]) -> list[tuple[int, int]]:
    """Among the splits of least summed cost, the one with the lexicographically smallest boundaries:
    stage by stage, the earliest stop that stays on an optimal path (every suffix of an optimal sum
    is optimal; the comparison repeats `_solve`'s float expressions, so equality is exact)."""
    ranges, i = [], 0
    for j in range(num_stages):
        e = next(e for e in range(i + 1, num_units + 1) if best[j + 1][e] < math.inf and allowed(j, i, e)
                 and cost(j, i, e) + best[j + 1][e] == best[j][i])
        ranges.append((i, e))
        i = e
    return ranges


def partition(units: UnitCosts | Sequence[UnitProfile], num_stages: int, inflight: Sequence[int],
              copies: Sequence[int], budget: float | None = None, warn: bool = True) -> Split:
    """The contiguous split into `num_stages` stages with the smallest slowest-stage time whose
    every stage fits `budget` bytes; if none fits, the split minimising (max overshoot, max time).

    Among equally fast splits it takes the most even one (least Σ stage time², so a stage that
    is not the bottleneck is not packed up to it, and profile noise hurts less), then the one with
    the lexicographically smallest boundaries. `inflight[j]` / `copies[j]` are stage j's peak
    in-flight micro-batches and stashed weight copies (`stage_memory_model`). An infeasible budget
    is logged as a warning naming the stage (unless not `warn`: a caller that reports it itself).
    """
    costs = UnitCosts.of(units)
    check_stage_count(len(costs), num_stages)
    _check_memory_model(num_stages, inflight, copies, budget)
    model = _StageModel(costs, inflight, copies, budget)
    L, P = len(costs), num_stages
    cap = 0.0
    if budget is not None:  # pass 1: the least achievable max overshoot (0 when a split fits)
        cap = _solve(L, P, model.overshoot, lambda j, i, e: True, max, -math.inf)[0][0]

    def fits(j: int, i: int, e: int) -> bool:
        return model.overshoot(j, i, e) <= cap

    # pass 2: the least slowest-stage time within that overshoot
    slowest = _solve(L, P, model.time, fits, max, -math.inf)[0][0]

    def allowed(j: int, i: int, e: int) -> bool:
        return fits(j, i, e) and model.time(j, i, e) <= slowest

    def squared(j: int, i: int, e: int) -> float:
        return model.time(j, i, e) ** 2

    # pass 3: the most even of those splits
    best = _solve(L, P, squared, allowed, operator.add, 0.0)
    split = evaluate_split(costs, _first_least_sum(L, P, squared, allowed, best), inflight, copies, budget)
    if warn and not split.feasible:
        worst = split.overshoot_stage
        logger.warning("no %d-stage split fits %s per stage: the best one overshoots by %s on stage %d, so it "
                       "needs %s per stage; raise the budget to that, use more stages or a smaller micro-batch",
                       P, format_bytes(budget), format_bytes(split.overshoot[worst]), worst,
                       format_bytes(split.stage_bytes[worst]))
    return split


def evaluate_split(units: UnitCosts | Sequence[UnitProfile], ranges: Sequence[tuple[int, int]],
                   inflight: Sequence[int], copies: Sequence[int], budget: float | None = None) -> Split:
    """Per-stage time and bytes of a given split (checked to be contiguous and complete)."""
    costs = UnitCosts.of(units)
    ranges = tuple((int(a), int(b)) for a, b in ranges)
    _check_ranges(ranges, len(costs), len(ranges))
    _check_memory_model(len(ranges), inflight, copies, budget)
    model = _StageModel(costs, inflight, copies, budget)
    return Split(ranges, tuple(model.time(j, a, b) for j, (a, b) in enumerate(ranges)),
                 tuple(model.bytes(j, a, b) for j, (a, b) in enumerate(ranges)),
                 tuple(inflight), tuple(copies), None if budget is None else float(budget))


def stage_sums(values: Sequence[float], ranges: Sequence[tuple[int, int]]) -> list[float]:
    """Σ values[a:b] per stage, e.g. per-stage forward seconds for the simulator."""
    return [float(sum(values[a:b])) for a, b in ranges]


# ----------------------------------------------------------------------------------------------
# Splits from the command line, and the entry point `paci train` calls


def split_spec(ranges: Sequence[tuple[int, int]]) -> str:
    """A split as `--split` takes it: "0:3,3:6,6:10"."""
    return ",".join(f"{a}:{b}" for a, b in ranges)


def uniform_split(num_units: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges of units whose sizes differ by at most one (earlier stages get the extra)."""
    check_stage_count(num_units, num_stages)
    base, extra = divmod(num_units, num_stages)
    bounds = list(accumulate((base + (s < extra) for s in range(num_stages)), initial=0))
    return list(zip(bounds[:-1], bounds[1:]))


def parse_split(text: str, num_units: int, num_stages: int) -> list[tuple[int, int]]:
    """`--split 0:5,5:9,9:12` -> [(0, 5), (5, 9), (9, 12)]: contiguous, covering every unit, one range per stage."""
    check_stage_count(num_units, num_stages)
    example = split_spec(uniform_split(num_units, num_stages))
    ranges = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if match is None:
            raise ValueError(f"--split {text!r}: {part.strip()!r} is not START:STOP; write one range per stage, "
                             f"e.g. --split {example}, or use --split profile or --split uniform")
        ranges.append((int(match[1]), int(match[2])))
    _check_ranges(tuple(ranges), num_units, num_stages, text, example)
    return ranges


def _check_ranges(ranges: tuple[tuple[int, int], ...], num_units: int, num_stages: int,
                  text: str | None = None, example: str | None = None) -> None:
    what = f"--split {text!r}" if text is not None else f"split {list(ranges)}"
    hint = f"; e.g. --split {example}" if example else ""
    if len(ranges) != num_stages:
        raise ValueError(f"{what} has {len(ranges)} ranges for {num_stages} stages: give one per stage{hint}")
    expected = 0
    for j, (a, b) in enumerate(ranges):
        if a != expected:
            raise ValueError(f"{what}: stage {j} starts at unit {a} but must start at {expected}; ranges are "
                             f"contiguous [start, stop) from 0{hint}")
        if b <= a:
            raise ValueError(f"{what}: stage {j} range {a}:{b} is empty; each stage needs stop > start{hint}")
        expected = b
    if expected != num_units:
        raise ValueError(f"{what} ends at unit {expected} but the model has {num_units} units (0..{num_units - 1}); "
                         f"the last range must stop at {num_units}{hint}")


def check_split(spec: str, num_units: int, num_stages: int) -> None:
    """Refuse what `choose_split` would refuse, without measuring anything: a malformed or
    mismatched explicit split, or more stages than units."""
    if spec in SPLIT_SPECS:
        check_stage_count(num_units, num_stages)
    else:
        parse_split(spec, num_units, num_stages)


def check_stage_count(num_units: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"--stages must be >= 1, got {num_stages}")
    if num_stages > num_units:
        raise ValueError(f"{num_stages} stages but the model has only {num_units} units; use --stages <= "
                         f"{num_units} or a preset with more layers")


def _check_memory_model(num_stages: int, inflight: Sequence[int], copies: Sequence[int],
                        budget: float | None) -> None:
    if len(inflight) != num_stages or len(copies) != num_stages:
        raise ValueError(f"need one in-flight count and one copy count per stage ({num_stages}), got "
                         f"{len(inflight)} and {len(copies)}")
    check_budget(budget)


def check_budget(budget: float | None) -> None:
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"the memory budget per stage must be a positive number of bytes, got {budget!r}; "
                         "e.g. --memory-per-stage 24GiB")
