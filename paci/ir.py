"""The schedule IR: ops, actions, schedules, their string/CSV codecs, and `validate`.

A schedule is pure data: for every stage, the ordered list of actions it performs, plus the
weight policy its backwards use. Every other part of paci (validator, simulator, executor,
timeline renderer) reads this one description; nothing re-derives a schedule.

String form follows torch.distributed.pipelining's action CSV: ``<stage><op><microbatch>``,
e.g. ``0F3`` (stage 0 forward of micro-batch 3), ``1B2`` (full backward), ``1I2`` / ``1W2``
(backward-input / backward-weight), plus ``0U`` for stage 0's optimizer step.

Async schedules run an unbounded stream of micro-batches, so a schedule holds a per-stage
*generator* rather than a list: 10**6 micro-batches never need a 10**6-element list.
"""

from __future__ import annotations

import csv
import enum
import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import NamedTuple


class Op(str, enum.Enum):
    """What an action does. Letters match torch.distributed.pipelining's action CSV."""

    F = "F"  # forward
    B = "B"  # full backward (input grad + weight grad)
    I = "I"  # backward, input grad only  # noqa: E741
    W = "W"  # backward, weight grad only
    U = "U"  # optimizer step + LR-scheduler step + zero grads (paci's addition)
    E = "E"  # forward-only evaluation of a held-out batch; keeps no state (see `with_evaluation`)
    # communication ops, only in the lowered form (see `lower`)
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE_OPS = (Op.F, Op.B, Op.I, Op.W, Op.U, Op.E)
WEIGHT_GRAD_OPS = (Op.B, Op.W)  # a micro-batch's contribution to the grads is complete
INPUT_GRAD_OPS = (Op.B, Op.I)  # the input gradient is produced (and sent upstream)
FORWARD_OPS = (Op.F, Op.E)  # send an activation downstream


class WeightPolicy(str, enum.Enum):
    """Which weights a backward reads.

    NONE: flush schedules; their order guarantees no step between F(mb) and B(mb).
    LIVE: the weights as they are at backward time, no copy (PACI, naive async).
    STASHED: the weights the forward used, kept as copies (PipeDream, 2BW).
    """

    NONE = "none"
    LIVE = "live"
    STASHED = "stashed"


class Action(NamedTuple):
    stage: int
    op: Op
    microbatch: int | None = None

    def __str__(self) -> str:
        mb = "" if self.microbatch is None else str(self.microbatch)
        return f"{self.stage}{self.op.value}{mb}"

    @staticmethod
    def from_str(text: str) -> Action:
        match = _ACTION_RE.fullmatch(text.strip())
        if match is None:
            raise ScheduleError(f"cannot parse action {text!r}: expected e.g. 0F3, 1B2, 1I2, 1W2 or 0U")
        stage, letters, mb = match.groups()
        op = Op(letters)
        if op is Op.U and mb:
            raise ScheduleError(f"action {text!r}: an optimizer step U takes no micro-batch")
        if op is not Op.U and not mb:
            raise ScheduleError(f"action {text!r}: {letters} needs a micro-batch number, e.g. {stage}{letters}0")
        return Action(int(stage), op, int(mb) if mb else None)


_ACTION_RE = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W|U|E)(\d*)")


class ScheduleError(ValueError):
    """A schedule that cannot run; the message shows where."""


