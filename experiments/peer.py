"""Experiment 5 (issue 8): paci's runtime against torch.distributed.pipelining on the same real work.

Total CPU cost: the full run (50 cells) takes about 7 minutes on an idle 2-core machine, about 9
CPU-minutes (10 minutes when other work shares the cores); `--quick` (5 cells) about 15 s.

Both libraries run the same job: P = 2 spawned processes with one torch thread each, gloo, the
`small` GPT (4 layers, 128 wide, 4096-token vocabulary) cut into the same two stages, units 0:8
(embedding, three blocks, the fourth block's attention half) and 8:10 (its MLP half, the LM
head): the most even contiguous split as the runtime measures it (27.5 and 24.7 ms forward +
backward per micro-batch with one thread; the profiler's pick, 0:9 and 9:10, gives 32 and 20 ms,
the uniform 0:5 and 5:10 worse still), micro-batches of 8 sequences x 64 random tokens (the same
tokens for both: micro-batch i is drawn from a generator seeded by i), AdamW with paci's settings
(`OptimizerSpec`: decay on >=2-D weights only, betas (0.9, 0.95), LambdaLR warm-up/cosine).

* ours: `1f1b` (flush), `gpipe` and `paci` (K = m) through paci's own runtime, the `Executor`
  over `DistTransport` exactly as `paci train --nproc 2` drives a rank, without evaluation rounds
  or the metrics channel;
* theirs: `Schedule1F1B` and `ScheduleGPipe` driving `PipelineStage`s built from the same stage
  modules; every `step()` (with `return_outputs=False`: paci keeps only the loss, not the logits)
  is followed by `optimizer.step()`, `scheduler.step()` and `zero_grad`.

How it is timed, the same way for both: each rank notes `time.perf_counter()` when its optimizer
step for mini-batch s has finished (for ours the end of the `U` action in the executor's trace,
which is taken at exactly that point; for theirs right after `zero_grad`). A cell runs `steps`
mini-batches; the first `warmup` are skipped (pipeline fill, torch's first-step set-up), and its
time per mini-batch is the median interval between consecutive optimizer-step ends over the rest,
the slower rank's (the window mean is cached too). Building the stages is outside the timed
intervals; so is anything after the last optimizer step. Cells run interleaved (ours, theirs,
ours, ... in the opposite order every other repeat); each figure is the median over repeats.

The machine may be shared. For every cell rank 0 measures the share of the CPUs that other
processes took meanwhile (the machine's busy time from /proc/stat minus our ranks' own CPU time);
above 5% the cell is measured again once the machine is idle (4 attempts, --patience seconds of
waiting in all), and the share is cached with the cell and reported. Every finished cell is a
JSON file under --out, so an interrupted run resumes where it stopped (--redo-disturbed measures
the disturbed ones again).

Targets: our 1F1B-flush >= 0.95x torch's Schedule1F1B, and PACI >= torch's 1F1B x 0.9 x (m+P-1)/m.

    /tmp/quiet .venv/bin/python experiments/peer.py [--quick] [--repeats 5] [--out runs/peer]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from common import machine, save_figure
from paci import schedules
from paci.files import write_text
from paci.ir import Message, Op
from paci.model import PRESETS, GPTConfig, build_units, lm_loss
from paci.runtime.executor import Executor
from paci.runtime import mesh
from paci.runtime.launch import spawn
from paci.runtime.stage import OptimizerSpec, Stage
from paci.runtime.transport import DistTransport
from paci.trace import OP_CODE, Trace

NUM_STAGES = 2
CPU = torch.device("cpu")
TIMEOUT_S = 60.0
SMALL_SPLIT = ((0, 8), (8, 10))
THEIRS = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
LABELS = {("ours", "1f1b"): "paci 1f1b (flush)", ("torch", "1f1b"): "torch Schedule1F1B",  # (library, schedule)
          ("ours", "gpipe"): "paci gpipe", ("torch", "gpipe"): "torch ScheduleGPipe",  # in run order:
          ("ours", "paci"): "paci paci (K = m)"}  # ours and theirs alternate
MAX_OTHERS = 0.05  # a cell during which other processes took more of the CPUs than this is measured again
MAX_ATTEMPTS = 4
QUIET_WAIT_S = 300.0  # at most this long between attempts


@dataclass(frozen=True)
class Work:
    """Everything both libraries share: model, split, micro-batch shape, data, optimizer, run length."""

    model: GPTConfig
    split: tuple[tuple[int, int], ...]  # [start, stop) units per stage
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 64
    steps: int = 30  # mini-batches per cell
    warmup: int = 5  # mini-batches skipped before the timed window
    seed: int = 0
    optimizer: OptimizerSpec = OptimizerSpec()

    def microbatch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index`: (inputs, targets), (B, T) each, random tokens that depend only on the index."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(self.model.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]

    def minibatch(self, step: int, num_microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mini-batch `step` as torch wants it: the same micro-batches stacked along the batch dimension."""
        parts = [self.microbatch(step * num_microbatches + i) for i in range(num_microbatches)]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def units(self, stage: int) -> list[nn.Module]:
        start, stop = self.split[stage]
        return build_units(self.model, self.seed, start, stop)

    def settings(self) -> dict:
        """The fields a cached cell must match to be reused."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def make_work(preset: str, split: tuple[tuple[int, int], ...], steps: int, warmup: int, **shape: int) -> Work:
    return Work(PRESETS[preset], split, steps=steps, warmup=warmup,
                optimizer=OptimizerSpec(warmup_steps=1, total_steps=steps), **shape)


def stage_shapes(work: Work) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(example input, example output) of every stage, on the meta device (shapes and dtypes only)."""
    shapes = []
    with torch.device("meta"):
        x = torch.zeros(work.batch_size, work.seq_len, dtype=torch.long)
        for stage in range(NUM_STAGES):
            y = nn.Sequential(*work.units(stage))(x)
            shapes.append((x, y))
            x = y
    return shapes


