"""What `--compensate predict` costs in time: the predicted forward against the plain one, per stage.

A forward that an update will overtake first writes AdamW's predicted step into the weights and
afterwards restores them from a copy; every other forward is untouched. This times, side by side
on the same stage and the same input, a plain and a predicted forward of the time-to-accuracy
setting (the `deep` GPT, vocab 1024, P = 8 with the pinned split, micro-batches of 8 x 64 tokens,
one thread), then feeds the measured F, B and the predicted share of forwards per stage (from the
schedule: (P-1-s)/K at K = m = 8) to the simulator for PACI's step time with and without it.

    .venv/bin/python benchmarks/predict_overhead.py [--repeats 30]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from common import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from clock import predicted_forwards  # noqa: E402

from paci.model import PRESETS, num_units  # noqa: E402
from paci.partition import parse_split  # noqa: E402
from paci.schedules import build  # noqa: E402
from paci.sim import CostModel, simulate  # noqa: E402

SPLIT = "0:3,3:5,5:7,7:10,10:12,12:14,14:16,16:18"  # experiments/tta.py's pinned split at P = 8
P, M, BATCH, SEQ = 8, 8, 8, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(PRESETS["deep"], vocab_size=1024)
    ranges = parse_split(SPLIT, num_units(config), P)
    schedule = build("paci", P, M, 40)  # long enough that the fill and drain barely change the shares
    measured = predicted_forwards(config, ranges, BATCH, SEQ, schedule, args.repeats)
    plain_f, predicted_f, backward, share = (measured[k] for k in ("plain_s", "predicted_s", "backward_s", "share"))
    print(f"machine: {machine()}")
    print(f"deep GPT (vocab {config.vocab_size}), P = {P}, split {SPLIT}, micro-batch {BATCH}x{SEQ}, "
          f"1 thread, median of {args.repeats}\n")
    print("| stage | F plain (ms) | F predicted (ms) | extra | B (ms) | predicted share | extra per micro-batch |")
    print("|---|---|---|---|---|---|---|")
    for s in range(P):
        extra = predicted_f[s] - plain_f[s]
        print(f"| {s} | {1e3 * plain_f[s]:.2f} | {1e3 * predicted_f[s]:.2f} | {1e3 * extra:+.2f} ms | "
              f"{1e3 * backward[s]:.2f} | {share[s]:.3f} | {100 * share[s] * extra / (plain_f[s] + backward[s]):+.1f}% |")
    forward_with = [f + q * max(0.0, p - f) for f, p, q in zip(plain_f, predicted_f, share)]
    without = simulate(schedule, CostModel.per_stage(P, plain_f, backward)).metrics.makespan
    with_predict = simulate(schedule, CostModel.per_stage(P, forward_with, backward)).metrics.makespan
    print(f"\nPACI step time (simulated from these costs, 40 steps): {with_predict / without:.3f}x with predict")


if __name__ == "__main__":
    main()
