"""Asynchronous schedules: one continuous 1F1B stream with no flush; stages step on their own.

All four share the same action order (warm-up once, then F/B forever, U after every K-th local
backward) and differ only in K and in the weight policy:

    async-1f1b  K = 1   live      Δ ≤ P-1-s
    pipedream   K = 1   stashed   one weight version per in-flight micro-batch (P-1-s copies at stage s)
    paci        K       live      Δ ≤ ⌈(P-1-s)/K⌉, no copies
    2bw         K ≥ P-1 stashed   at most two weight versions

Stage s runs P-1-s backwards between F(mb) and B(mb), so at most ⌈(P-1-s)/K⌉ updates.
Step k of every stage accumulates micro-batches kK … (k+1)K-1: the same data per step as
1F1B-flush with m = K.

Pictures: P = 3, costs F = 1, B = 2, six micro-batches, drawn by `paci simulate --timeline x.txt`
(two characters per time unit). A lowercase `b` is a backward whose micro-batch crossed updates
since its forward, one `'` per update (Δ).
"""

from __future__ import annotations

from paci.ir import Schedule, WeightPolicy
from paci.schedules.common import check_sizes, one_f_one_b, with_updates


def _no_flush(name: str, num_stages: int, num_microbatches: int, num_steps: int, accumulation: int,
              policy: WeightPolicy) -> Schedule:
    total = num_microbatches * num_steps
    if accumulation < 1:
        raise ValueError(f"{name}: accumulation K must be >= 1, got {accumulation}")
    if total % accumulation:
        raise ValueError(f"{name}: K={accumulation} must divide the {total} micro-batches "
                         f"({num_steps} steps x {num_microbatches}); choose K dividing {total}")

    def stream(stage: int):
        return with_updates(one_f_one_b(stage, num_stages, 0, total), accumulation)

    return Schedule(name, num_stages, total, accumulation, policy, stream,
                    (("microbatches", num_microbatches), ("steps", num_steps), ("accum", accumulation)))


def paci(num_stages: int, num_microbatches: int, num_steps: int = 1, accumulation: int | None = None) -> Schedule:
    """PACI(K): 1F1B without the drain; U after every K-th local backward; live weights.

    ::

        K = 3:  stage 0 |F0F1F2........B0--F3B1--F4B2-UF5b3'-..b4'-..B5-U|
                stage 1 |..F0F1....B0--F2B1--F3B2-UF4b3'-F5B4--..B5-U....|
                stage 2 |....F0B0--F1B1--F2B2-UF3B3--F4B4--F5B5-U........|
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    k = num_microbatches if accumulation is None else accumulation
    return _no_flush("paci", num_stages, num_microbatches, num_steps, k, WeightPolicy.LIVE)


def async_1f1b(num_stages: int, num_microbatches: int, num_steps: int = 1,
               accumulation: int | None = None) -> Schedule:
    """Naive async 1F1B = PACI(K=1): a step after every backward, Δ up to P-1-s.

    ::

        stage 0 |F0F1F2........B0-UF3b1'UF4b2''F5b3''U.b4''U.b5''U|
        stage 1 |..F0F1....B0-UF2b1'UF3b2'UF4b3'UF5b4'U..b5'U....|
        stage 2 |....F0B0-UF1B1-UF2B2-UF3B3-UF4B4-UF5B5-U........|
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    if accumulation not in (None, 1):
        raise ValueError("async-1f1b steps after every backward (K = 1); for K > 1 use --schedule paci")
    return _no_flush("async-1f1b", num_stages, num_microbatches, num_steps, 1, WeightPolicy.LIVE)


def pipedream(num_stages: int, num_microbatches: int, num_steps: int = 1,
              accumulation: int | None = None) -> Schedule:
    """PipeDream (Narayanan et al., 2019): async 1F1B, K = 1, backward on stashed weights.

    Same order (and picture) as async-1f1b, but every backward reads the weights its forward
    used: stage s keeps one weight version per in-flight micro-batch (P-s; all but the live one are
    copies, made on update: P-1-s), and Δ has no effect.
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    if accumulation not in (None, 1):
        raise ValueError("pipedream steps after every backward (K = 1); for K > 1 use --schedule 2bw")
    return _no_flush("pipedream", num_stages, num_microbatches, num_steps, 1, WeightPolicy.STASHED)


def two_bw(num_stages: int, num_microbatches: int, num_steps: int = 1, accumulation: int | None = None) -> Schedule:
    """PipeDream-2BW (Narayanan et al., 2021): PACI's order with stashed weights, K ≥ P-1.

    Same order (and picture) as paci. With K ≥ P-1 a micro-batch crosses at most one update, so
    at most two weight versions are alive: one copy.
    """
    check_sizes(num_stages, num_microbatches, num_steps)
    k = num_microbatches if accumulation is None else accumulation
    if k < num_stages - 1:
        raise ValueError(f"2bw needs K >= P-1 = {num_stages - 1} to keep at most two weight versions "
                         f"(got K={k}); raise --accum/--microbatches or use pipedream")
    return _no_flush("2bw", num_stages, num_microbatches, num_steps, k, WeightPolicy.STASHED)