# ----------------------------------------------------------------------------------------------
# Ours: paci's Executor over DistTransport, one stage per rank


class OurRank(NamedTuple):
    stage: Stage
    executor: Executor
    transport: DistTransport
    trace: Trace


def build_ours(work: Work, name: str, num_microbatches: int, rank: int, steps: int) -> OurRank:
    """This rank's stage, transport and executor for `steps` mini-batches of schedule `name` (paci: K = m)."""
    schedule = schedules.build(name, NUM_STAGES, num_microbatches, steps)
    stage = Stage(rank, NUM_STAGES, work.units(rank), policy=schedule.weight_policy, optim=work.optimizer,
                  loss_scale=1.0 / schedule.accumulation, train_batch=work.microbatch, val_batch=work.microbatch,
                  device=CPU)
    boundary = stage_shapes(work)[0][1]  # with two stages every message is stage 0's output or its gradient

    def spec(_: Message) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(boundary.shape), boundary.dtype

    transport = DistTransport(schedule, rank, spec, CPU, TIMEOUT_S)
    trace = Trace(schedule.name, NUM_STAGES, schedule.num_microbatches, schedule.weight_policy, kind="measured")
    return OurRank(stage, Executor(stage, schedule.actions(rank), transport, trace), transport, trace)


def time_ours(work: Work, name: str, num_microbatches: int, rank: int) -> list[float]:
    """Run a cell with our runtime; returns when each optimizer step (U) ended on this rank."""
    ours = build_ours(work, name, num_microbatches, rank, work.steps)
    dist.barrier()
    while not ours.executor.done:
        ours.executor.run_next()
    ours.transport.flush()
    columns = ours.trace.stages[rank]
    return [end for op, end in zip(columns.op, columns.end) if op == OP_CODE[Op.U]]


# ----------------------------------------------------------------------------------------------
# Theirs: torch.distributed.pipelining on the same stage modules