@dataclass(frozen=True)
class Schedule:
    """Per-rank action streams plus the weight policy.

    A rank runs one stage, or with `num_ranks` set (interleaved schedules: virtual stages), the
    num_stages / num_ranks stages s with s % num_ranks == rank, in one order: `stream(rank)`.
    `accumulation` is how many micro-batch backwards a stage sums before each `U` (K for PACI and
    2BW, m for the flush schedules, 1 for PipeDream and naive async). Total micro-batches is
    `num_microbatches`; micro-batches are numbered 0..num_microbatches-1 globally.
    """

    name: str
    num_stages: int
    num_microbatches: int
    accumulation: int
    weight_policy: WeightPolicy
    stream: Callable[[int], Iterable[Action]] = field(repr=False, compare=False)
    params: tuple[tuple[str, int], ...] = ()
    num_ranks: int = 0  # 0: one stage per rank

    @property
    def ranks(self) -> int:
        """The processes that run the schedule (the pipeline's depth P)."""
        return self.num_ranks or self.num_stages

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.ranks

    def rank_of(self, stage: int) -> int:
        return stage % self.ranks

    def stages_of(self, rank: int) -> range:
        """The stages `rank` holds, in stage order."""
        return range(rank, self.num_stages, self.ranks)

    def rank_actions(self, rank: int) -> Iterator[Action]:
        """A fresh iterator over everything `rank` does, in order (lazy)."""
        if not 0 <= rank < self.ranks:
            raise IndexError(f"rank {rank} out of range for {self.ranks} ranks")
        return iter(self.stream(rank))

    def actions(self, stage: int) -> Iterator[Action]:
        """A fresh iterator over `stage`'s actions, in order (lazy)."""
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} out of range for {self.num_stages} stages")
        if self.ranks == self.num_stages:
            return iter(self.stream(stage))
        return (action for action in self.stream(self.rank_of(stage)) if action.stage == stage)

    def derived(self, stream: Callable[[int], Iterable[Action]], num_microbatches: int | None = None,
                params: tuple[tuple[str, int], ...] = ()) -> Schedule:
        """This schedule with other per-rank streams (and micro-batch count), its params extended."""
        return Schedule(self.name, self.num_stages, self.num_microbatches if num_microbatches is None
                        else num_microbatches, self.accumulation, self.weight_policy, stream, self.params + params,
                        self.num_ranks)

    @property
    def num_steps(self) -> int:
        return self.num_microbatches // self.accumulation

    def rows(self) -> list[list[Action]]:
        """Every stage's actions as lists (materialises the streams: small schedules only)."""
        return [list(self.actions(s)) for s in range(self.num_stages)]

    def __str__(self) -> str:
        return "\n".join(" ".join(map(str, row)) for row in self.rows())


def from_rows(rows: list[list[Action]], name: str, accumulation: int, weight_policy: WeightPolicy) -> Schedule:
    """A schedule from explicit per-rank action lists (CSV files, tests); a row holding the actions
    of several stages makes an interleaved schedule (stage s on row s % len(rows))."""
    frozen = tuple(tuple(row) for row in rows)
    num_mb = 1 + max((a.microbatch for row in frozen for a in row if a.microbatch is not None), default=-1)
    num_stages = max(len(frozen), 1 + max((a.stage for row in frozen for a in row), default=-1))
    return Schedule(name, num_stages, num_mb, accumulation, weight_policy, lambda r: frozen[r],
                    num_ranks=len(frozen) if num_stages != len(frozen) else 0)


# ----------------------------------------------------------------------------------------------
# Messages between stages: the one place that says who waits for whom.


class Message(NamedTuple):
    """An activation ("F"), input-gradient ("B") or evaluation activation ("E") of `microbatch`
    travelling to stage `dst`."""

    kind: str
    dst: int
    microbatch: int


def needs(action: Action, num_stages: int) -> Message | None:
    """The message `action` must receive before it can run, if any."""
    if action.op in FORWARD_OPS and action.stage > 0:
        return Message(action.op.value, action.stage, action.microbatch)
    if action.op in INPUT_GRAD_OPS and action.stage < num_stages - 1:
        return Message("B", action.stage, action.microbatch)
    return None


def sends(action: Action, num_stages: int) -> Message | None:
    """The message `action` produces for a neighbouring stage, if any."""
    if action.op in FORWARD_OPS and action.stage < num_stages - 1:
        return Message(action.op.value, action.stage + 1, action.microbatch)
    if action.op in INPUT_GRAD_OPS and action.stage > 0:
        return Message("B", action.stage - 1, action.microbatch)
    return None


def lower(actions: Iterable[Action], num_stages: int) -> Iterator[Action]:
    """Insert RECV before and SEND after every compute action that talks to a neighbour."""
    recv_op = {"F": Op.RECV_F, "E": Op.RECV_F, "B": Op.RECV_B}
    send_op = {"F": Op.SEND_F, "E": Op.SEND_F, "B": Op.SEND_B}
    for action in actions:
        if (msg := needs(action, num_stages)) is not None:
            yield Action(action.stage, recv_op[msg.kind], action.microbatch)
        yield action
        if (msg := sends(action, num_stages)) is not None:
            yield Action(action.stage, send_op[msg.kind], action.microbatch)


