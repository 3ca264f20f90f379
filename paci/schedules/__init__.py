"""Schedule builders, registered by name. Each is a pure function of integers returning a Schedule.

Every builder has the signature
``builder(num_stages, num_microbatches, num_steps=1, accumulation=None) -> Schedule``:
`num_microbatches` (M) is micro-batches per mini-batch, `num_steps` (S) mini-batches, so every
schedule runs the same M*S micro-batches; `accumulation` (K) is how many backwards a stage sums
before its optimizer step (flush schedules: M; paci and 2bw: default M; async-1f1b, pipedream: 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from paci.ir import Schedule
from paci.schedules.asynchronous import async_1f1b, paci, pipedream, two_bw
from paci.schedules.flush import gpipe, one_f_one_b_flush, zb_h1


class Entry(NamedTuple):
    builder: Callable[..., Schedule]
    summary: str


REGISTRY: dict[str, Entry] = {
    "gpipe": Entry(gpipe, "all F, then all B, flush each step; m micro-batches in flight; Δ = 0"),
    "1f1b": Entry(one_f_one_b_flush, "1F1B with a flush each step; bubble (P-1)/(m+P-1); Δ = 0"),
    "zb-h1": Entry(zb_h1, "Zero Bubble H1: backward split into I and W, W fills the flush; Δ = 0"),
    "async-1f1b": Entry(async_1f1b, "no flush, step after every backward, live weights; Δ ≤ P-1-s"),
    "pipedream": Entry(pipedream, "no flush, step after every backward, stashed weights (P-s copies)"),
    "2bw": Entry(two_bw, "no flush, step every K ≥ P-1 backwards, stashed weights (≤ 2 versions)"),
    "paci": Entry(paci, "no flush, step every K backwards, live weights; Δ ≤ ⌈(P-1-s)/K⌉, no copies"),
}


def build(name: str, num_stages: int, num_microbatches: int, num_steps: int = 1,
          accumulation: int | None = None) -> Schedule:
    """Build a registered schedule; ValueError with the valid names for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name].builder(num_stages, num_microbatches, num_steps, accumulation)


__all__ = ["REGISTRY", "build"]
