"""Interleaved 1F1B (Narayanan et al., SC'21, "virtual pipeline stages"): each of the P ranks holds
v non-adjacent stages (chunks) of a v·P-stage model, rank r the stages r, r + P, ..., r + (v-1)P,
so a micro-batch loops v times through the ranks. The fill and drain are v times shorter:
bubble (P-1)/(v·m + P-1) against 1F1B's (P-1)/(m + P-1) for the same model on the same ranks,
paid for with v times the point-to-point messages and more activations on the first ranks.

Each rank runs the 1F1B pattern over its v·m (stage, micro-batch) forwards and backwards, with the
order Megatron and torch.distributed.pipelining's ScheduleInterleaved1F1B use: the micro-batches
go in rounds of g = m / max(1, m // P) (P when m is a multiple of P); forwards go through the
rank's chunks round by round (g forwards of chunk 0, g of chunk 1, ..., then the next round),
backwards through the chunks in reverse, and rank r runs (v-1)·g + 2(P-1-r) forwards before its
first backward. m must be a multiple of the number of rounds (as torch requires). Every stage
steps its optimizer once its m backwards of the step are done; the step ends in a flush (Δ = 0).

Picture: P = 2 ranks, v = 2 (stages 0..3; rank 0 holds stages 0 and 2, rank 1 stages 1 and 3),
m = 4, costs F = 1, B = 2 per stage (a one-stage-per-rank split's 2, 4, cut in two), drawn by
`paci simulate --schedule interleaved-1f1b --stages 2 --chunks 2 --microbatches 4 --steps 1
--costs 2,4 --timeline x.txt`; bubble 1/9 against 1F1B's 1/5:

::

    stage 0 |F0F1....F2......F3......B0--..B1--............B2--B3-U|
    stage 1 |..F0F1............F2B0--F3B1--............B2--B3-U....|
    stage 2 |....F0F1....B0--..B1--F2....F3......B2--..B3-U........|
    stage 3 |......F0B0--F1B1--............F2B2--F3B3-U............|
"""

from __future__ import annotations

from collections.abc import Iterator

from paci.checks import check_integer
from paci.ir import Action, Op, Schedule, WeightPolicy
from paci.schedules.common import check_sizes, with_updates


def interleaved_1f1b(num_ranks: int, num_microbatches: int, num_steps: int = 1, accumulation: int | None = None,
                     chunks: int = 2) -> Schedule:
    """Interleaved 1F1B over `num_ranks` ranks with `chunks` stages each (v·P stages in all)."""
    check_sizes(num_ranks, num_microbatches, num_steps)
    check_integer("--chunks (stages per rank)", chunks)
    if accumulation not in (None, num_microbatches):
        raise ValueError(f"interleaved-1f1b steps once per {num_microbatches} micro-batches; drop --accum "
                         f"or set it to --microbatches ({num_microbatches})")
    rounds = max(1, num_microbatches // num_ranks)
    if num_microbatches % rounds:
        raise ValueError(f"interleaved-1f1b sends micro-batches through the ranks in {rounds} equal rounds "
                         f"(--microbatches // P): --microbatches {num_microbatches} must be a multiple of {rounds}, "
                         f"e.g. {rounds * (num_microbatches // rounds)}")
    m, v, p = num_microbatches, chunks, num_ranks

    def stream(rank: int) -> Iterator[Action]:
        blocks = (a for step in range(num_steps) for a in _interleaved_block(rank, p, v, m // rounds, step * m, m))
        return with_updates(blocks, m)

    return Schedule("interleaved-1f1b", v * p, m * num_steps, m, WeightPolicy.NONE, stream,
                    (("microbatches", m), ("steps", num_steps), ("chunks", v)), num_ranks=p)


def _interleaved_block(rank: int, p: int, v: int, group: int, first: int, m: int) -> Iterator[Action]:
    """One step of rank `rank`: its v·m forwards and v·m backwards in interleaved 1F1B order, the
    micro-batches in rounds of `group`."""
    total = v * m

    def nth(k: int, op: Op) -> Action:
        """The rank's k-th forward or backward: chunk by chunk for each round, backwards in reverse."""
        chunk = (k // group) % v
        if op is Op.B:
            chunk = v - 1 - chunk
        return Action(chunk * p + rank, op, first + (k // (group * v)) * group + k % group)

    warmup = min((v - 1) * group + 2 * (p - 1 - rank), total)
    for k in range(warmup):  # pattern: F F F
        yield nth(k, Op.F)
    for i in range(total - warmup):  # pattern: F B F B
        yield nth(warmup + i, Op.F)
        yield nth(i, Op.B)
    for i in range(total - warmup, total):  # pattern: B B B
        yield nth(i, Op.B)