def build_theirs(work: Work, name: str, num_microbatches: int, rank: int):
    """This rank's stage module and torch schedule (grads scaled by 1/m, as our loss scale does)."""
    module = nn.Sequential(*work.units(rank))
    example_in, example_out = stage_shapes(work)[rank]
    pipe_stage = PipelineStage(module, rank, NUM_STAGES, CPU, input_args=example_in, output_args=example_out)
    return module, THEIRS[name](pipe_stage, num_microbatches, loss_fn=lm_loss, scale_grads=True)


def torch_step(schedule, rank: int, inputs: torch.Tensor, targets: torch.Tensor, losses: list | None = None) -> None:
    """One mini-batch through torch's schedule: the first stage feeds inputs, the last the targets."""
    if rank == 0:
        schedule.step(inputs, return_outputs=False)
    else:
        schedule.step(target=targets, losses=losses, return_outputs=False)


def torch_optimizer(module: nn.Module, spec: OptimizerSpec):
    """AdamW and LR schedule set up as paci's Stage sets them up."""
    return spec.build(list(module.parameters()))


def time_theirs(work: Work, name: str, num_microbatches: int, rank: int) -> list[float]:
    """Run a cell with torch's schedule; returns when each optimizer step ended on this rank."""
    module, schedule = build_theirs(work, name, num_microbatches, rank)
    optimizer, scheduler = torch_optimizer(module, work.optimizer)
    ends = []
    dist.barrier()
    for step in range(work.steps):
        inputs, targets = work.minibatch(step, num_microbatches)
        torch_step(schedule, rank, inputs, targets)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return ends


RUNNERS = {"ours": time_ours, "torch": time_theirs}


# ----------------------------------------------------------------------------------------------
# Correctness: one flush step of our 1F1B against torch's Schedule1F1B (tests/test_peer.py)


def ours_gradients(work: Work, num_microbatches: int, rank: int) -> dict:
    """Loss per micro-batch (last stage) and every parameter's gradient after one step of our 1F1B, before U."""
    ours = build_ours(work, "1f1b", num_microbatches, rank, steps=1)
    while ours.executor.head.op is not Op.U:
        ours.executor.run_next()
    grads = {name: p.grad.clone() for name, p in ours.stage.module.named_parameters()}
    losses = [ours.stage.losses[mb] for mb in range(num_microbatches)] if ours.stage.is_last else []
    ours.executor.run_next()  # U, so the run ends as it would
    ours.transport.flush()
    return {"grads": grads, "losses": torch.stack(losses) if losses else torch.zeros(0)}


def torch_gradients(work: Work, num_microbatches: int, rank: int) -> dict:
    """The same for one `Schedule1F1B.step()` on the same weights and micro-batches."""
    module, schedule = build_theirs(work, "1f1b", num_microbatches, rank)
    losses: list[torch.Tensor] = []
    inputs, targets = work.minibatch(0, num_microbatches)
    torch_step(schedule, rank, inputs, targets, losses)
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return {"grads": grads, "losses": torch.stack(losses).detach() if losses else torch.zeros(0)}


def gradient_rank(payload: tuple[Work, int, str]) -> int:
    """Spawned rank: both libraries' first step, saved to <out>/rank<r>.pt as {"ours": ..., "torch": ...}."""
    work, num_microbatches, out = payload
    logging.getLogger("torch.distributed.pipelining").setLevel(logging.WARNING)
    mesh.join(CPU, TIMEOUT_S)
    rank = dist.get_rank()
    result = {"ours": ours_gradients(work, num_microbatches, rank),
              "torch": torch_gradients(work, num_microbatches, rank)}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    return 0


# ----------------------------------------------------------------------------------------------
# Cells: one library, schedule, m and repeat each; measured in spawned ranks, cached as JSON


class Cell(NamedTuple):
    m: int
    library: str  # "ours" or "torch"
    schedule: str
    repeat: int

    @property
    def filename(self) -> str:
        return f"m{self.m}-{self.library}-{self.schedule}-r{self.repeat}.json"