def with_evaluation(schedule: Schedule, every: int, num_batches: int) -> Schedule:
    """Insert forward-only evaluation rounds: at the start, after every `every`-th U, after the last U.

    Round r evaluates held-out batches r*num_batches … r*num_batches+num_batches-1 (the batch is the
    index modulo num_batches). On every stage a round sits right after the same U, so each round
    sees the model with every stage at the same version; it keeps no state between actions. A rank
    holding several stages evaluates them in stage order once all of them have stepped.
    """
    if every < 1 or num_batches < 1:
        raise ValueError(f"evaluation needs every >= 1 and num_batches >= 1, got {every}, {num_batches}")
    last = schedule.num_steps

    def stream(rank: int) -> Iterator[Action]:
        stages = schedule.stages_of(rank)
        rounds = 0

        def round_() -> Iterator[Action]:
            nonlocal rounds
            first = rounds * num_batches
            rounds += 1
            return (Action(stage, Op.E, first + j) for stage in stages for j in range(num_batches))

        yield from round_()
        updates = 0
        for action in schedule.rank_actions(rank):
            yield action
            if action.op is Op.U:
                updates += 1
                steps, partial = divmod(updates, len(stages))
                if not partial and (steps % every == 0 or steps == last):
                    yield from round_()

    return schedule.derived(stream, params=(("eval_every", every),))


def with_drains(build: Callable[[int], Schedule], num_steps: int, every: int, extra: Iterable[int] = ()) -> Schedule:
    """`build(steps)`'s schedule over `num_steps` steps, run as segments that each fill and drain the
    pipeline: cut after every `every` steps (0: no periodic cut) and after each step of `extra`.
    The cuts are the drain points, where a checkpoint holds no micro-batch in flight.

    A flush schedule drains after every step anyway, so its stream is unchanged; an asynchronous
    one pays one fill and drain per segment. The points are fixed here, before anything runs, so a
    run that stops at one and resumes computes what a run that never stopped computes. `extra`
    holds the points a prompt stop added (recorded in its checkpoint, so the resumed run has them).
    """
    extra = tuple(sorted({e for e in extra if 0 < e < num_steps}))
    cuts = sorted({*(range(every, num_steps, every) if every else ()), *extra})
    bounds = [0, *cuts, num_steps]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    built = {n: build(n) for n in dict.fromkeys(lengths)}
    first = built[lengths[0]]
    offsets = list(accumulate((built[n].num_microbatches for n in lengths), initial=0))

    def stream(rank: int) -> Iterator[Action]:
        for n, offset in zip(lengths, offsets):
            yield from _shifted(built[n].rank_actions(rank), offset)

    params = tuple((k, num_steps if k == "steps" else v) for k, v in first.params) + (("drain_every", every),)
    if extra:
        params += (("drains", extra),)
    return Schedule(first.name, first.num_stages, offsets[-1], first.accumulation, first.weight_policy, stream,
                    params, first.num_ranks)


def then(first: Schedule, second: Schedule) -> Schedule:
    """`first`'s steps, then `second`'s on the micro-batches after them: one schedule (`second`'s name,
    weight policy and params, plus ("sync_steps", first's steps)). Both take the same stages, ranks
    and accumulation K, so a step is K micro-batches throughout; a synchronous `first` ends drained,
    so nothing of `second` overlaps it."""
    if (first.num_stages, first.ranks, first.accumulation) != (second.num_stages, second.ranks, second.accumulation):
        raise ScheduleError("then: both schedules need the same stages, ranks and accumulation")
    span = first.num_microbatches

    def stream(rank: int) -> Iterator[Action]:
        yield from first.rank_actions(rank)
        yield from _shifted(second.rank_actions(rank), span)

    return Schedule(second.name, second.num_stages, span + second.num_microbatches, second.accumulation,
                    second.weight_policy, stream, second.params + (("sync_steps", first.num_steps),), second.num_ranks)


def _shifted(actions: Iterable[Action], offset: int) -> Iterator[Action]:
    for action in actions:
        yield action if action.microbatch is None or not offset else action._replace(microbatch=action.microbatch + offset)


def from_step(schedule: Schedule, step: int) -> Schedule:
    """What is left of `schedule` after optimizer step `step` (see `after_step`): a resumed run's part."""
    if not step:
        return schedule
    return schedule.derived(lambda r: after_step(schedule.rank_actions(r), step * schedule.stages_per_rank),
                            params=(("from_step", step),))


