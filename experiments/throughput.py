"""Throughput against micro-batch count at P = 8: PACI, 1F1B-flush, GPipe, ZB-H1, interleaved 1F1B (the paper's Fig. 3).

The paper's claim: flush schedules reach only m/(m+P-1) of PACI's throughput at m micro-batches per
step, PACI (K = m) runs bubble-free at any m. Here: the `deep` GPT preset (vocab 1024), a global
batch of 64 sequences x 64 tokens per step split into m in {2, 4, 8, 16, 32} micro-batches, cut
into 8 stages by the profiled partitioner, every unit profiled with one thread (one core per
stage, as on an 8-device machine) at each micro-batch size. Two cores cannot run eight real stages
at once, so the real multi-process runtime (gloo, 8 ranks, the real schedules, real activation
tensors of the real size) runs synthetic stages that sleep each stage's profiled F, B, I/W and U
times. Per cell it reports the measured throughput, the simulator's prediction from the same
profiled costs (made before the run), their ratio, the throughput relative to PACI at the same m
and the bubble model m/(m+P-1) beside it (v·m/(v·m+P-1) for interleaved 1F1B, whose v = 2 stages
per rank come from the same profile cut into 2P stages; skipped where the model has fewer units).

Cost: about 4 min wall and 2 CPU-min on 2 cores (profiling five micro-batch sizes, then 20 runs of
64 steps in one 8-rank process group; the ranks mostly sleep); --quick (tiny preset, P = 4,
m in {2, 4}, 6 steps): about 15 s. Cells are cached as JSON under --out, so an interrupted run
resumes; time it alone (other load on the cores slows the ranks):

    .venv/bin/python experiments/throughput.py [--quick] [--out runs/throughput]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from paci.bench import RuntimeBench, run_bench_rank
from paci.model import PRESETS, num_units
from paci.partition import partition, stage_memory_model
from paci.profiler import UnitProfile, profile_units, stage_costs
from paci.runtime.launch import spawn
from paci.sim import CostModel

sys.path.insert(0, str(Path(__file__).parent))
from common import Cells, cpu_seconds, machine, save_figure  # noqa: E402

SCHEDULES = ("paci", "1f1b", "gpipe", "zb-h1", "interleaved-1f1b")
CHUNKS = 2  # interleaved-1f1b: stages per rank
FLUSHED = ("1f1b", "gpipe")  # the schedules the bubble model m/(m+P-1) describes
VOCAB = 1024


@dataclasses.dataclass(frozen=True)
class Setup:
    preset: str
    stages: int
    microbatches: tuple[int, ...]
    steps: int  # optimizer steps of every schedule: the same tokens in every cell
    global_batch: int = 64  # sequences per step
    seq_len: int = 64
    repeats: int = 20  # profiler rounds per unit


FULL = Setup("deep", 8, (2, 4, 8, 16, 32), 64)
QUICK = Setup("tiny", 4, (2, 4), 6, seq_len=32, repeats=3)


def schedules_of(setup: Setup) -> tuple[str, ...]:
    """The schedules the setup measures: interleaving needs a unit for each of its 2P stages."""
    units = num_units(dataclasses.replace(PRESETS[setup.preset], vocab_size=VOCAB))
    return tuple(name for name in SCHEDULES if name != "interleaved-1f1b" or units >= CHUNKS * setup.stages)


def plan(setup: Setup, m: int, cells: Cells, chunks: int = 1) -> dict:
    """Profile the units at micro-batch size global_batch/m (one thread), split them into `chunks`
    x P stages, and turn the split into the simulator's cost model (cached as the cell costs-m<m>,
    or costs-m<m>-v<chunks>)."""
    name = f"costs-m{m}" + (f"-v{chunks}" if chunks > 1 else "")
    cached = cells.get(name)
    if cached is not None:
        return cached
    config = dataclasses.replace(PRESETS[setup.preset], vocab_size=VOCAB)
    batch = setup.global_batch // m
    if chunks > 1:  # the same profile as the one-stage-per-rank schedules, cut finer
        profiles = [UnitProfile(**p) for p in plan(setup, m, cells)["profiles"]]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            profiles = profile_units(config, batch, setup.seq_len, "cpu", repeats=setup.repeats)
        finally:
            torch.set_num_threads(threads)
    stages = chunks * setup.stages
    inflight, copies = stage_memory_model("paci", stages, m)  # no budget on CPU: only times matter
    split = partition(profiles, stages, inflight, copies)
    message = batch * setup.seq_len * config.n_embd * 4  # one float32 activation (or its gradient)
    costs = stage_costs(profiles, split.ranges, message_bytes=message)
    return cells.put(name, {"microbatch_size": batch, "split": split.spec, "costs": costs.as_dict(),
                            "activation_shape": [batch, setup.seq_len, config.n_embd],
                            "profiles": [dataclasses.asdict(p) for p in profiles]})


def run_cells(setup: Setup, plans: dict[tuple[int, int], dict], cells: Cells) -> None:
    """Run every (m, schedule) cell not cached yet, all in one spawned process group."""
    todo = [(m, name) for m in setup.microbatches for name in schedules_of(setup)
            if cells.get(f"m{m}-{name}") is None]
    if not todo:
        return
    benches = []
    for m, name in todo:
        chunks = CHUNKS if name == "interleaved-1f1b" else 1
        cost_plan = plans[m, chunks]
        benches.append(RuntimeBench.from_cost_model(name, m, setup.steps, None, CostModel.from_dict(cost_plan["costs"]),
                                                    cost_plan["activation_shape"], timeout_s=120.0,
                                                    chunks=chunks if chunks > 1 else None))
    print(f"running {len(todo)} cells on {setup.stages} ranks ...", flush=True)
    code = spawn(_rank, (benches, [f"m{m}-{name}" for m, name in todo], cells), setup.stages, threads=1)
    if code != 0:
        raise SystemExit(f"the runtime failed (exit code {code}); the finished cells are kept, run again to resume")


def _rank(payload) -> int:
    """One rank: run the benches in order in one process group; rank 0 stores each result.

    A short unrecorded run goes first: the first exchanges of a fresh process group are slow.
    """
    benches, names, cells = payload
    run_bench_rank(dataclasses.replace(benches[0], num_steps=2))
    for bench, name in zip(benches, names):
        result = run_bench_rank(bench)
        if result is not None:
            cells.put(name, result)
    return 0


def rows(setup: Setup, plans: dict[tuple[int, int], dict], cells: Cells) -> list[dict]:
    """One row per (m, schedule): tokens/s measured and predicted, and both relative to PACI's."""
    out = []
    for m in setup.microbatches:
        tokens = plans[m, 1]["microbatch_size"] * setup.seq_len  # per micro-batch
        paci = cells.get(f"m{m}-paci")
        bubble_model = {name: m / (m + setup.stages - 1) for name in FLUSHED} | {"paci": 1.0} | \
            {"interleaved-1f1b": CHUNKS * m / (CHUNKS * m + setup.stages - 1)}
        for name in schedules_of(setup):
            r = cells.get(f"m{m}-{name}")
            out.append({"m": m, "schedule": name, "measured": r["throughput_mb_per_s"] * tokens,
                        "predicted": r["planned_throughput_mb_per_s"] * tokens,
                        "ratio": r["throughput_mb_per_s"] / r["planned_throughput_mb_per_s"],
                        "fitted": 1 / r["makespan_ratio"],  # vs the simulator fed with the measured op times
                        "relative": r["throughput_mb_per_s"] / paci["throughput_mb_per_s"],
                        "relative_predicted": r["planned_throughput_mb_per_s"] / paci["planned_throughput_mb_per_s"],
                        "theory": bubble_model.get(name)})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| m | schedule | measured tok/s | predicted tok/s | measured/predicted | measured/op-mean sim "
             "| vs PACI measured | vs PACI predicted | m/(m+P−1) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        theory = "" if r["theory"] is None else f"{r['theory']:.3f}"
        lines.append(f"| {r['m']} | {r['schedule']} | {r['measured']:,.0f} | {r['predicted']:,.0f} | {r['ratio']:.3f} "
                     f"| {r['fitted']:.3f} | {r['relative']:.3f} | {r['relative_predicted']:.3f} | {theory} |")
    return "\n".join(lines)


