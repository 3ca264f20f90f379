"""How fast `paci plan` searches (issue 22): the `deep` GPT at P = 8 (target < 30 s) and a 48-layer
GPT at P = 16 (target < 2 minutes), a global batch of 64 sequences of 64 tokens, no budget.

The units are profiled once per micro-batch size first (what a fresh machine pays once; the
profiles are cached on disk afterwards), then the search runs from those profiles, timed alone and
split into what dominates it: the partitioner's dynamic programs, the simulations, and the rest.

    .venv/bin/python benchmarks/plan_speed.py
"""

import cProfile
import dataclasses
import pstats
import time

import torch
from common import machine

import paci.planner as planner
from paci.model import PRESETS, num_units
from paci.profiler import profile_units

G, T = 64, 64


def case(label: str, config, ranks: int, target_s: float) -> None:
    started = time.perf_counter()
    profiles = {b: profile_units(config, b, T, "cpu") for b in planner.divisors(G, G)}
    profiled = time.perf_counter() - started
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    result = planner.plan(config, ranks, G, T, profiles=profiles.__getitem__)
    profiler.disable()
    search = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    cumulative = {f[2]: v[3] for f, v in stats.stats.items()}  # function name -> cumulative seconds
    share = {name: cumulative.get(fn, 0.0) / search for name, fn in
             (("partitioner", "partition"), ("simulations", "simulate"),
              ("of which the memory model's", "stage_memory_model"))}
    best = result.best
    print(f"{label}: {num_units(config)} units, P = {ranks}, {len(result.candidates)} candidates: search "
          f"{search:.1f} s (target < {target_s:.0f} s: {'met' if search < target_s else 'MISSED'}; under "
          f"cProfile, which slows it), profiling {len(profiles)} micro-batch sizes first {profiled:.1f} s; "
          + ", ".join(f"{k} {v:.0%}" for k, v in share.items())
          + f"; fastest: {best.schedule} m={best.microbatches} at {1e3 * best.step_s:.1f} ms per step")


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    deep = dataclasses.replace(PRESETS["deep"], vocab_size=1024)
    case("deep", deep, 8, 30)
    case("48 layers", dataclasses.replace(deep, n_layer=48), 16, 120)


if __name__ == "__main__":
    main()
