"""The calibrated clock: how long a schedule's steps take on a pipeline with one of this machine's
cores per stage, and a check of that clock against real runs.

Two cores cannot run eight stages of real compute at once (they would measure contention, not
bubbles), so the P = 8 experiments time their runs with the simulator fed with costs measured
here: every unit of the model profiled with one torch thread (a stage owns one core, as a stage
owns one device on a real machine) for its forward, backward, input gradient (so a split
backward's W = B - I) and AdamW step, at the micro-batch size in use; and the link between two
processes measured over gloo (a ping-pong, fitted as latency + bytes / bandwidth).

`check` runs real multi-process training at P = 2 (one thread per rank, so the two ranks own the
two cores) for each schedule the experiments use, and compares the measured makespan with the
profile's prediction for the same schedule, evaluation rounds included. The profile alone comes
out the same fraction short for every schedule (units timed one at a time on an otherwise idle
chip, against ranks that share its caches and memory and also run the executor and transport),
so the clock multiplies every compute time by one factor, measured / predicted of 1F1B-flush,
and the other schedules test it (target: within 5%). Speed-ups, which are ratios, barely depend
on the factor; the absolute seconds do.

    .venv/bin/python experiments/clock.py check [--runs 3] [--preset deep --vocab-size 1024 --microbatches 8]

Cost: about 1.5 minutes per run (four 40-step runs of the `deep` preset at P = 2), plus profiling
and the link probe.
Run it on a quiet machine: another process on these cores makes both sides of the check wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from paci import schedules
from paci.ir import Op, Schedule, with_evaluation
from paci.model import PRESETS, GPTConfig
from paci.partition import partition, split_spec, stage_memory_model
from paci.profiler import UnitProfile, profile_units, stage_costs
from paci.runtime import mesh
from paci.runtime.launch import spawn
from paci.sim import CostModel, simulate
from paci.trace import OP_CODE

LINK_SIZES = (4, 2**12, 2**15, 2**18, 2**20)  # bytes per message in the link probe
LINK_REPEATS = 40


def model_config(preset: str, vocab_size: int) -> GPTConfig:
    return dataclasses.replace(PRESETS[preset], vocab_size=vocab_size)


def unit_profiles(config: GPTConfig, batch_size: int, seq_len: int) -> list[UnitProfile]:
    """The units profiled with one thread (cached by the profiler; the caller's thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return profile_units(config, batch_size, seq_len, "cpu")
    finally:
        torch.set_num_threads(threads)


def profiled_split(config: GPTConfig, num_stages: int, batch_size: int, seq_len: int) -> list[tuple[int, int]]:
    """The partitioner's split for 1F1B/PACI at this micro-batch size (no memory limit on CPU)."""
    inflight, copies = stage_memory_model("1f1b", num_stages, num_stages)
    return list(partition(unit_profiles(config, batch_size, seq_len), num_stages, inflight, copies).ranges)


def clock_costs(config: GPTConfig, ranges: list[tuple[int, int]], batch_size: int, seq_len: int,
                link: dict[str, float], scale: float = 1.0) -> CostModel:
    """The simulator's costs of this split at this micro-batch size, on the measured link, with every
    compute time multiplied by `scale` (the calibration `check` fits)."""
    activation = batch_size * seq_len * config.n_embd * 4  # float32 hidden states between stages
    costs = stage_costs(unit_profiles(config, batch_size, seq_len), ranges,
                        message_bytes=[activation] * (len(ranges) - 1) + [0], latency=link["latency_s"],
                        bandwidth=link["bandwidth_Bps"])
    times = {name: tuple(scale * t for t in getattr(costs, name)) for name in ("forward", "backward", "weight", "update")}
    return dataclasses.replace(costs, **times)


def predicted_forwards(config: GPTConfig, ranges: list[tuple[int, int]], batch_size: int, seq_len: int,
                       schedule: Schedule, repeats: int = 30, optimizer: str = "adamw") -> dict[str, list[float]]:
    """What `--compensate predict` adds to a forward, per stage, with one thread: median seconds of a
    plain forward, of the first predicted one after an update (`optimizer`'s next step written into
    the weights, restored after; Muon orthogonalises its direction there, once per window), of a
    second predicted one and of a backward, side by side on the same stage and input; and the share
    of the stage's forwards that `schedule` predicts (those an update overtakes)."""
    from paci.data import load_data
    from paci.ir import WeightPolicy, stage_versions
    from paci.model import build_units
    from paci.runtime.stage import OptimizerSpec, Stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = load_data(None, config.vocab_size)
    spec = OptimizerSpec(lr=1e-3, warmup_steps=1, total_steps=100, name=optimizer, compensate="predict")
    batch = lambda mb: data.batch(0, mb, batch_size, seq_len)  # noqa: E731
    ahead = {"now": 0}
    out: dict[str, list[float]] = {"plain_s": [], "first_predicted_s": [], "predicted_s": [], "backward_s": [],
                                   "share": []}
    hidden = torch.randn(batch_size, seq_len, config.n_embd)
    try:
        for s, (start, stop) in enumerate(ranges):
            stage = Stage(s, len(ranges), build_units(config, 0, start, stop), policy=WeightPolicy.LIVE, optim=spec,
                          loss_scale=1.0, train_batch=batch, val_batch=batch, updates_ahead=lambda mb: ahead["now"])
            received = None if s == 0 else hidden
            grad = None if s == len(ranges) - 1 else torch.randn(batch_size, seq_len, config.n_embd)
            times: dict[object, list[float]] = {0: [], 1: [], 2: [], "b": []}
            for i in range(repeats + 3):  # the first rounds warm up (and the first U creates the optimizer's state)
                for kind in (0, 1, 2):  # plain, the window's first predicted forward, a second one
                    ahead["now"] = min(kind, 1)
                    t0 = time.perf_counter()
                    stage.forward(i * 3 + kind, None if received is None else received.clone())
                    t1 = time.perf_counter()
                    stage.backward(i * 3 + kind, grad)
                    t2 = time.perf_counter()
                    if i >= 3:
                        times[kind].append(t1 - t0)
                        times["b"].append(t2 - t1)
                stage.step()
            late = [v_b > v_f for _, v_f, v_b in stage_versions(schedule, s)]
            for key, values in (("plain_s", times[0]), ("first_predicted_s", times[1]), ("predicted_s", times[2]),
                                ("backward_s", times["b"])):
                out[key].append(float(np.median(values)))
            out["share"].append(sum(late) / len(late))
    finally:
        torch.set_num_threads(threads)
    if optimizer != "muon":  # only Muon's prediction does work once a window: AdamW's first and second cost alike
        del out["first_predicted_s"]
    return out


def update_costs(config: GPTConfig, ranges: list[tuple[int, int]], names: tuple[str, ...] = ("adamw", "muon"),
                 device: str = "cpu", repeats: int = 50) -> dict[str, list[float]]:
    """Per optimizer in `names` (OptimizerSpec's), the median seconds of one step of each stage of
    `ranges`, built as a stage builds it (Muon on the stage's hidden matrices), with gradients
    present; the optimizers step alternately on the same parameters, so load from elsewhere lands
    on all alike. One torch thread on a CPU (a stage owns one core)."""
    from paci.model import build_units
    from paci.optim import hidden_matrices
    from paci.runtime.stage import OptimizerSpec

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    out: dict[str, list[float]] = {name: [] for name in names}
    try:
        for s, (start, stop) in enumerate(ranges):
            units = [u.to(device) for u in build_units(config, 0, start, stop)]
            params = [p for u in units for p in u.parameters()]
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            hidden = hidden_matrices(units, holds_output=s == len(ranges) - 1)
            spec = OptimizerSpec(lr=1e-4, warmup_steps=1, total_steps=10 ** 6)
            optimizers = {n: dataclasses.replace(spec, name=n).build(params, hidden)[0] for n in names}
            samples: dict[str, list[float]] = {n: [] for n in names}
            for i in range(repeats + 3):  # the first rounds warm up (and create the optimizers' state)
                for n, optimizer in optimizers.items():
                    if device != "cpu":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    optimizer.step()
                    if device != "cpu":
                        torch.cuda.synchronize(device)
                    if i >= 3:
                        samples[n].append(time.perf_counter() - t0)
            for n in names:
                out[n].append(statistics.median(samples[n]))
    finally:
        torch.set_num_threads(threads)
    return out


def with_predicted_forwards(costs: CostModel, predicted: dict[str, list[float]]) -> CostModel:
    """`costs` with each stage's forward made longer by its predicted share of the measured extra,
    and, on a stage that predicts at all, its update by what the window's first predicted forward
    costs beyond the others (Muon orthogonalises its predicted direction there, once a window;
    AdamW's measurements have no first_predicted_s and add nothing). The extras are taken relative
    to the plain forward measured beside them and charged in units of the clock's own forward, so
    a machine busier or quieter than when the clock was made changes neither."""
    unit = [f / q for f, q in zip(costs.forward, predicted["plain_s"])]
    first = predicted.get("first_predicted_s", predicted["predicted_s"])
    forward = tuple(f + u * share * max(0.0, p - q) for f, u, share, p, q in
                    zip(costs.forward, unit, predicted["share"], predicted["predicted_s"], predicted["plain_s"]))
    update = tuple(c + (u * max(0.0, a - p) if share else 0.0) for c, u, share, a, p in
                   zip(costs.update, unit, predicted["share"], first, predicted["predicted_s"]))
    return dataclasses.replace(costs, forward=forward, update=update)


def step_end_times(schedule: Schedule, costs: CostModel) -> list[float]:
    """Seconds from the start until every stage has finished optimizer step k, for k = 1 .. steps."""
    trace = simulate(schedule, costs).trace
    ends = []
    for stage in range(schedule.num_stages):
        cols = trace.columns(stage)
        ends.append(cols.end[cols.op == OP_CODE[Op.U]])
    return np.max(np.stack(ends), axis=0).tolist()


# ----------------------------------------------------------------------------------------------
# The link: a gloo ping-pong between two local processes


def measure_link(sizes: tuple[int, ...] = LINK_SIZES, repeats: int = LINK_REPEATS) -> dict[str, float]:
    """One-way time of a message of b bytes as latency + b / bandwidth: the latency is the smallest
    message's time, the bandwidth what the largest message adds to it (medians of `repeats`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "link.json"
        if spawn(_ping_pong, (sizes, repeats, str(out)), 2, threads=1) != 0:
            raise RuntimeError("the link probe failed (see the rank errors above)")
        one_way = json.loads(out.read_text())
    extra = one_way[-1] - one_way[0]
    return {"latency_s": one_way[0], "bandwidth_Bps": (sizes[-1] - sizes[0]) / extra if extra > 0 else math.inf,
            "sizes": list(sizes), "one_way_s": one_way}


def _ping_pong(payload: tuple[tuple[int, ...], int, str]) -> int:
    sizes, repeats, out = payload
    mesh.join(torch.device("cpu"), 60)
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    one_way = []
    for size in sizes:
        buf = torch.zeros(max(1, size // 4))
        samples = []
        for i in range(repeats + 5):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
            if i >= 5:
                samples.append((time.perf_counter() - start) / 2)
        one_way.append(float(np.median(samples)))
    if rank == 0:
        Path(out).write_text(json.dumps(one_way))
    return 0


# ----------------------------------------------------------------------------------------------
# The check against real runs at P = 2


CHECKED = ("1f1b", "gpipe", "zb-h1", "paci")


def check(preset: str, vocab_size: int, microbatches: int, batch_size: int, steps: int, seq_len: int,
          link: dict[str, float], runs: int = 1) -> list[dict]:
    """Per schedule: measured makespan of a real P = 2 run (the median of `runs`, the schedules'
    order rotated every round so that none always runs first), the profile's prediction, the
    calibrated prediction (times the first schedule's measured / predicted) and the ratios."""
    config = model_config(preset, vocab_size)
    ranges = profiled_split(config, 2, batch_size, seq_len)
    costs = clock_costs(config, ranges, batch_size, seq_len, link)
    measured: dict[str, list[float]] = {name: [] for name in CHECKED}
    for round_ in range(runs):
        for name in CHECKED[round_ % len(CHECKED):] + CHECKED[:round_ % len(CHECKED)]:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "paci", "train", "--nproc", "2", "--threads", "1", "--preset", preset,
                       "--vocab-size", str(vocab_size), "--schedule", name, "--microbatches", str(microbatches),
                       "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(steps),
                       "--eval-every", str(steps), "--eval-batches", "1", "--split", split_spec(ranges),
                       "--out", str(Path(tmp) / "run"), "--json", "--checkpoint-every", "0"]  # as simulated: no drains
                summary = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            measured[name].append(summary["measured_makespan_s"])
    rows = []
    for name in CHECKED:
        predicted = simulate(with_evaluation(schedules.build(name, 2, microbatches, steps), steps, 1), costs)
        median = statistics.median(measured[name])
        rows.append({"schedule": name, "measured_s": median, "runs_s": measured[name],
                     "predicted_s": predicted.metrics.makespan, "ratio": median / predicted.metrics.makespan})
    scale = rows[0]["ratio"]
    for row in rows:
        row.update(calibrated_s=scale * row["predicted_s"], calibrated_ratio=row["ratio"] / scale, scale=scale)
    return rows


def check_table(rows: list[dict]) -> list[str]:
    base = rows[0]
    lines = [f"| schedule | measured makespan | profile's prediction | measured / predicted | calibrated (x "
             f"{base['scale']:.3f}) | measured / calibrated | speed vs {base['schedule']}: measured | predicted |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['schedule']} | {row['measured_s']:.2f} s | {row['predicted_s']:.2f} s | "
                     f"{row['ratio']:.3f} | {row['calibrated_s']:.2f} s | {row['calibrated_ratio']:.3f} | "
                     f"{base['measured_s'] / row['measured_s']:.3f} | {base['predicted_s'] / row['predicted_s']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "link"])
    parser.add_argument("--preset", default="deep")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--runs", type=int, default=1, help="runs per schedule (median; order rotated per round)")
    args = parser.parse_args()
    if args.command == "link":
        print(json.dumps(measure_link(), indent=1))
        return
    from common import machine

    started = time.perf_counter()
    rows = check(args.preset, args.vocab_size, args.microbatches, args.batch_size, args.steps, args.seq_len,
                 measure_link(), args.runs)
    print(f"machine: {machine()}")
    print(f"P = 2 processes x 1 thread, {args.preset} (vocab {args.vocab_size}), m = {args.microbatches} x "
          f"({args.batch_size}x{args.seq_len} tokens), {args.steps} steps, median of {args.runs} run(s), gloo; wall {time.perf_counter() - started:.0f} s")
    print("\n".join(check_table(rows)))


if __name__ == "__main__":
    main()
