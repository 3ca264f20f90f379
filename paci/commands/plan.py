"""`paci plan`: rank every schedule, m, chunks and recompute setting for a model on P ranks, by the simulator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from paci import schedules
from paci.checks import check_integer, parse_bytes
from paci.commands import input_checked
from paci.files import check_writable
from paci.model import PRESETS


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="the fastest configuration that fits: every schedule, m, chunks and "
                                           "recompute, simulated",
                              description="Profile the model's units here (per micro-batch size), then simulate "
                                          "every registered schedule x m (divisors of the global batch) x chunks "
                                          "x recompute with the partitioner's best split for each, and rank them "
                                          "by time per step; memory that does not fit the budget ranks last. The "
                                          "quality-risk column is the rule measured in docs/experiments.md.")
    p.add_argument("--preset", default="small", help=f"model preset: {', '.join(PRESETS)} (default small)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--stages", type=int, default=4, help="pipeline depth P: ranks, one device each (default 4)")
    p.add_argument("--global-batch", type=int, default=64,
                   help="sequences per optimizer step, G; m runs over its divisors (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--costs", default=None, metavar="FILE",
                   help="per-unit costs and the link from a JSON file instead of profiling here (a machine not at "
                        "hand: configs/costs/); its memory_per_device is the default budget")
    p.add_argument("--memory-per-device", default=None,
                   help="memory budget per rank, e.g. 24GiB (default: none, every candidate fits)")
    p.add_argument("--schedules", default=None,
                   help=f"comma-separated schedules to consider (default all: {', '.join(schedules.REGISTRY)})")
    p.add_argument("--no-recompute", action="store_true", help="leave out the candidates with --recompute")
    p.add_argument("--optimizer", default="muon",
                   help="the optimizer whose step is timed per unit: muon (paci train's default) or adamw")
    p.add_argument("--latency-us", type=float, default=0.0,
                   help="link latency per message between ranks, microseconds (default 0)")
    p.add_argument("--bandwidth-gbps", type=float, default=None,
                   help="link bandwidth, GB/s (default: unlimited)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank for the profile (default: this machine's cores split over P ranks)")
    p.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    p.add_argument("--json", action="store_true", help="print every candidate as one JSON object")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="draw time per step against peak memory, every candidate and the frontier")
    p.set_defaults(func=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    import paci.planner as planner

    from paci.config import MAX_THREADS, ModelConfig

    ModelConfig(preset=args.preset, vocab_size=args.vocab_size)  # checks both
    if args.plot is not None:
        check_writable(args.plot, "--plot")
        if args.plot.suffix != ".png":
            raise ValueError(f"--plot {args.plot}: use a .png file name")
    for flag, value in (("--stages", args.stages), ("--global-batch", args.global_batch), ("--top", args.top),
                        ("--threads", args.threads), ("--seq-len", args.seq_len)):
        if value is not None:
            check_integer(flag, value)
    if args.threads is not None and args.threads > MAX_THREADS:
        raise ValueError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    if not args.latency_us >= 0 or args.latency_us == float("inf"):
        raise ValueError(f"--latency-us must be a finite number >= 0, got {args.latency_us}")
    if args.bandwidth_gbps is not None and not 0 < args.bandwidth_gbps < float("inf"):
        raise ValueError(f"--bandwidth-gbps must be a finite number > 0, got {args.bandwidth_gbps}")
    names = None if args.schedules is None else [n.strip() for n in args.schedules.split(",") if n.strip()]
    latency, bandwidth = args.latency_us * 1e-6, (float("inf") if args.bandwidth_gbps is None
                                                  else args.bandwidth_gbps * 1e9)
    profiles, per_token, source = None, None, planner.PROFILED_HERE
    if args.costs is not None:
        source = f"the per-unit costs in {args.costs}"
        config = dataclasses.replace(PRESETS[args.preset], vocab_size=args.vocab_size)
        costs = planner.CostFile.read(args.costs, config)
        profiles, per_token = costs.profiles, costs.message_bytes_per_token
        latency = latency if args.latency_us else costs.latency_s
        bandwidth = bandwidth if args.bandwidth_gbps is not None else costs.bandwidth_Bps
        args.memory_per_device = args.memory_per_device or costs.memory_per_device
        args.seq_len = args.seq_len or costs.seq_len
    budget = None if args.memory_per_device is None else parse_bytes(args.memory_per_device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.stages))
    result = planner.plan(args.preset, args.stages, args.global_batch, args.seq_len, budget=budget,
                          vocab_size=args.vocab_size, schedule_names=names,
                          recompute=(False,) if args.no_recompute else (False, True), latency=latency,
                          bandwidth=bandwidth, profiles=profiles, message_bytes_per_token=per_token,
                          optimizer=args.optimizer, on_checked=input_checked)
    vocab = args.vocab_size if args.vocab_size != 4096 else None
    if args.json:
        best = {label: (c.as_dict() | {"command": c.command(args.preset, args.stages, result.seq_len, vocab,
                                                             args.memory_per_device, result.optimizer)}) if c else None
                for label, c in (("best_synchronous", result.best_where(True)),
                                 ("best_asynchronous", result.best_where(False)),
                                 ("best_asynchronous_low_risk", result.best_where(False, "low")))}
        print(json.dumps({"preset": args.preset, "num_ranks": args.stages, "global_batch": args.global_batch,
                          "seq_len": result.seq_len, "budget_bytes": budget, "threads": torch.get_num_threads(),
                          **best, "candidates": [c.as_dict() for c in result.candidates],
                          "note": planner.note(source)}, indent=1))
    if args.plot is not None:
        planner.plot_frontier(result, args.plot)
    if not args.json:
        print("\n".join(planner.format_plan(result, args.top, args.preset, vocab, args.memory_per_device, source)))
    return 0