def plan_cells(ms: tuple[int, ...], repeats: int) -> list[Cell]:
    """Every cell in run order: ours and theirs alternate, and each repeat runs in the opposite order."""
    cells = []
    for repeat in range(repeats):
        for m in ms:
            row = [Cell(m, library, schedule, repeat) for library, schedule in LABELS]
            cells += row if repeat % 2 == 0 else row[::-1]
    return cells


def steady_intervals(rank_ends: list[float], warmup: int) -> list[float]:
    """Times between consecutive optimizer steps, after the first `warmup` mini-batches."""
    return [b - a for a, b in zip(rank_ends[warmup - 1:], rank_ends[warmup:])]


def save_cell(out: Path, cell: Cell, work: Work, ends: list[list[float]], others: float, attempts: int) -> dict:
    """The cell's time per mini-batch is the slower rank's median steady interval (robust to a stray
    burst of other work on the machine); the window mean is kept beside it."""
    s = max(statistics.median(steady_intervals(rank_ends, work.warmup)) for rank_ends in ends)
    mean = max(statistics.fmean(steady_intervals(rank_ends, work.warmup)) for rank_ends in ends)
    record = {"cell": cell._asdict(), "settings": work.settings(), "s_per_minibatch": s,
              "tokens_per_s": cell.m * work.batch_size * work.seq_len / s, "mean_s_per_minibatch": mean,
              "others_cpu_share": others, "attempts": attempts,
              "ends": [[t - ends[0][0] for t in rank_ends] for rank_ends in ends]}
    write_text(out / cell.filename, json.dumps(record) + "\n")
    return record


