"""The `paci` command line. The only module that parses argv, prints results or configures logging.

Each subcommand has an `add_<name>_parser(subparsers)` and a `<name>_command(args) -> int`.
Bad input anywhere below raises ValueError/OSError; `main` turns it into one line on stderr and
exit code 2, never a traceback (set PACI_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from paci import ir, schedules
from paci.report import format_table, plot_curves, render_png, render_text, write_chrome_trace
from paci.sim import CostModel, Simulation, parse_costs, simulate

log = logging.getLogger("paci")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit code 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# paci schedules


def add_schedules_parser(subparsers) -> None:
    p = subparsers.add_parser("schedules", help="list the registered schedules")
    p.set_defaults(func=schedules_command)


def schedules_command(args: argparse.Namespace) -> int:
    width = max(map(len, schedules.REGISTRY))
    for name, entry in schedules.REGISTRY.items():
        print(f"{name:<{width}}  {entry.summary}")
    return 0


# ----------------------------------------------------------------------------------------------
# paci simulate


def add_simulate_parser(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="predict time, bubble, memory and weight drift of a schedule",
                              description="Simulate a schedule under a cost model; nothing is trained.")
    p.add_argument("--schedule", default="paci", help=f"one of: {', '.join(schedules.REGISTRY)} (default paci)")
    p.add_argument("--stages", type=int, default=4, help="pipeline depth P (default 4)")
    p.add_argument("--microbatches", type=int, default=8,
                   help="micro-batches per mini-batch M; flush schedules step once per M (default 8)")
    p.add_argument("--accum", type=int, default=None,
                   help="K, backwards per optimizer step for paci/2bw (default: M)")
    p.add_argument("--steps", type=int, default=4, help="mini-batches to run; M*steps micro-batches in all (default 4)")
    p.add_argument("--costs", default="1,2", help="F,B[,W] op times, same on every stage (default 1,2; W = B/2)")
    p.add_argument("--csv", type=Path, help="simulate a torch.distributed.pipelining compute-only CSV instead")
    p.add_argument("--compare", action="store_true", help="one table across all registered schedules")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--timeline", type=Path, help="write the pipeline chart to FILE.png or FILE.txt")
    p.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace JSON to FILE")
    p.set_defaults(func=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args)
    if args.csv is not None:
        schedule = ir.from_csv(_read_text(args.csv), name=args.csv.stem)
    else:
        schedule = schedules.build(args.schedule, args.stages, args.microbatches, args.steps, args.accum)
    costs = parse_costs(args.costs, schedule.num_stages)
    result = simulate(schedule, costs)
    if args.timeline is not None:
        _write_timeline(result, args.timeline)
    if args.trace is not None:
        write_chrome_trace(result.trace, args.trace)
    if args.json:
        print(json.dumps(_summary(schedule, result), indent=1))
    else:
        _print_simulation(schedule, result)
    return 0


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    return path.read_text()


def _write_timeline(result: Simulation, path: Path) -> None:
    if path.suffix == ".png":
        render_png(result.trace, path, title=f"{result.trace.name} (simulated)")
    elif path.suffix == ".txt":
        path.write_text(render_text(result.trace) + "\n")
    else:
        raise ValueError(f"--timeline {path}: use a .png or .txt file name")


def _summary(schedule: ir.Schedule, result: Simulation) -> dict:
    return {"schedule": schedule.name, "num_stages": schedule.num_stages,
            "num_microbatches": schedule.num_microbatches, "accumulation": schedule.accumulation,
            "num_steps": schedule.num_steps, "weight_policy": schedule.weight_policy.value, **result.as_dict()}


def _print_simulation(schedule: ir.Schedule, result: Simulation) -> None:
    m = result.metrics
    steady = "-" if m.steady_bubble_fraction is None else f"{m.steady_bubble_fraction:.1%}"
    print(f"{schedule.name}: P={schedule.num_stages}, {schedule.num_microbatches} micro-batches, "
          f"K={schedule.accumulation}, {schedule.num_steps} steps, weights {schedule.weight_policy.value}")
    print(f"makespan {m.makespan:g} | bubble {m.bubble_fraction:.1%} | steady bubble {steady} | "
          f"throughput {m.throughput:.4g} mb/unit | max Δ {m.max_drift}")
    rows = [{"stage": s, "busy": st.busy, "idle": st.idle, "max_drift": st.max_drift,
             "hist": " ".join(f"{d}:{n}" for d, n in st.drift_histogram.items()),
             "inflight": st.peak_inflight, "copies": st.weight_copies, "bytes": result.peak_bytes[s]}
            for s, st in enumerate(m.per_stage)]
    print(format_table(rows, [("stage", "stage", "d"), ("busy", "busy", "g"), ("idle", "idle", "g"),
                              ("max_drift", "max Δ", "d"), ("hist", "Δ histogram", "s"),
                              ("inflight", "peak in-flight", "d"), ("copies", "weight copies", "d"),
                              ("bytes", "peak bytes", "g")]))


def _compare(args: argparse.Namespace) -> int:
    costs = parse_costs(args.costs, args.stages)
    results: dict[str, Simulation | str] = {}
    for name in schedules.REGISTRY:
        try:
            schedule = schedules.build(name, args.stages, args.microbatches, args.steps, args.accum)
        except ValueError as exc:  # e.g. 2bw with K < P-1, pipedream with --accum: skip, say why
            results[name] = str(exc)
            continue
        results[name] = simulate(schedule, costs)
    base = results["1f1b"]
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


# ----------------------------------------------------------------------------------------------
# paci train


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a GPT with a pipeline schedule (PACI by default)",
                              description="Train on the embedded Shakespeare corpus unless --data says otherwise. "
                                          "Precedence: defaults < --config TOML < flags.")
    p.add_argument("--config", type=Path, help="TOML file with [model] [data] [pipeline] [optim] [train] sections")
    p.add_argument("--preset", help="model preset: tiny, small (default), gpt2, gpt2-medium")
    p.add_argument("--schedule", help=f"one of: {', '.join(schedules.REGISTRY)} (default paci)")
    p.add_argument("--stages", type=int, help="pipeline depth P (default: --nproc if given, else 4)")
    p.add_argument("--microbatches", type=int, help="micro-batches per mini-batch M (default 8)")
    p.add_argument("--accum", type=int, help="K, backwards per optimizer step for paci/2bw (default M)")
    p.add_argument("--steps", type=int, help="mini-batches to train (default 150)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    p.add_argument("--data", help="text file, folder of .txt, or folder with train.bin/val.bin (default: embedded)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--eval-every", type=int, help="optimizer steps between validation rounds (default 25)")
    p.add_argument("--out", help="run directory (default runs/<schedule>-<time>); must not exist or be empty")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    p.set_defaults(func=train_command)


_TRAIN_FLAGS = {"model": {"preset": "preset"}, "data": {"data": "path", "batch_size": "batch_size",
                                                      "seq_len": "seq_len"},
                "pipeline": {"schedule": "schedule", "stages": "stages", "microbatches": "microbatches",
                             "accum": "accum"},
                "optim": {"lr": "lr"}, "train": {"steps": "steps", "seed": "seed", "eval_every": "eval_every",
                                                 "out": "out"}}


def train_command(args: argparse.Namespace) -> int:
    from paci.config import load_config
    from paci.train import train

    overrides = {section: {key: getattr(args, flag) for flag, key in flags.items()}
                 for section, flags in _TRAIN_FLAGS.items()}
    config = load_config(args.config, overrides)
    progress = _Progress(config.train.steps, quiet=args.json)
    summary, _ = train(config, on_record=progress.record, on_plan=progress.start)
    progress.close()
    _plot_run(Path(summary["run_dir"]))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.0f} s | "
              f"val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} "
              f"(ppl {summary['final_val_ppl']:.1f}) | max Δ {summary['max_drift']} | {summary['run_dir']}")
    return 0


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise (every ~10% of the run)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.bar = None
        self.every = max(1, total // 10)
        self.last_val = None

    def start(self, plan) -> None:
        if self.quiet:
            return
        log.info("%s | P=%d, M=%d, K=%d | %s | %s | run dir %s", plan.schedule.name, plan.num_stages,
                 plan.config.pipeline.microbatches, plan.schedule.accumulation, plan.config.model.preset,
                 plan.data.source, plan.run_dir)
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True)

    def record(self, record: dict) -> None:
        if "val_ppl" in record:
            self.last_val = record["val_ppl"]
        if self.quiet or "loss" not in record:
            return
        ppl = "-" if self.last_val is None else f"{self.last_val:.1f}"
        line = (f"step {record['step']} | loss {record['loss']:.3f} | val ppl {ppl} | "
                f"{record['tok_per_s']:,.0f} tok/s | Δmax {record['max_drift']}")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(line.split(" | ", 1)[1])
        elif record["step"] % self.every == 0 or record["step"] == self.total:
            log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot_run(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {"train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
              "val loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]}
    plot_curves(curves, run_dir / "loss.png", xlabel="optimizer step", ylabel="cross-entropy loss",
                title=run_dir.name, markers=("val loss",))


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paci", description="Pipeline-parallel training with PACI and the schedules it is "
                                              "measured against.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_schedules_parser(subparsers)
    add_simulate_parser(subparsers)
    add_train_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        if os.environ.get("PACI_DEBUG"):
            raise
        print(f"paci: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paci: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
