"""`paci bench runtime --synthetic`: the runtime's own overhead, at any depth, on any machine."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from paci import schedules
from paci.commands import input_checked
from paci.sim import CostModel

MAX_ACTIVATION_MIB = 1024


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure the runtime against the simulator")
    kinds = p.add_subparsers(dest="bench", required=True, parser_class=type(p))
    r = kinds.add_parser("runtime", help="one process per stage, compute replaced by sleeps",
                         description="Spawn one process per stage whose F/B/U sleep for the given times and "
                                     "exchange real tensors; compare the measured makespan with the prediction.")
    r.add_argument("--synthetic", action="store_true", required=True,
                   help="sleeping stages (the only kind: real compute is measured by paci train)")
    r.add_argument("--schedule", default="paci", help=f"one of: {', '.join(schedules.REGISTRY)} (default paci)")
    r.add_argument("--stages", type=int, default=8, help="pipeline depth P = processes (default 8)")
    r.add_argument("--microbatches", type=int, default=8, help="micro-batches per mini-batch M (default 8)")
    r.add_argument("--accum", type=int, help="K for paci/2bw (default M)")
    r.add_argument("--steps", type=int, default=8, help="mini-batches to run (default 8)")
    r.add_argument("--f-ms", type=float, help="forward time per micro-batch, ms (default 20)")
    r.add_argument("--b-ms", type=float, help="backward time per micro-batch, ms (default 40; W = B/2)")
    r.add_argument("--u-ms", type=float, help="optimizer step time, ms (default 0)")
    r.add_argument("--costs", type=Path, metavar="FILE",
                   help="per-stage times from a cost-model JSON in seconds (keys forward, backward and optionally "
                        "weight, update; e.g. a profiled split's costs), instead of --f-ms/--b-ms/--u-ms; the "
                        "result then also shows that model's prediction")
    r.add_argument("--activation-mib", type=float, default=1.0,
                   help="size of each activation/gradient message in MiB (default 1)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from paci.bench import RuntimeBench
    from paci.runtime.launch import spawn
    from paci.runtime.synthetic import SyntheticCosts

    schedules.check_one_stage_per_rank(args.schedule, "paci bench")
    if not 0 < args.activation_mib <= MAX_ACTIVATION_MIB:
        raise ValueError(f"--activation-mib must be in (0, {MAX_ACTIVATION_MIB}] MiB (every rank holds several such "
                         f"messages at once), got {args.activation_mib}")
    for flag, value in (("--f-ms", args.f_ms), ("--b-ms", args.b_ms), ("--u-ms", args.u_ms)):
        if value is not None and not 0 <= value < math.inf:
            raise ValueError(f"{flag} must be a finite number of milliseconds >= 0, got {value}")
    shape = (max(1, round(args.activation_mib * 2**20 / 4)),)
    if args.costs is not None:
        if any(v is not None for v in (args.f_ms, args.b_ms, args.u_ms)):
            raise ValueError("--costs gives every op time; leave out --f-ms, --b-ms and --u-ms")
        bench = RuntimeBench.from_cost_model(args.schedule, args.microbatches, args.steps, args.accum,
                                             _read_costs(args.costs), shape)
        if bench.num_stages != args.stages:
            raise ValueError(f"{args.costs} has costs for {bench.num_stages} stages; pass --stages {bench.num_stages}")
    else:
        costs = SyntheticCosts(_ms(args.f_ms, 20.0), _ms(args.b_ms, 40.0), _ms(args.u_ms, 0.0), shape)
        bench = RuntimeBench(args.schedule, args.stages, args.microbatches, args.steps, args.accum, costs)
    bench.build()  # bad sizes fail here, before any process starts
    input_checked()
    return spawn(_bench_rank, (bench, args.json), args.stages, threads=1)


def _ms(value: float | None, default: float) -> float:
    return (default if value is None else value) / 1e3


def _read_costs(path: Path) -> CostModel:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--costs {path}: cannot read a JSON cost model ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--costs {path}: expected a JSON object with per-stage 'forward' and 'backward' lists")
    try:
        return CostModel.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--costs {path}: {exc}") from None


def _bench_rank(payload) -> int:
    from paci.bench import run_bench_rank

    bench, as_json = payload
    result = run_bench_rank(bench)
    if result is not None:
        if as_json:
            print(json.dumps(result, indent=1))
        else:
            print(f"{result['schedule']}: P={result['num_stages']}, {result['num_microbatches']} micro-batches, "
                  f"K={result['accumulation']} | measured {result['measured_makespan_s']:.3f} s, predicted "
                  f"{result['predicted_makespan_s']:.3f} s (ratio {result['makespan_ratio']:.3f}) | "
                  f"{result['throughput_mb_per_s']:.2f} mb/s | bubble {result['bubble_fraction']:.1%}")
            if "planned_makespan_s" in result:
                print(f"the cost model predicted {result['planned_makespan_s']:.3f} s "
                      f"(measured/predicted {result['planned_ratio']:.3f})")
        sys.stdout.flush()
    return 0
