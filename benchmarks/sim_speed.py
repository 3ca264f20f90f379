"""How fast the simulator is: PACI with 8 stages and 100,000 micro-batches, one core.

Target (issue 2): under 5 s. Prints the median of 3 runs of build + simulate + metrics.

    .venv/bin/python benchmarks/sim_speed.py
"""

import statistics
import time

from common import machine

from paci.schedules import build
from paci.sim import CostModel, simulate


def main() -> None:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = simulate(build("paci", 8, 8, 12_500), CostModel.per_stage(8, 1.0, 2.0))
        times.append(time.perf_counter() - start)
    actions = sum(len(s) for s in result.trace.stages)
    print(f"machine: {machine()}")
    print(f"paci P=8, {result.trace.num_microbatches:,} micro-batches, {actions:,} actions: "
          f"median {statistics.median(times):.2f} s over 3 runs (min {min(times):.2f} s); target < 5 s")


if __name__ == "__main__":
    main()
