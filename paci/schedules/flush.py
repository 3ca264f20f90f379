"""Synchronous schedules: every step ends with a flush, so no backward crosses an update (Δ ≡ 0).

Pictures: P = 3 stages, m = 4 micro-batches, one step, costs F = 1, B = 2 (W = 1 for zb-h1),
drawn by `paci simulate --schedule NAME --stages 3 --microbatches 4 --steps 1 --timeline x.txt`;
two characters per time unit, `.` idle, `-` the rest of a block, U the optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterator

from paci.ir import Action, Op, Schedule, WeightPolicy
from paci.schedules.common import check_sizes, one_f_one_b, with_updates


def _flush_accumulation(name: str, num_microbatches: int, accumulation: int | None) -> int:
    if accumulation not in (None, num_microbatches):
        raise ValueError(f"{name} steps once per {num_microbatches} micro-batches; drop --accum "
                         f"or set it to --microbatches ({num_microbatches})")
    return num_microbatches


def gpipe(num_stages: int, num_microbatches: int, num_steps: int = 1, accumulation: int | None = None) -> Schedule:
    """GPipe: all forwards of a step, then all backwards, then U. Holds m micro-batches in flight.

    ::

        stage 0 |F0F1F2F3............B0--B1--B2--B3-U|
        stage 1 |..F0F1F2F3......B0--B1--B2--B3-U....|
        stage 2 |....F0F1F2F3B0--B1--B2--B3-U........|
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    m = _flush_accumulation("gpipe", num_microbatches, accumulation)

    def stream(stage: int) -> Iterator[Action]:
        for step in range(num_steps):
            first = step * m
            yield from (Action(stage, Op.F, first + i) for i in range(m))
            yield from (Action(stage, Op.B, first + i) for i in range(m))
            yield Action(stage, Op.U)

    return Schedule("gpipe", num_stages, m * num_steps, m, WeightPolicy.NONE, stream,
                    (("microbatches", m), ("steps", num_steps)))


def one_f_one_b_flush(num_stages: int, num_microbatches: int, num_steps: int = 1,
                      accumulation: int | None = None) -> Schedule:
    """1F1B with a flush: per step, P-1-s warm-up F, then F/B alternation, drain B, then U.

    The flush bubble (P-1)/(m+P-1) is not written anywhere: it emerges from the dependencies.
    m < P is allowed (the warm-up shrinks to m). Stage s holds at most min(P-s, m) micro-batches.

    ::

        stage 0 |F0F1F2........B0--F3B1--..B2--..B3-U|
        stage 1 |..F0F1....B0--F2B1--F3B2--..B3-U....|
        stage 2 |....F0B0--F1B1--F2B2--F3B3-U........|
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    m = _flush_accumulation("1f1b", num_microbatches, accumulation)

    def stream(stage: int) -> Iterator[Action]:
        blocks = (a for step in range(num_steps) for a in one_f_one_b(stage, num_stages, step * m, m))
        return with_updates(blocks, m)

    return Schedule("1f1b", num_stages, m * num_steps, m, WeightPolicy.NONE, stream,
                    (("microbatches", m), ("steps", num_steps)))


def zb_h1(num_stages: int, num_microbatches: int, num_steps: int = 1, accumulation: int | None = None) -> Schedule:
    """Zero Bubble H1 (Qi et al., 2023): 1F1B with the backward split into I (input grad) and W.

    I stays on the critical path; stage s postpones its first s weight-grads W and uses them to
    fill the cool-down bubble. Every stage then holds at most P micro-batches (counting one whose
    W is pending), the same peak as 1F1B's first stage. Bubble (P-1)(F+I-W) vs 1F1B's (P-1)(F+B).

    ::

        stage 0 |F0F1F2....I0W0F3I1W1I2W2I3W3U|
        stage 1 |..F0F1..I0F2I1W0F3I2W1I3W2W3U|
        stage 2 |....F0I0F1I1F2I2W0F3I3W1W2W3U|
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    m = _flush_accumulation("zb-h1", num_microbatches, accumulation)

    def stream(stage: int) -> Iterator[Action]:
        for step in range(num_steps):
            yield from _zb_h1_block(stage, num_stages, step * m, m)
            yield Action(stage, Op.U)

    return Schedule("zb-h1", num_stages, m * num_steps, m, WeightPolicy.NONE, stream,
                    (("microbatches", m), ("steps", num_steps)))


def _zb_h1_block(stage: int, num_stages: int, first: int, count: int) -> Iterator[Action]:
    warmup = min(num_stages - 1 - stage, count)
    deferred = stage  # W's held back to fill the cool-down
    next_w = 0
    for i in range(warmup):  # pattern: F F F
        yield Action(stage, Op.F, first + i)
    for i in range(count - warmup):  # pattern: F I [W]
        yield Action(stage, Op.F, first + warmup + i)
        yield Action(stage, Op.I, first + i)
        if i >= deferred:
            yield Action(stage, Op.W, first + next_w)
            next_w += 1
    for i in range(count - warmup, count):  # pattern: I W
        yield Action(stage, Op.I, first + i)
        yield Action(stage, Op.W, first + next_w)
        next_w += 1
    for j in range(next_w, count):  # pattern: W W W
        yield Action(stage, Op.W, first + j)