def load_cell(out: Path, cell: Cell, work: Work) -> dict | None:
    """The cached record of `cell`, None if it was not measured yet; ValueError if measured with other settings."""
    path = out / cell.filename
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record["settings"] != work.settings():
        raise ValueError(f"{path} was measured with other settings; pass a new --out (or delete that folder)")
    return record


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot, all processes together (/proc/stat)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    user, nice, system, _, _, irq, softirq, steal = fields  # idle and iowait skipped
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit_s: float, probe_s: float = 2.0) -> None:
    """Return once the machine was idle for one probe (our ranks are idle then), or after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy = machine_busy_s()
        time.sleep(probe_s)
        if (machine_busy_s() - busy) / (probe_s * os.cpu_count()) < MAX_OTHERS:
            return


def run_cell(work: Work, cell: Cell, rank: int) -> tuple[list[list[float]], float] | None:
    """Run one cell on every rank. Rank 0 gets every rank's step ends and the share of the machine's CPU
    time that other processes took meanwhile (the others get None)."""
    dist.barrier()
    busy, cpu, wall = machine_busy_s(), time.process_time(), time.monotonic()
    ends = RUNNERS[cell.library](work, cell.schedule, cell.m, rank)
    dist.barrier()
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    gathered = [None] * NUM_STAGES if rank == 0 else None
    dist.gather_object((ends, cpu), gathered, dst=0)
    if rank != 0:
        return None
    others = machine_busy_s() - busy - sum(used for _, used in gathered)
    return [rank_ends for rank_ends, _ in gathered], others / (wall * os.cpu_count())


Measured = tuple[list[list[float]], float, int]  # every rank's step ends, share of the CPUs others took, attempts


def measure_cell(work: Work, cell: Cell, rank: int, patience_until: float) -> Measured | None:
    """`run_cell`, again once the machine is idle while other processes took more than MAX_OTHERS of it
    (MAX_ATTEMPTS at most, no waiting past `patience_until`). Rank 0 gets (ends, share of the CPUs taken by
    others, attempts); rank 0 decides for every rank."""
    attempt = 1
    while True:
        result = run_cell(work, cell, rank)
        patience = patience_until - time.monotonic()
        again = [result is not None and result[1] > MAX_OTHERS and attempt < MAX_ATTEMPTS and patience > 0]
        if again[0]:
            print(f"      {cell.filename}: other processes took {result[1]:.0%} of the CPUs; waiting for a quiet "
                  "machine to measure it again", flush=True)
            wait_for_quiet(min(QUIET_WAIT_S, patience))
        dist.broadcast_object_list(again, src=0)  # the other ranks wait here meanwhile
        if not again[0]:
            return None if result is None else (*result, attempt)
        attempt += 1


def measure_rank(payload: tuple[Work, list[Cell], str, float]) -> int:
    """Spawned rank: measure `cells` one after another; rank 0 caches each and prints progress."""
    work, cells, out, patience_s = payload
    logging.getLogger("torch.distributed.pipelining").setLevel(logging.WARNING)  # "Using Schedule1F1B" per cell
    mesh.join(CPU, QUIET_WAIT_S + TIMEOUT_S)  # collectives wait while rank 0 waits for a quiet machine
    rank = dist.get_rank()
    start = time.monotonic()
    for done, cell in enumerate(cells, 1):
        measured = measure_cell(work, cell, rank, start + patience_s)
        if rank == 0:
            record = save_cell(Path(out), cell, work, *measured)
            elapsed = time.monotonic() - start
            print(f"[{done}/{len(cells)}] m={cell.m} {cell.library:5} {cell.schedule:5} repeat {cell.repeat}: "
                  f"{record['tokens_per_s']:8,.0f} tok/s | others {max(0.0, record['others_cpu_share']):4.0%} of "
                  f"the CPUs, attempt {record['attempts']} | {elapsed:.0f} s, about "
                  f"{elapsed / done * (len(cells) - done):.0f} s left", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Report: the table, the targets, the plot

class Row(NamedTuple):
    m: int
    library: str
    schedule: str
    ms_per_minibatch: float  # medians over repeats
    tokens_per_s: float
    low: float  # the lowest and highest tokens/s of the repeats
    high: float
    disturbed: int  # repeats during which other processes took more than MAX_OTHERS of the CPUs
    repeats: int


def summarise(records: dict[Cell, dict]) -> list[Row]:
    """One row per (m, library, schedule): medians over the repeats, in LABELS order."""
    rows = []
    for m in sorted({cell.m for cell in records}):
        for library, schedule in LABELS:
            group = [r for cell, r in records.items() if cell[:3] == (m, library, schedule)]
            rates = [r["tokens_per_s"] for r in group]
            rows.append(Row(m, library, schedule, 1e3 * statistics.median(r["s_per_minibatch"] for r in group),
                            statistics.median(rates), min(rates), max(rates),
                            sum(r["others_cpu_share"] > MAX_OTHERS for r in group), len(group)))
    return rows


def targets(rows: list[Row]) -> list[str]:
    """One sentence per target and m, with the measured ratio, whether it holds, and any disturbed cells."""
    lines = []
    for m in sorted({row.m for row in rows}):
        mine = {(row.library, row.schedule): row for row in rows if row.m == m}
        theirs = mine["torch", "1f1b"]
        fill = m + NUM_STAGES - 1
        for key, label, bound, goal in ((("ours", "1f1b"), "1F1B-flush", 0.95, "0.95"),
                                        (("ours", "paci"), "PACI", 0.9 * fill / m, f"0.9 x {fill}/{m}")):
            ratio = mine[key].tokens_per_s / theirs.tokens_per_s
            disturbed = mine[key].disturbed + theirs.disturbed
            caveat = (f" (but {disturbed} of {mine[key].repeats + theirs.repeats} cells ran while other processes "
                      f"used more than {MAX_OTHERS:.0%} of the CPUs)") if disturbed else ""
            lines.append(f"m={m}: our {label} / torch Schedule1F1B = {ratio:.3f} (target >= {goal} = {bound:.3f}): "
                         f"{'holds' if ratio >= bound else 'does NOT hold'}{caveat}")
    return lines


def table(rows: list[Row]) -> str:
    torch_1f1b = {row.m: row.tokens_per_s for row in rows if (row.library, row.schedule) == ("torch", "1f1b")}
    lines = ["| m | library and schedule | ms / mini-batch | tokens/s | range over repeats | / torch 1F1B | "
             f"disturbed (others > {MAX_OTHERS:.0%} CPU) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.m} | {LABELS[row.library, row.schedule]} | {row.ms_per_minibatch:.1f} | "
                     f"{row.tokens_per_s:,.0f} | {row.low:,.0f}–{row.high:,.0f} | "
                     f"{row.tokens_per_s / torch_1f1b[row.m]:.3f} | {row.disturbed} of {row.repeats} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Grouped bars: tokens/s per library and schedule for each m, whiskers spanning the repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted({row.m for row in rows})
    colors = ["#1f5fa8", "#9a9a9a", "#6fa0d8", "#cfcfcf", "#d9822b"]
    width = 0.8 / len(LABELS)
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, key in enumerate(LABELS):
        mine = [next(row for row in rows if row.m == m and (row.library, row.schedule) == key) for m in ms]
        xs = [i + (k - (len(LABELS) - 1) / 2) * width for i in range(len(ms))]
        heights = [row.tokens_per_s for row in mine]
        errors = [[h - row.low for h, row in zip(heights, mine)], [row.high - h for h, row in zip(heights, mine)]]
        bars = ax.bar(xs, heights, width, yerr=errors, capsize=3, color=colors[k], label=LABELS[key])
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=7, padding=4)
    ax.set_xticks(range(len(ms)), [f"m = {m}" for m in ms])
    ax.set_ylabel("tokens / s (median over repeats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: m=4 only, 8 mini-batches, 1 repeat (< 1 min)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per cell, interleaved (default 5)")
    parser.add_argument("--steps", type=int, default=30, help="mini-batches per cell, 5 of them warm-up (default 30)")
    parser.add_argument("--patience", type=float,
                        help="seconds in all to wait for an idle machine to re-measure cells that other processes "
                             "disturbed (default 600, with --quick 0: every cell is kept as first measured)")
    parser.add_argument("--redo-disturbed", action="store_true",
                        help="measure again the cached cells that other processes disturbed")
    parser.add_argument("--out", type=Path, help="cache folder (default runs/peer, or runs/peer-quick with --quick)")
    return parser.parse_args(argv)


def needs_measuring(record: dict | None, redo_disturbed: bool) -> bool:
    return record is None or (redo_disturbed and record["others_cpu_share"] > MAX_OTHERS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ms, repeats, steps, warmup = ((4,), 1, 8, 3) if args.quick else ((4, 8), args.repeats, args.steps, 5)
    out = args.out or Path("runs/peer-quick" if args.quick else "runs/peer")
    work = make_work("small", SMALL_SPLIT, steps, warmup)
    cells = plan_cells(ms, repeats)
    try:
        todo = [cell for cell in cells if needs_measuring(load_cell(out, cell, work), args.redo_disturbed)]
    except ValueError as exc:
        print(f"peer: error: {exc}", file=sys.stderr)
        return 2
    title = (f"P={NUM_STAGES} (gloo, 1 thread each), small GPT split {SMALL_SPLIT}, micro-batch "
             f"{work.batch_size}x{work.seq_len},\n{steps} mini-batches per cell ({warmup} warm-up), "
             f"median of {repeats} interleaved repeats")
    print(f"{machine()}\n{title}\n{len(cells) - len(todo)} of {len(cells)} cells cached in {out}", flush=True)
    start = time.monotonic()
    patience = args.patience if args.patience is not None else 0.0 if args.quick else 600.0
    if todo and spawn(measure_rank, (work, todo, str(out), patience), NUM_STAGES, threads=1) != 0:
        return 1
    rows = summarise({cell: load_cell(out, cell, work) for cell in cells})
    report = "\n".join([table(rows), "", *targets(rows)])
    print(f"measured {len(todo)} cells in {time.monotonic() - start:.0f} s\n\n{report}")
    write_text(out / "results.md", f"{machine()}\n\n{title}\n\n{report}\n")
    plot(rows, out / "peer.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