def plot(setup: Setup, table: list[dict], path: Path) -> None:
    """Left: tokens/s against m, measured (solid) and predicted (dashed); right: relative to PACI
    with the bubble model m/(m+P-1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    ms = list(setup.microbatches)
    for index, name in enumerate(schedules_of(setup)):
        picked = [r for r in table if r["schedule"] == name]
        color = f"C{index}"
        left.plot(ms, [r["measured"] for r in picked], "o-", color=color, label=f"{name} measured")
        left.plot(ms, [r["predicted"] for r in picked], "--", color=color, alpha=0.6, label=f"{name} predicted")
        if name != "paci":
            right.plot(ms, [r["relative"] for r in picked], "o-", color=color, label=f"{name}/PACI measured")
            right.plot(ms, [r["relative_predicted"] for r in picked], "--", color=color, alpha=0.6,
                       label=f"{name}/PACI predicted")
    fine = [ms[0] * (ms[-1] / ms[0]) ** (i / 100) for i in range(101)]
    right.plot(fine, [m / (m + setup.stages - 1) for m in fine], "k:", label="m/(m+P−1)")
    for ax, ylabel in ((left, "tokens/s"), (right, "throughput relative to PACI")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel(f"micro-batches per step m (global batch {setup.global_batch} sequences)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=7)
    right.set_ylim(0, 1.1)
    fig.suptitle(f"{setup.preset} GPT, P = {setup.stages}, synthetic stages with profiled costs, gloo")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, P = 4, two m, 6 steps (seconds)")
    parser.add_argument("--out", type=Path, help="cell folder (default runs/throughput, runs/throughput-quick)")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    out = args.out or Path("runs/throughput-quick" if args.quick else "runs/throughput")
    cells = Cells(out, dataclasses.asdict(setup))
    start, cpu = time.monotonic(), cpu_seconds()
    chunks = (1, CHUNKS) if "interleaved-1f1b" in schedules_of(setup) else (1,)
    plans = {(m, v): plan(setup, m, cells, v) for m in setup.microbatches for v in chunks}
    run_cells(setup, plans, cells)
    table = rows(setup, plans, cells)
    text = markdown(table)
    plot(setup, table, out / "throughput.png")
    (out / "table.md").write_text(text + "\n")
    print(f"machine: {machine()}")
    print(f"{setup.preset} GPT (vocab {VOCAB}), P = {setup.stages}, {setup.steps} steps of {setup.global_batch} x "
          f"{setup.seq_len} tokens; splits: " + ", ".join(f"m={m} {plans[m, 1]['split']}" for m in setup.microbatches)
          + "".join(f"; interleaved m={m} {plans[m, CHUNKS]['split']}" for m in setup.microbatches
                    if (m, CHUNKS) in plans))
    print(text)
    print(f"this invocation: {time.monotonic() - start:.0f} s wall, {cpu_seconds() - cpu:.0f} CPU-s "
          f"(cached cells cost nothing); plot {out / 'throughput.png'}")


if __name__ == "__main__":
    main()
