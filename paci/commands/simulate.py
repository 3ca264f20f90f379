"""`paci schedules` and `paci simulate`: list the schedules; predict time, bubble, memory and drift."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paci import ir, schedules
from paci.files import check_writable, write_text
from paci.report import format_table, render_png, render_text, write_chrome_trace
from paci.sim import Simulation, check_size, parse_costs, simulate


def add_schedules_parser(subparsers) -> None:
    p = subparsers.add_parser("schedules", help="list the registered schedules")
    p.set_defaults(func=schedules_command)


def schedules_command(args: argparse.Namespace) -> int:
    width = max(map(len, schedules.REGISTRY))
    for name, entry in schedules.REGISTRY.items():
        print(f"{name:<{width}}  {entry.summary}")
    return 0



def add_simulate_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="predict time, bubble, memory and weight drift of a schedule",
                              description="Simulate a schedule under a cost model; nothing is trained.")
    p.add_argument("--schedule", default="paci", help=f"one of: {', '.join(schedules.REGISTRY)} (default paci)")
    p.add_argument("--stages", type=int, default=4, help="pipeline depth P: ranks (default 4)")
    p.add_argument("--chunks", type=int, default=None,
                   help="stages per rank for interleaved-1f1b (default 2): the model cut into chunks x P stages")
    p.add_argument("--microbatches", type=int, default=8,
                   help="micro-batches per mini-batch M; flush schedules step once per M (default 8)")
    p.add_argument("--accum", type=int, default=None,
                   help="K, backwards per optimizer step for paci/2bw (default: M)")
    p.add_argument("--steps", type=int, default=4, help="mini-batches to run; M*steps micro-batches in all (default 4)")
    p.add_argument("--checkpoint-every", type=int, default=0, dest="checkpoint_every",
                   help="add paci train's drain points every N optimizer steps and report what they cost")
    p.add_argument("--sync-steps", type=int, default=0, dest="sync_steps",
                   help="run an asynchronous schedule's first N optimizer steps as 1F1B-flush (as paci train does)")
    p.add_argument("--costs", default="1,2", help="F,B[,W] op times, same on every stage (default 1,2; W = B/2); "
                                                  "with --chunks v, each of a rank's v stages takes 1/v of them")
    p.add_argument("--csv", type=Path, help="simulate a torch.distributed.pipelining compute-only CSV instead")
    p.add_argument("--compare", action="store_true", help="one table across all registered schedules")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--timeline", type=Path, help="write the pipeline chart to FILE.png or FILE.txt")
    p.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace JSON to FILE")
    p.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    for flag, path in (("--timeline", args.timeline), ("--trace", args.trace)):
        if path is not None:  # before anything is simulated or written
            check_writable(path, flag)
    if args.timeline is not None and args.timeline.suffix not in (".png", ".txt"):
        raise ValueError(f"--timeline {args.timeline}: use a .png or .txt file name")
    if args.compare:
        return _compare(args)
    if args.csv is not None:
        if args.checkpoint_every:
            raise ValueError("--checkpoint-every needs a registered --schedule, not a --csv")
        schedule = ir.from_csv(_read_text(args.csv), name=args.csv.stem)
    else:
        schedule = schedules.build(args.schedule, args.stages, args.microbatches, args.steps, args.accum,
                                   args.checkpoint_every, args.chunks, args.sync_steps)
    check_size(schedule)
    costs = parse_costs(args.costs, schedule.num_stages, schedule.stages_per_rank)
    result = simulate(schedule, costs)
    drains = _drain_cost(args, result, costs) if args.checkpoint_every else None
    if args.timeline is not None:
        _write_timeline(result, args.timeline)
    if args.trace is not None:
        write_chrome_trace(result.trace, args.trace)
    if args.json:
        print(json.dumps({**_summary(schedule, result), **(drains or {})}, indent=1))
    else:
        _print_simulation(schedule, result)
        if drains is not None:
            print(f"drain points every {args.checkpoint_every} steps ({drains['drains']} in the run): makespan "
                  f"+{drains['drain_cost_fraction']:.2%} over the schedule without them")
    return 0


def _drain_cost(args: argparse.Namespace, drained: Simulation, costs) -> dict:
    """What `paci train --checkpoint-every` costs this schedule: the makespan with drain points
    against the same schedule without them (each costs one fill and drain of the pipeline)."""
    schedule = schedules.build(args.schedule, args.stages, args.microbatches, args.steps, args.accum,
                               chunks=args.chunks)
    plain = simulate(schedule, costs)
    return {"drains": (schedule.num_steps - 1) // args.checkpoint_every,
            "drain_cost_fraction": drained.metrics.makespan / plain.metrics.makespan - 1}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.stat().st_size > ir.MAX_CSV_CHARS:
        raise ValueError(f"--csv {path} has {path.stat().st_size:,} bytes; paci reads schedule CSVs of at most "
                         f"{ir.MAX_CSV_CHARS:,} (about 4 M actions)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--csv {path} is not UTF-8 text ({err.reason} at byte {err.start}): give a "
                         "torch.distributed.pipelining CSV") from None


def _write_timeline(result: Simulation, path: Path) -> None:
    if path.suffix == ".png":
        render_png(result.trace, path, title=f"{result.trace.name} (simulated)")
    else:
        write_text(path, render_text(result.trace) + "\n")


def _summary(schedule: ir.Schedule, result: Simulation) -> dict:
    return {"schedule": schedule.name, "num_stages": schedule.num_stages, "num_ranks": schedule.ranks,
            "num_microbatches": schedule.num_microbatches, "accumulation": schedule.accumulation,
            "num_steps": schedule.num_steps, "weight_policy": schedule.weight_policy.value, **result.as_dict()}


def _print_simulation(schedule: ir.Schedule, result: Simulation) -> None:
    m = result.metrics
    steady = "-" if m.steady_bubble_fraction is None else f"{m.steady_bubble_fraction:.1%}"
    layout = f"P={schedule.ranks}" + (f" x {schedule.stages_per_rank} stages per rank" if schedule.stages_per_rank > 1
                                      else "")
    print(f"{schedule.name}: {layout}, {schedule.num_microbatches} micro-batches, "
          f"K={schedule.accumulation}, {schedule.num_steps} steps, weights {schedule.weight_policy.value}")
    print(f"makespan {m.makespan:g} | bubble {m.bubble_fraction:.1%} | steady bubble {steady} | "
          f"throughput {m.throughput:.4g} mb/unit | max Δ {m.max_drift}")
    per_rank = schedule.stages_per_rank > 1  # peak bytes are then a rank's, not a stage's
    rows = [{"stage": s, "busy": st.busy, "idle": st.idle, "max_drift": st.max_drift,
             "hist": " ".join(f"{d}:{n}" for d, n in st.drift_histogram.items()),
             "inflight": st.peak_inflight, "copies": st.weight_copies, "bytes": 0.0 if per_rank else result.peak_bytes[s]}
            for s, st in enumerate(m.per_stage)]
    print(format_table(rows, [("stage", "stage", "d"), ("busy", "busy", "g"), ("idle", "idle", "g"),
                              ("max_drift", "max Δ", "d"), ("hist", "Δ histogram", "s"),
                              ("inflight", "peak in-flight", "d"), ("copies", "weight copies", "d")]
                       + ([] if per_rank else [("bytes", "peak bytes", "g")])))
    if per_rank:
        print("peak bytes per rank: " + ", ".join(f"{b:g}" for b in result.peak_bytes))


def _compare(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--csv", args.csv), ("--checkpoint-every", args.checkpoint_every),
                                      ("--timeline", args.timeline), ("--trace", args.trace)) if value]
    if given:
        raise ValueError(f"--compare prints one table of the registered schedules; drop {', '.join(given)}")
    # the reference: bad sizes fail here, before anything is simulated
    base_schedule = schedules.build("1f1b", args.stages, args.microbatches, args.steps)
    check_size(base_schedule)
    costs = parse_costs(args.costs, args.stages)
    base = simulate(base_schedule, costs)
    results: dict[str, Simulation | str] = {}
    for name in schedules.REGISTRY:
        try:
            schedule = schedules.build(name, args.stages, args.microbatches, args.steps, args.accum,
                                       chunks=args.chunks if name == "interleaved-1f1b" else None)
        except ValueError as exc:  # e.g. 2bw with K < P-1, pipedream with --accum: skip, say why
            results[name] = str(exc)
            continue
        if schedule.stages_per_rank > 1:  # the same model on the same ranks, cut into v times more stages
            results[name] = simulate(schedule, parse_costs(args.costs, schedule.num_stages, schedule.stages_per_rank))
        else:
            results[name] = base if name == "1f1b" and args.accum is None else simulate(schedule, costs)
    rows = []
    for name, result in results.items():
        if isinstance(result, str):
            rows.append({"schedule": name, "note": result})
            continue
        m = result.metrics
        rows.append({"schedule": name, "bubble": m.bubble_fraction, "steady_bubble": m.steady_bubble_fraction,
                     "throughput_vs_1f1b": m.throughput / base.metrics.throughput,
                     "peak_bytes_vs_1f1b": max(result.peak_bytes) / max(base.peak_bytes),
                     "max_drift": m.max_drift, "extra_weight_copies": max(s.weight_copies for s in m.per_stage),
                     "note": ""})
    if args.json:
        print(json.dumps({"num_stages": args.stages, "num_microbatches": args.microbatches,
                          "num_steps": args.steps, "costs": args.costs, "schedules": rows}, indent=1))
        return 0
    print(f"P={args.stages}, M={args.microbatches}, {args.steps} steps, costs F,B[,W]={args.costs}; "
          "peak bytes = max over stages")
    print(format_table(rows, [("schedule", "schedule", "s"), ("bubble", "bubble", ".1%"),
                              ("steady_bubble", "steady", ".1%"),
                              ("throughput_vs_1f1b", "throughput/1f1b", ".3f"),
                              ("peak_bytes_vs_1f1b", "peak bytes/1f1b", ".3f"), ("max_drift", "max Δ", "d"),
                              ("extra_weight_copies", "weight copies", "d"), ("note", "note", "s")]))
    return 0