def after_step(actions: Iterable[Action], step: int) -> Iterator[Action]:
    """A rank's actions from where it left off after its `step`-th U and the evaluation round
    that follows it: where a run resumed from a checkpoint at `step` picks up (a rank of v stages
    passes v U's per optimizer step)."""
    actions = iter(actions)
    pending: Action | None = None
    if step:
        seen = 0
        for action in actions:
            seen += action.op is Op.U
            if seen == step:
                break
        pending = next(actions, None)
        while pending is not None and pending.op is Op.E:
            pending = next(actions, None)
    if pending is not None:
        yield pending
    yield from actions


def stage_versions(schedule: Schedule, stage: int) -> Iterator[tuple[int, int, int]]:
    """(mb, v_f, v_b) at each backward (B or I) of `stage`, in its order: the versions its F and its
    backward see, fixed by the order alone (v = U actions so far). Lazy, like the schedule."""
    version = 0
    forward_version: dict[int, int] = {}
    for action in schedule.actions(stage):
        if action.op is Op.U:
            version += 1
        elif action.op is Op.F:
            forward_version[action.microbatch] = version
        elif action.op in INPUT_GRAD_OPS:
            yield action.microbatch, forward_version.pop(action.microbatch), version


def stage_delay(schedule: Schedule, stage: int) -> int:
    """The most updates any backward of `stage` crosses (its largest drift Δ), fixed by the schedule."""
    return max((v_b - v_f for _, v_f, v_b in stage_versions(schedule, stage)), default=0)


def steps_together(schedule: Schedule) -> bool:
    """Do all stages step together, i.e. does no backward anywhere cross an update (Δ = 0 at every
    stage)? True for the flush schedules and for any schedule on one stage."""
    return all(stage_delay(schedule, s) == 0 for s in range(schedule.num_stages))


def updates_ahead(schedule: Schedule, stage: int) -> Callable[[int], int]:
    """mb -> how many updates of `stage` come between F(mb) and its backward (v_b - v_f), read
    lazily from the schedule as the forwards ask for them (each micro-batch once)."""
    versions = stage_versions(schedule, stage)
    known: dict[int, int] = {}

    def ahead(mb: int) -> int:  # forwards ask in increasing order: earlier micro-batches are not kept
        while mb not in known:
            other, v_f, v_b = next(versions)
            if other >= mb:
                known[other] = v_b - v_f
        return known.pop(mb)

    return ahead


def evaluation_rounds(num_steps: int, every: int) -> list[int]:
    """The step after which each evaluation round of `with_evaluation` runs (0 = before training)."""
    return [0] + [k for k in range(1, num_steps + 1) if k % every == 0 or k == num_steps]


