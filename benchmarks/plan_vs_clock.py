"""`paci plan` against the time-to-accuracy study's calibrated clock (issue 22's honesty check).

The plan's time per step for every cell the clock timed (1F1B, ZB-H1 and PACI at m = 4, 8, 16, 32;
the `deep` GPT, vocab 1024, P = 8, 64 x 64 tokens per step), from units profiled now on this
machine, beside the clock's steady step (experiments/results/tta/clock.json, whose costs were
measured and calibrated against real runs when the study began). Prints the ratios, the single
scale that best fits them and what remains after it, and whether both rank the same setting
fastest. Profile on a quiet machine: `--fresh` profiles into a new cache instead of reusing one.

    .venv/bin/python benchmarks/plan_vs_clock.py [--fresh]
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from common import machine

CLOCK = Path(__file__).resolve().parents[1] / "experiments" / "results" / "tta" / "clock.json"
SCHEDULES, MS = ("1f1b", "zb-h1", "paci"), (4, 8, 16, 32)


def steady(ends: list[float]) -> float:
    """The clock's seconds per step over the second half of its run."""
    half = len(ends) // 2
    return (ends[-1] - ends[half]) / (len(ends) - 1 - half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="profile into a new cache (on a quiet machine)")
    args = parser.parse_args()
    if args.fresh:
        os.environ["PACI_CACHE"] = tempfile.mkdtemp(prefix="paci-plan-")
    import paci.planner as planner
    from paci.model import PRESETS

    torch.set_num_threads(1)
    config = dataclasses.replace(PRESETS["deep"], vocab_size=1024)
    clock = json.loads(CLOCK.read_text())["step_end_s"]
    result = planner.plan(config, 8, 64, 64, recompute=(False,), schedule_names=list(SCHEDULES),
                          optimizer="adamw")  # the clock's cells ran AdamW
    planned = {(c.schedule, c.microbatches): c.step_s for c in result.candidates}
    rows = [(s, m, planned[(s, m)], steady(clock[f"{s}-m{m}"])) for s in SCHEDULES for m in MS]
    ratios = [p / c for _, _, p, c in rows]
    scale = statistics.median(ratios)
    print(f"machine: {machine()}")
    print("| schedule | m | plan (ms/step) | clock (ms/step) | plan / clock | after one scale |")
    print("|---|---|---|---|---|---|")
    for (s, m, p, c), r in zip(rows, ratios):
        print(f"| {s} | {m} | {1e3 * p:.1f} | {1e3 * c:.1f} | {r:.3f} | {r / scale:.3f} |")
    sync = [r for r in rows if r[0] != "paci"]
    for label, group in (("synchronous", sync), ("PACI", [r for r in rows if r[0] == "paci"])):
        by_plan, by_clock = min(group, key=lambda r: r[2]), min(group, key=lambda r: r[3])
        print(f"fastest {label}: plan {by_plan[0]} m={by_plan[1]}, clock {by_clock[0]} m={by_clock[1]}"
              f" ({'the same' if by_plan[:2] == by_clock[:2] else 'DIFFERENT'})")
    spread = max(abs(r / scale - 1) for r in ratios)
    print(f"plan / clock: {min(ratios):.3f}-{max(ratios):.3f}; one scale ({scale:.3f}) leaves at most "
          f"{spread:.1%} ({'within' if spread <= 0.05 else 'beyond'} 5%)")


if __name__ == "__main__":
    main()
