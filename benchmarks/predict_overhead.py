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
import statistics
import time

import torch
from common import machine

from paci.data import load_data
from paci.ir import WeightPolicy, stage_versions
from paci.model import PRESETS, build_units, num_units
from paci.partition import parse_split
from paci.runtime.stage import OptimizerSpec, Stage
from paci.schedules import build
from paci.sim import CostModel, simulate

SPLIT = "0:3,3:5,5:7,7:10,10:12,12:14,14:16,16:18"  # experiments/tta.py's pinned split at P = 8
P, M, BATCH, SEQ = 8, 8, 8, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(None, 1024)
    config = dataclasses.replace(PRESETS["deep"], vocab_size=data.vocab_size)
    ranges = parse_split(SPLIT, num_units(config), P)
    schedule = build("paci", P, M, 40)  # long enough that the fill and drain barely change the shares
    spec = OptimizerSpec(lr=1e-3, warmup_steps=1, total_steps=100, compensate="predict")
    batch = lambda mb: data.batch(0, mb, BATCH, SEQ)  # noqa: E731
    ahead = {"now": 0}
    plain_f, predicted_f, backward, share = [], [], [], []
    hidden = torch.randn(BATCH, SEQ, config.n_embd)
    for s, (start, stop) in enumerate(ranges):
        stage = Stage(s, P, build_units(config, 0, start, stop), policy=WeightPolicy.LIVE, optim=spec,
                      loss_scale=1 / M, train_batch=batch, val_batch=batch, updates_ahead=lambda mb: ahead["now"])
        received = None if s == 0 else hidden
        grad = None if s == P - 1 else torch.randn(BATCH, SEQ, config.n_embd)
        times = {0: [], 1: [], "b": []}
        for i in range(args.repeats + 3):  # the first rounds warm up (and the first U creates AdamW's state)
            for now in (0, 1):
                ahead["now"] = now
                t0 = time.perf_counter()
                stage.forward(i * 2 + now, None if received is None else received.clone())
                t1 = time.perf_counter()
                stage.backward(i * 2 + now, grad)
                t2 = time.perf_counter()
                if i >= 3:
                    times[now].append(t1 - t0)
                    times["b"].append(t2 - t1)
            stage.step()
        plain_f.append(statistics.median(times[0]))
        predicted_f.append(statistics.median(times[1]))
        backward.append(statistics.median(times["b"]))
        late = [v_b > v_f for _, v_f, v_b in stage_versions(schedule, s)]
        share.append(sum(late) / len(late))
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
