"""The headline pair on one CUDA device: 1F1B-flush and PACI, with AdamW and with Muon, on a
GPT-2-small-sized model, and the time-to-accuracy clock's costs profiled there.

All P stages run in one process on the one device: the exact semantics (the schedule alone fixes
every weight version, as on P devices, and the multi-process runtime computes the same numbers),
so one GPU trains what a P-GPU pipeline would. How long a P-GPU pipeline would take comes from
the simulator fed with the units' forward, backward, input-gradient and optimizer-step times
profiled on this device (bf16 autocast, as the runs) and an assumed link between devices
(--latency-us, --bandwidth-gbs; the defaults are NVLink-class: NVIDIA quotes 900 GB/s for the
H100/H200's NVLink 4, 450 GB/s each way; the 10 us latency is an assumption). The split is the
partitioner's for those profiles, pinned for every run.

    python experiments/gpu.py --out DIR           # on a CUDA machine: under 10 minutes on an H200
    python experiments/gpu.py --quick --out DIR   # the tiny model on this CPU: the smoke test CI runs
    python experiments/gpu.py report DIR          # DIR's table into docs/results.md

On a machine with its own CUDA build of torch and no install of paci (a lent device machine):
`PYTHONPATH=. python3 experiments/gpu.py --out $OUT/gpu`; DIR then holds 7 files in 2 folders.

Each finished run is a JSON file under DIR/cells (tta.py's cell format), so a run cut short
resumes; DIR also gets clock.json and gpu.md (the table, headed with the hardware).
One rate per optimizer (--lr-adamw, --lr-muon; the defaults are nanoGPT's GPT-2-small rate,
and the same for Muon, whose update matches AdamW's RMS): the rate sweep stays a CPU study.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tta import Cell, Setting, crossing_step, run_cell  # noqa: E402

FULL = dict(preset="gpt2", vocab_size=8192, stages=8, m=8, batch_size=8, seq_len=256, steps=300, eval_every=50,
            eval_sequences=32, precision="bf16", lrs={"adamw": 6e-4, "muon": 6e-4})
QUICK = dict(preset="tiny", vocab_size=512, stages=4, m=4, batch_size=2, seq_len=32, steps=12, eval_every=4,
             eval_sequences=4, precision="fp32", lrs={"adamw": 4e-3, "muon": 4e-3}, in_process=True)
SYNC = ("1f1b", "gpipe", "zb-h1")
SCHEDULES = ("1f1b", "paci")  # trained: the flush trajectory (every sync schedule computes it) and PACI
OPTIMIZERS = ("adamw", "muon")
MARKERS = ("<!-- experiments/gpu.py: begin -->", "<!-- experiments/gpu.py: end -->")


def hardware() -> str:
    import torch

    from common import machine

    if torch.cuda.is_available():
        return (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, torch {torch.__version__}; "
                f"host: {machine()}")
    return f"no GPU: {machine()}"


def make_clock(spec: dict, device: str, latency: float, bandwidth: float, out: Path) -> dict:
    """Per-unit costs profiled on `device`, the partitioner's split, each optimizer's step per stage,
    and the simulated end time of every step for each schedule; cached in out/clock.json."""
    path = out / "clock.json"
    if path.is_file():
        return json.loads(path.read_text())
    from clock import model_config, step_end_times, update_costs

    from paci import schedules
    from paci.partition import partition, split_spec, stage_memory_model
    from paci.profiler import profile_units, stage_costs

    config = model_config(spec["preset"], spec["vocab_size"])
    profiles = profile_units(config, spec["batch_size"], spec["seq_len"], device, spec["precision"], cache=False)
    inflight, copies = stage_memory_model("1f1b", spec["stages"], spec["m"])
    ranges = list(partition(profiles, spec["stages"], inflight, copies).ranges)
    updates = update_costs(config, ranges, OPTIMIZERS, device=device, repeats=20)
    activation = spec["batch_size"] * spec["seq_len"] * config.n_embd * 4
    clock = {"hardware": hardware(), "split": split_spec(ranges), "latency_s": latency, "bandwidth_Bps": bandwidth,
             "update_s": updates, "step_end_s": {}}
    for opt in OPTIMIZERS:
        costs = dataclasses.replace(
            stage_costs(profiles, ranges, message_bytes=[activation] * (spec["stages"] - 1) + [0], latency=latency,
                        bandwidth=bandwidth), update=tuple(updates[opt]))
        for schedule in (*SYNC, "paci"):
            ends = step_end_times(schedules.build(schedule, spec["stages"], spec["m"], spec["steps"]), costs)
            clock["step_end_s"][f"{schedule}-{opt}"] = [round(t, 9) for t in ends]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clock) + "\n")
    return clock


def setting_for(spec: dict, split: str) -> Setting:
    m = spec["m"]
    return Setting(preset=spec["preset"], vocab_size=spec["vocab_size"], stages=spec["stages"],
                   splits={spec["stages"]: split}, global_batch=m * spec["batch_size"], seq_len=spec["seq_len"],
                   steps=spec["steps"], eval_every=spec["eval_every"], eval_sequences=spec["eval_sequences"],
                   microbatches=(m,), flush_m=m, lrs=tuple(sorted(set(spec["lrs"].values()))), seeds=(0,),
                   in_process=spec.get("in_process", False))


def cells(spec: dict) -> list[Cell]:
    return [Cell(schedule, spec["m"], spec["lrs"][opt], optimizer=opt, precision=spec["precision"])
            for opt in OPTIMIZERS for schedule in SCHEDULES]


def seconds_to(clock: dict, schedule: str, opt: str, step: float | None) -> float | None:
    """Simulated seconds until every stage has finished (fractional) step `step`."""
    if step is None:
        return None
    ends = clock["step_end_s"][f"{schedule}-{opt}"]
    low = int(step)
    before = ends[low - 1] if low >= 1 else 0.0
    return before + (step - low) * (ends[min(low, len(ends) - 1)] - before)


def table(spec: dict, clock: dict, results: dict[str, dict]) -> list[str]:
    """One row per optimizer: the final losses, the step times, and the time to two targets."""
    steps = spec["steps"]
    lines = [f"Hardware: {clock['hardware']}.", "",
             f"{spec['preset']} GPT (vocab {spec['vocab_size']}), P = {spec['stages']} stages in one process, "
             f"m = K = {spec['m']} micro-batches of {spec['batch_size']} x {spec['seq_len']} tokens, {steps} steps, "
             f"{spec['precision']}, split {clock['split']}; link {1e6 * clock['latency_s']:.0f} us + "
             f"{clock['bandwidth_Bps'] / 1e9:.0f} GB/s (assumed). Time per step is the simulator's with the costs "
             "profiled here; a target is reached where the validation curve crosses it.", "",
             "| optimizer | lr | flush final val loss | PACI final val loss | gap | fastest sync step | PACI step | "
             "step speed-up | to the worse final: sync / PACI | Speedup | to flush's final: sync / PACI | Speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for opt in OPTIMIZERS:
        flush, paci = (results.get(c.name) for c in cells(spec) if c.optimizer == opt)
        if flush is None or paci is None:
            lines.append(f"| {opt} | {spec['lrs'][opt]:g} | {'not run' if flush is None else ''} | "
                         f"{'not run' if paci is None else ''} | | | | | | | | |")
            continue
        sync = min(SYNC, key=lambda s: clock["step_end_s"][f"{s}-{opt}"][-1])
        period = {s: clock["step_end_s"][f"{s}-{opt}"][-1] / steps for s in (sync, "paci")}
        row = [opt, f"{spec['lrs'][opt]:g}", f"{flush['final_val_loss']:.3f}", f"{paci['final_val_loss']:.3f}",
               f"{paci['final_val_loss'] - flush['final_val_loss']:+.3f}", f"{1e3 * period[sync]:.1f} ms ({sync})",
               f"{1e3 * period['paci']:.1f} ms", f"{period[sync] / period['paci']:.2f}x"]
        # (rounded as the cells store their curves, so that a run reaches its own final loss)
        for target in (round(max(flush["final_val_loss"], paci["final_val_loss"]), 5), round(flush["final_val_loss"], 5)):
            t_sync = seconds_to(clock, sync, opt, crossing_step(flush["eval"], target))
            t_paci = seconds_to(clock, "paci", opt, crossing_step(paci["eval"], target))
            fmt = lambda t: "not reached" if t is None else f"{t:.3g} s"  # noqa: E731
            row += [f"{fmt(t_sync)} / {fmt(t_paci)} (target {target:.3f})",
                    "-" if t_sync is None or t_paci is None else f"{t_sync / t_paci:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def run(spec: dict, out: Path, device: str, latency: float, bandwidth: float) -> list[str]:
    clock = make_clock(spec, device, latency, bandwidth, out)
    setting = setting_for(spec, clock["split"])
    results = {}
    for cell in cells(spec):  # one at a time: they share the device
        results[cell.name] = run_cell(setting, cell, out, threads=4 if device == "cuda" else 1)
        print(f"  {cell.name}: final val loss {results[cell.name]['final_val_loss']:.3f} "
              f"({results[cell.name]['cpu_wall_s']:.0f} s)", flush=True)
    lines = table(spec, clock, results)
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    return lines


def insert(table_file: Path, docs: Path) -> None:
    """Put `table_file` between the markers in `docs` (a section of its own at the end if they are absent)."""
    text, body = docs.read_text(), table_file.read_text().strip()
    block = f"{MARKERS[0]}\n{body}\n{MARKERS[1]}"
    if MARKERS[0] in text and MARKERS[1] in text:
        head, rest = text.split(MARKERS[0], 1)
        text = head + block + rest.split(MARKERS[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n### The headline pair on a GPU (`experiments/gpu.py`)\n\n" + block + "\n"
    docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    parser.add_argument("folder", nargs="?", type=Path, help="report: the --out folder of a run")
    parser.add_argument("--out", type=Path, help="run: where the cells, clock.json and gpu.md go")
    parser.add_argument("--quick", action="store_true", help="the tiny model on the CPU: under a minute")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 300)")
    parser.add_argument("--lr-adamw", type=float)
    parser.add_argument("--lr-muon", type=float)
    parser.add_argument("--latency-us", type=float, default=10.0)
    parser.add_argument("--bandwidth-gbs", type=float, default=450.0)
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs" / "results.md")
    args = parser.parse_args(argv)
    if args.command == "report":
        if args.folder is None or not (args.folder / "gpu.md").is_file():
            parser.error("report needs the folder of a run (with its gpu.md)")
        insert(args.folder / "gpu.md", args.docs)
        return 0
    import torch

    if args.out is None:
        parser.error("run needs --out DIR")
    if not args.quick and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or --quick for the CPU smoke test")
    spec = dict(QUICK if args.quick else FULL)
    spec["lrs"] = {"adamw": args.lr_adamw or spec["lrs"]["adamw"], "muon": args.lr_muon or spec["lrs"]["muon"]}
    spec["steps"] = args.steps or spec["steps"]
    device = "cpu" if args.quick else "cuda"
    print("\n".join(run(spec, args.out, device, args.latency_us * 1e-6, args.bandwidth_gbs * 1e9)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
