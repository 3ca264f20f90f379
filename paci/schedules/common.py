"""Building blocks shared by the schedule builders: action streams and the U-insertion pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from paci.checks import check_integer
from paci.ir import WEIGHT_GRAD_OPS, Action, Op


def one_f_one_b(stage: int, num_stages: int, first: int, count: int) -> Iterator[Action]:
    """1F1B order for micro-batches first..first+count-1 on `stage`, warm-up through drain.

    warm-up: w = min(P-1-s, count) forwards; steady: F(w+i) B(i); drain: the remaining B.
    Stage s therefore holds at most w+1 = P-s micro-batches in flight.
    """
    warmup = min(num_stages - 1 - stage, count)
    for i in range(warmup):  # pattern: F F F
        yield Action(stage, Op.F, first + i)
    for i in range(count - warmup):  # pattern: F B F B
        yield Action(stage, Op.F, first + warmup + i)
        yield Action(stage, Op.B, first + i)
    for i in range(count - warmup, count):  # pattern: B B B
        yield Action(stage, Op.B, first + i)


def with_updates(actions: Iterable[Action], accumulation: int) -> Iterator[Action]:
    """Insert U right after every `accumulation`-th weight-backward (B or W) of a stage (counted per
    stage: a rank's stream may hold several)."""
    done: dict[int, int] = {}
    for action in actions:
        yield action
        if action.op in WEIGHT_GRAD_OPS:
            done[action.stage] = done.get(action.stage, 0) + 1
            if done[action.stage] == accumulation:
                yield Action(action.stage, Op.U)
                done[action.stage] = 0


def check_sizes(num_stages: int, num_microbatches: int, num_steps: int) -> None:
    """Raise ValueError with the fix when a size is out of range."""
    for value, what in ((num_stages, "stages"), (num_microbatches, "micro-batches"), (num_steps, "steps")):
        check_integer(f"number of {what}", value)
