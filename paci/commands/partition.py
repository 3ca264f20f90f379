"""`paci partition`: profile the model's units here and print the memory-aware split beside the uniform one."""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from paci import schedules
from paci.checks import format_bytes, parse_bytes
from paci.commands import input_checked
from paci.model import PRESETS, GPTConfig, num_units, unit_names
from paci.partition import (Split, evaluate_split, partition, predicted_efficiency,
                            stage_memory_model, stage_sums, uniform_split)
from paci.profiler import UnitProfile, default_budget, profile_units
from paci.report import format_table


def add_partition_parser(subparsers) -> None:
    p = subparsers.add_parser("partition", help="profile the model's units and split them into pipeline stages",
                              description="Measure every unit's time, static and activation bytes on this "
                                          "machine, then choose the contiguous split with the fastest slowest "
                                          "stage that fits the memory budget (the PACI paper's partitioner).")
    p.add_argument("--preset", default="small", help=f"model preset: {', '.join(PRESETS)} (default small)")
    p.add_argument("--stages", type=int, default=4, help="pipeline depth P (default 4)")
    p.add_argument("--schedule", default="paci",
                   help=f"schedule whose in-flight micro-batches and weight copies set each stage's memory: "
                        f"{', '.join(schedules.REGISTRY)} (default paci)")
    p.add_argument("--microbatches", type=int, default=8,
                   help="micro-batches per mini-batch M; GPipe holds all M in flight (default 8)")
    p.add_argument("--accum", type=int, default=None, help="K, backwards per optimizer step for paci/2bw (default M)")
    p.add_argument("--microbatch-size", type=int, default=8, help="sequences per micro-batch B (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--memory-per-stage", default=None,
                   help="memory budget per stage, e.g. 24GiB, 512MiB, 1.5GB or plain bytes "
                        "(default: the device's total memory on CUDA, no limit on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=partition_command)


def partition_command(args: argparse.Namespace) -> int:
    schedules.check_one_stage_per_rank(args.schedule, "paci partition")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    seq_len = preset.block_size if args.seq_len is None else args.seq_len
    if args.microbatch_size < 1 or seq_len < 1:
        raise ValueError(f"--microbatch-size and --seq-len must be >= 1, got {args.microbatch_size} and {seq_len}")
    config = dataclasses.replace(preset, block_size=max(seq_len, preset.block_size))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = default_budget(device) if args.memory_per_stage is None else parse_bytes(args.memory_per_stage)
    # everything that can be wrong is checked before the (slow) profile
    uniform_ranges = uniform_split(num_units(config), args.stages)
    inflight, copies = stage_memory_model(args.schedule, args.stages, args.microbatches, args.accum)
    input_checked()  # profile_units refuses a micro-batch too large for this machine before it logs
    profiles = profile_units(config, args.microbatch_size, seq_len, device)
    splits = {"profiled": partition(profiles, args.stages, inflight, copies, budget),
              "uniform": evaluate_split(profiles, uniform_ranges, inflight, copies, budget)}
    efficiency = {name: predicted_efficiency(stage_sums([u.forward_s for u in profiles], split.ranges),
                                             stage_sums([u.backward_s for u in profiles], split.ranges),
                                             args.schedule, args.microbatches, args.accum)
                  for name, split in splits.items()}
    header = {"preset": args.preset, "num_units": num_units(config), "num_stages": args.stages,
              "schedule": args.schedule, "num_microbatches": args.microbatches, "accumulation": args.accum,
              "microbatch_size": args.microbatch_size, "seq_len": seq_len, "device": str(device),
              "dtype": "float32", "threads": torch.get_num_threads(), "budget_bytes": budget}
    if args.json:
        print(json.dumps(_summary(header, config, profiles, splits, efficiency), indent=1))
    else:
        _print_report(header, config, splits, efficiency)
    return 0


def _summary(header: dict, config: GPTConfig, profiles: list[UnitProfile], splits: dict[str, Split],
             efficiency: dict[str, float]) -> dict:
    names = unit_names(config)
    out = {**header, "units": [dataclasses.asdict(u) for u in profiles]}
    for key, split in splits.items():
        out[key] = {**split.as_dict(), "stage_units": [names[a:b] for a, b in split.ranges],
                    "predicted_efficiency": efficiency[key]}
    out["speedup_vs_uniform"] = splits["uniform"].max_time / splits["profiled"].max_time
    return out


def _print_report(header: dict, config: GPTConfig, splits: dict[str, Split], efficiency: dict[str, float]) -> None:
    h = header
    accum = "M" if h["accumulation"] is None else h["accumulation"]
    print(f"{h['preset']} ({h['num_units']} units), P={h['num_stages']}, {h['schedule']} M={h['num_microbatches']} "
          f"K={accum}, micro-batch {h['microbatch_size']}x{h['seq_len']} tokens, {h['device']} {h['dtype']}, "
          f"{h['threads']} threads, budget per stage {format_bytes(h['budget_bytes'])}")
    for key, split in splits.items():
        print(f"\n{key} split {split.spec}")
        print(_stage_table(split, unit_names(config)))
        fits = "fits the budget" if split.feasible else (
            f"DOES NOT FIT: stage {split.overshoot_stage} is over by {format_bytes(max(split.overshoot))}")
        print(f"bottleneck: stage {split.bottleneck} at {1e3 * split.max_time:.3f} ms | predicted efficiency "
              f"{efficiency[key]:.1%} | {fits}")
    profiled, uniform = splits["profiled"], splits["uniform"]
    print(f"\nslowest stage: profiled {1e3 * profiled.max_time:.3f} ms vs uniform {1e3 * uniform.max_time:.3f} ms "
          f"-> {uniform.max_time / profiled.max_time:.2f}x (predicted from the profile)")
    if not profiled.feasible:
        print(f"no split fits the budget, so the profiled split minimises the overshoot first: "
              f"{format_bytes(max(profiled.overshoot))} vs {format_bytes(max(uniform.overshoot))} for uniform")
    print("efficiency = 1 - steady bubble of the schedule simulated with these per-stage forward/backward times")


def _stage_table(split: Split, names: list[str]) -> str:
    rows = []
    for j, (a, b) in enumerate(split.ranges):
        label = names[a] if b - a == 1 else f"{names[a]}..{names[b - 1]}"
        rows.append({"stage": j, "units": f"{a}:{b}", "names": label, "ms": 1e3 * split.stage_time[j],
                     "bytes": format_bytes(split.stage_bytes[j]), "inflight": split.inflight[j],
                     "copies": split.copies[j], "over": format_bytes(split.overshoot[j]) if split.overshoot[j] else ""})
    columns = [("stage", "stage", "d"), ("units", "units", "s"), ("names", "names", "s"),
               ("ms", "fwd+bwd ms", ".3f"), ("inflight", "in-flight", "d"), ("copies", "weight copies", "d"),
               ("bytes", "peak bytes", "s"), ("over", "over budget", "s")]
    return format_table(rows, columns)
