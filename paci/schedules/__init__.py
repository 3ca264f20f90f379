"""Schedule builders, registered by name. Each is a pure function of integers returning a Schedule.

Every builder has the signature
``builder(num_stages, num_microbatches, num_steps=1, accumulation=None) -> Schedule``:
`num_microbatches` (M) is micro-batches per mini-batch, `num_steps` (S) mini-batches, so every
schedule runs the same M*S micro-batches; `accumulation` (K) is how many backwards a stage sums
before its optimizer step (flush schedules: M; paci and 2bw: default M; async-1f1b, pipedream: 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

from paci.checks import check_integer
from paci.ir import Schedule, WeightPolicy, then, with_drains
from paci.schedules.asynchronous import async_1f1b, paci, pipedream, two_bw
from paci.schedules.flush import gpipe, one_f_one_b_flush, zb_h1
from paci.schedules.interleaved import interleaved_1f1b


class Entry(NamedTuple):
    builder: Callable[..., Schedule]
    summary: str
    chunked: bool = False  # True: a rank holds several stages (--chunks)


REGISTRY: dict[str, Entry] = {
    "gpipe": Entry(gpipe, "all F, then all B, flush each step; m micro-batches in flight; Δ = 0"),
    "1f1b": Entry(one_f_one_b_flush, "1F1B with a flush each step; bubble (P-1)/(m+P-1); Δ = 0"),
    "zb-h1": Entry(zb_h1, "Zero Bubble H1: backward split into I and W, W fills the flush; Δ = 0"),
    "interleaved-1f1b": Entry(interleaved_1f1b, "1F1B over v stages per rank (--chunks v, default 2): "
                                                "bubble (P-1)/(v·m+P-1); Δ = 0", chunked=True),
    "async-1f1b": Entry(async_1f1b, "no flush, step after every backward, live weights; Δ ≤ P-1-s"),
    "pipedream": Entry(pipedream, "no flush, step after every backward, stashed weights (P-1-s copies)"),
    "2bw": Entry(two_bw, "no flush, step every K ≥ P-1 backwards, stashed weights (≤ 1 copy)"),
    "paci": Entry(paci, "no flush, step every K backwards, live weights; Δ ≤ ⌈(P-1-s)/K⌉, no copies"),
}


ONE_STAGE_PER_RANK = [name for name, entry in REGISTRY.items() if not entry.chunked]


def lookup(name: str) -> Entry:
    """The registry's entry for schedule `name`, or the one error every entry point gives for a name
    it does not know."""
    if name not in REGISTRY:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_one_stage_per_rank(name: str, command: str) -> None:
    """ValueError naming `command` for a schedule whose ranks hold several stages, where `command`
    handles one stage per rank only."""
    if name in REGISTRY and REGISTRY[name].chunked:
        raise ValueError(f"{command} handles one stage per rank; {name} is not supported there yet (choose one of: "
                         f"{', '.join(ONE_STAGE_PER_RANK)})")


def build(name: str, num_stages: int, num_microbatches: int, num_steps: int = 1,
          accumulation: int | None = None, drain_every: int = 0, chunks: int | None = None,
          sync_steps: int = 0, drains: tuple[int, ...] = ()) -> Schedule:
    """Build a registered schedule; ValueError with the valid names for an unknown one.

    `num_stages` is the pipeline's depth P, its ranks; `chunks` (interleaved-1f1b only, default 2)
    the stages each rank holds. `drain_every` > 0 adds drain points (`ir.with_drains`) after every
    that many optimizer steps: the checkpoints of `paci train`. It must cover whole mini-batches
    (see `drain_interval`). `sync_steps` > 0 (an asynchronous schedule only) runs its first that
    many optimizer steps as 1F1B-flush with the same K, then the schedule (`ir.then`): a
    synchronous start. `drains`: optimizer steps after which to drain besides those (the points a
    prompt stop added; each must end a whole mini-batch).
    """
    if sync_steps:
        return _sync_start(name, num_stages, num_microbatches, num_steps, accumulation, drain_every, chunks, sync_steps,
                           drains)
    entry = lookup(name)
    builder = entry.builder
    if entry.chunked and chunks is not None:
        builder = functools.partial(builder, chunks=chunks)
    elif not entry.chunked and chunks not in (None, 1):
        raise ValueError(f"{name} runs one stage per rank; --chunks {chunks} needs --schedule interleaved-1f1b")
    schedule = builder(num_stages, num_microbatches, num_steps, accumulation)
    periodic = bool(drain_every) and drain_every < schedule.num_steps
    if periodic or drains:
        k = schedule.accumulation
        if periodic:
            drain_interval(schedule, num_microbatches, drain_every)  # checks it
        if any(d * k % num_microbatches for d in drains):
            raise ValueError(f"a drain point must end a whole mini-batch of {num_microbatches} micro-batches; "
                             f"got steps {sorted(drains)} at K = {k}")
        schedule = with_drains(lambda n: builder(num_stages, num_microbatches, n, accumulation), num_steps,
                               drain_every * k // num_microbatches if periodic else 0,  # in mini-batches
                               [d * k // num_microbatches for d in drains])
    return schedule


def _sync_start(name: str, num_stages: int, num_microbatches: int, num_steps: int, accumulation: int | None,
                drain_every: int, chunks: int | None, sync_steps: int, drains: tuple[int, ...]) -> Schedule:
    whole = build(name, num_stages, num_microbatches, num_steps, accumulation, chunks=chunks)
    k = whole.accumulation
    check_integer("--sync-steps", sync_steps, 0)
    if whole.weight_policy is WeightPolicy.NONE or REGISTRY[name].chunked:
        raise ValueError(f"--sync-steps starts an asynchronous schedule synchronously; {name} is synchronous already")
    if sync_steps >= whole.num_steps:
        raise ValueError(f"--sync-steps {sync_steps} must be below the run's {whole.num_steps} optimizer steps")
    if sync_steps * k % num_microbatches:
        raise ValueError(f"--sync-steps {sync_steps} must cover whole mini-batches: a multiple of "
                         f"{num_microbatches // math.gcd(num_microbatches, k)} steps at K = {k}, M = {num_microbatches}")
    if drain_every and sync_steps % drain_every:
        raise ValueError(f"--sync-steps {sync_steps} must be a multiple of --checkpoint-every {drain_every}, so that "
                         "the drain points stay where a checkpoint expects them")
    rest = num_steps - sync_steps * k // num_microbatches  # mini-batches
    first = one_f_one_b_flush(num_stages, k, sync_steps)
    second = build(name, num_stages, num_microbatches, rest, accumulation, drain_every, chunks,
                   drains=tuple(d - sync_steps for d in drains if d > sync_steps))  # the flush start drains anyway
    return then(first, second)


def drain_interval(schedule: Schedule, num_microbatches: int, every: int | None = None) -> int:
    """Optimizer steps between drain points: `every` checked, or by default 100 steps, or more where
    that is needed for one fill and drain, about (P-1) micro-batch times, to cost under 1% of the
    K x interval micro-batch times between two (tests/test_checkpoint.py checks it with the
    simulator). A flush schedule drains every step anyway: its drains cost nothing, only the
    writing does. Whole mini-batches always."""
    per_minibatch = num_microbatches // math.gcd(num_microbatches, schedule.accumulation)
    if every is None:
        every = 100
        if schedule.weight_policy is not WeightPolicy.NONE:
            every = max(every, math.ceil(100 * (schedule.num_stages - 1) / schedule.accumulation))
        return math.ceil(every / per_minibatch) * per_minibatch
    check_integer("--checkpoint-every", every, 0, "0: only at the end")
    if every % per_minibatch:
        raise ValueError(f"--checkpoint-every {every} must be a multiple of {per_minibatch}: a drain point falls "
                         f"between whole mini-batches of {num_microbatches} micro-batches "
                         f"(K = {schedule.accumulation})")
    return every


__all__ = ["ONE_STAGE_PER_RANK", "REGISTRY", "build", "check_one_stage_per_rank", "drain_interval"]
