"""Pipeline an nn.Sequential MLP with paci's public API: PACI over 3 stages, SGD with momentum.

A regression of y = sin(x · w) on 16 features, mini-batches of 64 rows cut into 8 micro-batches,
with 1F1B-flush (the numbers of the same model trained without a pipeline) and with PACI (each
stage steps on its own, at most one update between a micro-batch's forward and its backward).
About a minute on two cores.

    .venv/bin/python examples/mlp_regression.py [--steps 200]
    .venv/bin/torchrun --nproc-per-node 3 examples/mlp_regression.py   # one stage per process, same numbers
"""

import argparse
import os

import torch
from torch import nn

import paci

FEATURES, ROWS, STEPS = 16, 64, 200


def data(steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(FEATURES, generator=gen) / FEATURES ** 0.5
    for _ in range(steps):
        x = torch.randn(ROWS, FEATURES, generator=gen)
        yield x, torch.sin(x @ w).unsqueeze(1)


def units() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(FEATURES, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
            nn.Linear(64, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    steps = parser.parse_args().steps
    for schedule in ("1f1b", "paci"):
        pipe = paci.Pipeline(units(), loss_fn=nn.functional.mse_loss,
                             optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                             schedule=schedule, stages=3, microbatches=8)
        losses = pipe.fit(data(steps), steps=steps)  # under torchrun: on every rank
        if int(os.environ.get("RANK", "0")) == 0:
                print(f"{schedule:5s}: loss {sum(losses[:10]) / 10:.4f} (first 10 steps) -> "
                  f"{sum(losses[-10:]) / 10:.4f} (last 10), stages {[len(m) for m in pipe.stage_modules]} units")


if __name__ == "__main__":
    main()
