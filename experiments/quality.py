"""Does bounded drift cost quality? PACI against 1F1B-flush and the other schedules, same data and steps.

The paper's claim (arXiv 2606.07881, GPT-2 Medium, P = 8): PACI with K ≥ P−1 matches 1F1B-flush's
final perplexity; smaller K (larger Δ) is worse. This runs the same question at the scale two CPU
cores allow: the `small` GPT on the embedded corpus, P = 4, M = 8 micro-batches of 8×64 tokens
per step, 400 steps, every stage in one process (the schedule, not the wall clock, decides every
weight version, so this is the same computation a multi-process run does). Per schedule it
prints the final validation loss and perplexity and the largest drift.

    .venv/bin/python experiments/quality.py [--steps 400] [--lr 2e-3] [--seeds 0] [--only 1f1b paci-8]
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

RUNS = {  # name: (label, schedule, K); K only for paci/2bw
    "1f1b": ("1f1b (flush, m=8)", "1f1b", None),
    "paci-8": ("paci K=8", "paci", 8),
    "paci-4": ("paci K=4", "paci", 4),
    "2bw-8": ("2bw K=8 (stashed)", "2bw", 8),
    "paci-2": ("paci K=2", "paci", 2),
    "async-1f1b": ("async-1f1b (K=1)", "async-1f1b", None),
}


def train(schedule: str, accum: int | None, seed: int, steps: int, lr: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "paci", "train", "--schedule", schedule, "--stages", "4", "--microbatches", "8",
           "--steps", str(steps), "--seed", str(seed), "--lr", str(lr), "--split", "uniform", "--out", str(out),
           "--json"]
    if accum is not None:
        cmd += ["--accum", str(accum)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = parser.parse_args()
    print(f"small GPT, embedded corpus, P=4, M=8 x (8x64 tokens), {args.steps} steps, peak lr {args.lr}, "
          f"seeds {args.seeds}")
    print("| schedule | max Δ | final val loss | val ppl | final train loss |")
    print("|---|---|---|---|---|")
    for name in args.only:
        label, schedule, accum = RUNS[name]
        results = [train(schedule, accum, seed, args.steps, args.lr, args.out / f"lr{args.lr}-{name}-s{seed}")
                   for seed in args.seeds]
        val = sum(r["final_val_loss"] for r in results) / len(results)
        train_loss = sum(r["final_train_loss"] for r in results) / len(results)
        spread = max(r["final_val_loss"] for r in results) - min(r["final_val_loss"] for r in results)
        extra = f" (range {spread:.3f})" if len(results) > 1 else ""
        print(f"| {label} | {results[0]['max_drift']} | {val:.3f}{extra} | {math.exp(val):.1f} | {train_loss:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