# ----------------------------------------------------------------------------------------------
# Validation


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless every stage's stream is complete, well-ordered and runnable.

    Per stage: every micro-batch gets exactly one F and one backward (B, or I then W), F first;
    a U follows every `accumulation` weight-backwards (B or W) and none is left unstepped.
    Across stages: the dependencies can all be met (a dependency walk finds no deadlock).
    """
    if schedule.ranks != schedule.num_stages:
        _check_placement(schedule)
    for stage in range(schedule.num_stages):
        _check_stage(schedule, stage)
    _check_no_deadlock(schedule)


def _check_placement(schedule: Schedule) -> None:
    """Each rank runs only its own stages: stage s on rank s % P."""
    for rank in range(schedule.ranks):
        for position, action in enumerate(schedule.rank_actions(rank)):
            if schedule.rank_of(action.stage) != rank:
                raise ScheduleError(f"rank {rank}, position {position} ({action}): stage {action.stage} runs on rank "
                                    f"{schedule.rank_of(action.stage)} (stage s on rank s mod {schedule.ranks})")


class _Finished:
    """The micro-batches a stage has finished: all below `low`, plus those finished ahead of it
    (few: a stage finishes nearly in order), so a 10**9-micro-batch stream needs no 10**9 set."""

    def __init__(self) -> None:
        self.low = 0
        self.ahead: set[int] = set()

    def __contains__(self, mb: int) -> bool:
        return mb < self.low or mb in self.ahead

    def add(self, mb: int) -> None:
        self.ahead.add(mb)
        while self.low in self.ahead:
            self.ahead.remove(self.low)
            self.low += 1


def _check_stage(schedule: Schedule, stage: int) -> None:
    state: dict[int, str] = {}  # mb -> ops seen so far: "F", or "FI" awaiting its W
    finished = _Finished()
    pending_grads = 0
    position = 0
    for position, action in enumerate(schedule.actions(stage)):
        why = _stage_problem(schedule, stage, action, state, pending_grads, finished)
        if why:
            raise _grid_error(schedule, f"stage {stage}, position {position} ({action}): {why}", {stage: position})
        if action.op is Op.U:
            pending_grads = 0
        elif action.op in WEIGHT_GRAD_OPS:
            pending_grads += 1
            del state[action.microbatch]
            finished.add(action.microbatch)
        elif action.op is not Op.E:
            state[action.microbatch] = state.get(action.microbatch, "") + action.op.value
    if state:
        mb = min(state)
        raise _grid_error(schedule, f"stage {stage}: micro-batch {mb} never finishes its backward "
                          f"(only {state[mb]})", {stage: position})
    if finished.low < schedule.num_microbatches:
        raise _grid_error(schedule, f"stage {stage}: micro-batch {finished.low} never runs, but micro-batches are "
                          f"numbered 0 to {schedule.num_microbatches - 1}: every stage runs each of them, "
                          "numbered without gaps", {stage: position})
    if pending_grads:
        raise _grid_error(schedule, f"stage {stage}: the last {pending_grads} weight-backwards are never "
                          "stepped (a U is missing at the end)", {stage: position})


def _stage_problem(schedule: Schedule, stage: int, action: Action, state: dict[int, str], pending_grads: int,
                   finished: _Finished) -> str:
    if action.stage != stage:
        return f"an action of stage {action.stage} in stage {stage}'s stream"
    if action.op not in COMPUTE_OPS:
        return "comm ops belong only to the lowered form"
    if action.op is Op.U:
        if pending_grads != schedule.accumulation:
            return f"U after {pending_grads} weight-backwards; expected {schedule.accumulation}"
        return ""
    if action.op is Op.E:
        return ""
    mb = action.microbatch
    if not 0 <= mb < schedule.num_microbatches:
        return f"micro-batch {mb} outside 0..{schedule.num_microbatches - 1}"
    if mb in finished:
        return f"micro-batch {mb} runs a second time; each runs once per stage"
    seen = state.get(mb, "")
    expected = {Op.F: "", Op.B: "F", Op.I: "F", Op.W: "FI"}[action.op]
    if seen != expected:
        return f"{action.op.value} of micro-batch {mb} after {seen or 'nothing'}; expected after {expected or 'nothing'}"
    if action.op in WEIGHT_GRAD_OPS and pending_grads == schedule.accumulation:
        return f"a U is missing: {pending_grads} weight-backwards are already accumulated"
    return ""


def _grid_error(schedule: Schedule, message: str, marks: dict[int, int]) -> ScheduleError:
    return ScheduleError(message + "\n" + render_grid(schedule, marks))


def _check_no_deadlock(schedule: Schedule) -> None:
    """Walk the dependency graph rank by rank; report the blocked actions if nothing can move."""
    num_stages, num_ranks = schedule.num_stages, schedule.ranks
    streams = [schedule.rank_actions(r) for r in range(num_ranks)]
    heads: list[Action | None] = [next(it, None) for it in streams]
    positions = [0] * num_stages  # per stage, for the grid
    arrived: set[Message] = set()
    waiting: dict[Message, int] = {}
    runnable = list(range(num_ranks))
    while runnable:
        rank = runnable.pop()
        while (action := heads[rank]) is not None:
            msg = needs(action, num_stages)
            if msg is not None:
                if msg not in arrived:
                    waiting[msg] = rank
                    break
                arrived.remove(msg)
            out = sends(action, num_stages)
            if out is not None:
                arrived.add(out)
                if out in waiting:
                    runnable.append(waiting.pop(out))
            heads[rank] = next(streams[rank], None)
            positions[action.stage] += 1
    blocked = {heads[r].stage: positions[heads[r].stage] for r in range(num_ranks) if heads[r] is not None}
    if blocked:
        detail = ", ".join(f"stage {s} waits at {heads[schedule.rank_of(s)]}" for s in blocked)
        raise _grid_error(schedule, f"deadlock: {detail}", blocked)


def render_grid(schedule: Schedule, marks: dict[int, int], context: int = 6) -> str:
    """Each stage's actions around the marked positions, the marked cell in [brackets]."""
    centre = min(marks.values()) if marks else 0
    lo = max(0, centre - context)
    hi = max(marks.values(), default=0) + context + 1
    lines = [f"positions {lo}..{hi - 1}:"]
    for stage in range(schedule.num_stages):
        cells = []
        for pos, action in enumerate(islice(schedule.actions(stage), lo, hi), start=lo):
            text = str(action)
            cells.append(f"[{text}]" if marks.get(stage) == pos else f" {text} ")
        lines.append(f"  stage {stage}: " + "".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# torch.distributed.pipelining CSV (compute-only: one row per rank, empty cell = idle)


def to_csv(schedule: Schedule) -> str:
    """One row per rank, as torch writes them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for rank in range(schedule.ranks):
        writer.writerow(str(a) for a in schedule.rank_actions(rank))
    return out.getvalue()


_BOOKKEEPING = re.compile(r"\d+(UNSHARD|RESHARD|REDUCE_GRAD)\d*")  # FSDP/DP ops torch adds; no pipeline compute
MAX_CSV_CHARS = 16 * 2**20  # about 4 M actions, materialised as lists of actions


def from_csv(text: str, name: str = "csv", weight_policy: WeightPolicy = WeightPolicy.NONE) -> Schedule:
    """Parse a compute-only CSV. Rows without any U are one flush step: a U is appended.

    torch's UNSHARD / RESHARD / REDUCE_GRAD cells (data-parallel bookkeeping) are dropped.
    """
    if len(text) > MAX_CSV_CHARS:
        raise ScheduleError(f"the CSV has {len(text):,} characters; paci reads schedule CSVs of at most "
                            f"{MAX_CSV_CHARS:,} (about 4 M actions)")
    try:
        rows = _csv_rows(text)
    except csv.Error as exc:  # e.g. a cell over csv's field size limit
        raise ScheduleError(f"the CSV cannot be read as a schedule ({exc}); write one rank's actions per line, "
                            "e.g. 0F0,0F1,0B0,0B1") from None
    if not rows:
        raise ScheduleError("CSV has no actions")
    has_updates = [any(a.op is Op.U for a in row) for row in rows]
    if not any(has_updates):  # U for each stage of the row, in stage order
        rows = [row + [Action(s, Op.U) for s in sorted({a.stage for a in row})] for row in rows]
        accumulation = sum(a.op in WEIGHT_GRAD_OPS for a in rows[0] if a.stage == 0)
    else:
        first_u = next((i for i, a in enumerate(rows[0]) if a.op is Op.U and a.stage == 0), len(rows[0]))
        accumulation = sum(a.op in WEIGHT_GRAD_OPS for a in rows[0][:first_u] if a.stage == 0)
    schedule = from_rows(rows, name, max(accumulation, 1), weight_policy)
    validate(schedule)
    return schedule


def _csv_rows(text: str) -> list[list[Action]]:
    """One list of actions per non-empty CSV line (one line per rank); ScheduleError names the line
    of a bad cell, or of a stage on the wrong rank (stage s runs on rank s mod the number of lines)."""
    rows: list[tuple[int, list[Action]]] = []
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not any(cell.strip() for cell in row):
            continue
        actions = []
        for cell in filter(str.strip, row):
            if _BOOKKEEPING.fullmatch(cell.strip()):
                continue
            try:
                action = Action.from_str(cell)
            except (ScheduleError, ValueError) as exc:
                raise ScheduleError(f"CSV line {line_no}: {exc}") from None
            if action.op not in COMPUTE_OPS:
                raise ScheduleError(f"CSV line {line_no}: {cell} is a comm op; paci reads compute-only CSVs "
                                    "(torch's _dump_csv(format='compute_only'))")
            actions.append(action)
        rows.append((line_no, actions))
    for rank, (line_no, actions) in enumerate(rows):
        for action in actions:
            if action.stage % len(rows) != rank:
                raise ScheduleError(f"CSV line {line_no}: {action} belongs to stage {action.stage}, which runs on rank "
                                    f"{action.stage % len(rows)} of {len(rows)} (one line per rank, stage s on rank s "
                                    f"mod {len(rows)}), but this line is rank {rank}")
    return [actions for _, actions in rows]
