"""Profiled vs uniform split on the `small` preset: the measured forward+backward time of every stage.

The partitioner predicts each stage's time as the sum of its units' profiled times. This script
checks the claim that matters by measurement: it builds every stage of both splits as the
runtime does (the stage's units in sequence, a received activation that wants its gradient, the
loss on the last stage), runs forward + backward with a random output gradient, and takes the
median over repeats. The two splits are measured interleaved, stage by stage, in one run, so
machine noise hits both alike; each timed run follows an untimed one of the same stage, so its
caches are as warm as on a stage's own device. In a bubble-free PACI pipe the slowest stage sets the period, so
slowest-uniform / slowest-profiled is the throughput gain of the profiled split.

    .venv/bin/python benchmarks/partition_split.py [--repeats 100] [--threads N]

On CPU, glibc's malloc returns the head's 8 MiB logits buffers to the kernel and faults them back
in at a varying rate, which makes the head's time bimodal (about 10 vs 15 ms on a 2-core box).
For stable numbers keep freed memory in the process:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 .venv/bin/python benchmarks/partition_split.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from paci.model import PRESETS, build_units, lm_loss, num_units, unit_names
from paci.partition import evaluate_split, partition, stage_memory_model, uniform_split
from paci.profiler import profile_units
from paci.report import format_table

PRESET, BATCH, SEQ, STAGES, SCHEDULE, MICROBATCHES = "small", 8, 64, 4, "paci", 8


def stage_inputs(config, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The input of every unit for one micro-batch: tokens for unit 0, then each unit's output."""
    inputs = [tokens]
    with torch.no_grad():
        for unit in build_units(config, seed=0)[:-1]:
            inputs.append(unit(inputs[-1]))
    return inputs


def make_stage(config, start: int, stop: int, inputs: list[torch.Tensor], targets: torch.Tensor):
    """One forward+backward of the stage [start, stop), as a closure returning nothing."""
    module = nn.Sequential(*build_units(config, seed=0, start=start, stop=stop))
    x = inputs[start]
    last = stop == num_units(config)
    grad = None if last else torch.randn(BATCH, SEQ, config.n_embd, generator=torch.Generator().manual_seed(start))

    def step() -> None:
        received = x.detach().requires_grad_(True) if x.is_floating_point() else x
        out = module(received)
        if last:
            lm_loss(out, targets).backward()
        else:
            out.backward(grad)

    return step


def measure(runs: dict, repeats: int) -> dict[tuple[str, int], list[float]]:
    """Seconds of every run, `repeats` rounds after 3 warm-up rounds; a round runs each stage once."""
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for r in range(3 + repeats):  # interleaved: every stage of both splits once per round
        for key, step in runs.items():
            step()  # untimed: warms the caches with this stage's weights, as a stage's own device would be
            t0 = time.perf_counter()
            step()
            if r >= 3:
                times[key].append(time.perf_counter() - t0)
    return times


def report(config, splits: dict, times: dict[tuple[str, int], list[float]], repeats: int) -> None:
    names = unit_names(config)
    rows, slowest = [], {}
    for name, split in splits.items():
        measured = [statistics.median(times[(name, j)]) for j in range(STAGES)]
        slowest[name] = max(measured)
        for j, (a, b) in enumerate(split.ranges):
            rows.append({"split": name, "stage": j, "units": f"{a}:{b} {names[a]}..{names[b - 1]}",
                         "predicted": 1e3 * split.stage_time[j], "measured": 1e3 * measured[j],
                         "mark": "slowest" if measured[j] == slowest[name] else ""})
    print(format_table(rows, [("split", "split", "s"), ("stage", "stage", "d"), ("units", "units", "s"),
                              ("predicted", "profile ms", ".3f"), ("measured", "measured ms", ".3f"),
                              ("mark", "", "s")]))
    # paired per round: the slowest stage of each split in the same round, so slow drifts in load cancel
    period = {name: [max(times[(name, j)][r] for j in range(STAGES)) for r in range(repeats)] for name in splits}
    q1, mid, q3 = statistics.quantiles([u / p for u, p in zip(period["uniform"], period["profiled"])], n=4)
    print(f"slowest stage fwd+bwd (median of {repeats}): uniform {1e3 * slowest['uniform']:.3f} ms, "
          f"profiled {1e3 * slowest['profiled']:.3f} ms -> uniform/profiled = "
          f"{slowest['uniform'] / slowest['profiled']:.2f}x (per-round paired ratio: median {mid:.2f}x, "
          f"quartiles {q1:.2f}-{q3:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds (median); default 100")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = PRESETS[PRESET]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    tuned = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    print(f"malloc: {' '.join(f'{k}={v}' for k, v in tuned.items()) or 'glibc defaults'}")
    print(f"{PRESET}: vocab {config.vocab_size}, micro-batch {BATCH}x{SEQ}, {num_units(config)} units, "
          f"P={STAGES}, {SCHEDULE}")
    profiles = profile_units(config, BATCH, SEQ, "cpu", cache=False)
    inflight, copies = stage_memory_model(SCHEDULE, STAGES, MICROBATCHES)
    splits = {"profiled": partition(profiles, STAGES, inflight, copies),
              "uniform": evaluate_split(profiles, uniform_split(num_units(config), STAGES), inflight, copies)}
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(config.vocab_size, (BATCH, SEQ), generator=g) for _ in range(2))
    inputs = stage_inputs(config, tokens)
    runs = {(name, j): make_stage(config, a, b, inputs, targets)
            for name, split in splits.items() for j, (a, b) in enumerate(split.ranges)}
    report(config, splits, measure(runs, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
