"""Is `paci plan`'s top pick really the fastest? (issue 22) At P = 2 in real compute: the `small` GPT,
32 sequences of 64 tokens per step, the plan's three fastest candidates (candidates predicted to the
same time as one ranked above them are skipped: a tie says nothing about order) each trained with
`paci train --nproc 2` on the split the plan names, side by side in rounds (A B C, A B C, ...), and
ranked by measured tokens per second (median over the rounds, validation, checkpoints and trace off).

    .venv/bin/python benchmarks/plan_real.py [--rounds 3] [--steps 40]
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine

import paci.planner as planner

PRESET, P, G, T = "small", 2, 32, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per rank, as the runs below
    result = planner.plan(PRESET, P, G, T)
    top: list[planner.Candidate] = []
    for c in result.candidates:
        if all(abs(c.step_s - t.step_s) > 1e-4 * t.step_s for t in top):
            top.append(c)
        if len(top) == 3:
            break
    measured: dict[int, list[float]] = {i: [] for i in range(len(top))}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, c in enumerate(top):
                out = Path(tmp) / f"r{r}-c{i}"
                line = shlex.split(c.command(PRESET, P, T))[2:]  # after "paci train"
                cmd = [sys.executable, "-m", "paci", "train", *line, "--steps", str(args.steps), "--threads", "1",
                       "--out", str(out), "--no-eval", "--no-checkpoint", "--no-trace", "--no-plots"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                measured[i].append(json.loads((out / "summary.json").read_text())["tokens_per_s"])
    print(f"machine: {machine()}")
    print(f"| plan rank | candidate | predicted ms/step | predicted tokens/s | measured tokens/s (median of {args.rounds}) |")
    print("|---|---|---|---|---|")
    for i, c in enumerate(top):
        label = f"{c.schedule} m={c.microbatches}" + (f" v={c.chunks}" if c.chunks else "") + (" recompute" * c.recompute)
        print(f"| {i + 1} | {label} | {1e3 * c.step_s:.1f} | {c.tokens_per_s:,.0f} | {statistics.median(measured[i]):,.0f} |")
    fastest = max(measured, key=lambda i: statistics.median(measured[i]))
    print(f"the plan's top pick is {'the fastest measured' if fastest == 0 else f'NOT the fastest: rank {fastest + 1} is'}")


if __name__ == "__main__":
    main()
