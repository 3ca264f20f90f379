"""Zero Bubble's split backward, measured per stage: does I + W cost one B?

On the `deep` GPT preset (vocab 1024: the head costs about one block) at P = 2, micro-batches of
8 x 64 tokens, one thread, the profiled split, on the stages `paci train` builds: per stage the
median time per micro-batch of B (the whole backward), of I + W as paci runs them
(`paci.runtime.split`: I takes the input gradient and keeps the junctions' gradients, W takes
only the weight gradients from there), and of I + W re-walking the graph (I takes the input
gradient with the graph retained, W back-propagates the whole graph again: paci before the
split, and its fallback for a graph whose split is not exact). Whether ZB-H1's step then beats
1F1B's in real training at P = 2 is `experiments/clock.py check`.

    .venv/bin/python benchmarks/zb_split.py [--repeats 30]

Cost: about 30 s on one core.
"""

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine

from paci.config import load_config
from paci.partition import split_spec
from paci.runtime import split
from paci.train import build_stage, make_plan

PRESET, VOCAB, P, M, BATCH, SEQ = "deep", 1024, 2, 8, 8, 64  # experiments/clock.py's check


def op_times(plan, repeats: int) -> list[dict[str, float]]:
    """Per stage: median seconds per micro-batch of B, of I + W (split) and of I + W (re-walk)."""
    rows = []
    for s in range(P):
        stage = build_stage(plan, s, torch.device("cpu"))
        shape = (BATCH, SEQ, plan.model.n_embd)
        gen = torch.Generator().manual_seed(s)
        received = None if stage.is_first else torch.randn(shape, generator=gen)
        grad = None if stage.is_last else torch.randn(shape, generator=gen)

        def whole(mb: int) -> None:
            stage.backward(mb, grad)

        def split_pair(mb: int) -> None:
            stage.backward_input(mb, grad)
            stage.backward_weight(mb)

        times: dict[str, list[float]] = {"B": [], "I+W split": [], "I+W re-walk": []}
        plan_graph = split.plan  # the re-walk is the stage's own fallback, forced by a plan that declines
        for mb in range(repeats + 3):  # three rounds of warm-up
            for name, run in (("B", whole), ("I+W split", split_pair), ("I+W re-walk", split_pair)):
                split.plan = (lambda *args: None) if name == "I+W re-walk" else plan_graph
                stage.forward(mb, None if received is None else received.clone())
                start = time.perf_counter()
                run(mb)
                if mb >= 3:
                    times[name].append(time.perf_counter() - start)
        split.plan = plan_graph
        rows.append({name: statistics.median(values) for name, values in times.items()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="micro-batches timed per stage")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(None, {"model": {"preset": PRESET, "vocab_size": VOCAB},
                                "data": {"batch_size": BATCH, "seq_len": SEQ},
                                "pipeline": {"schedule": "1f1b", "stages": P, "microbatches": M, "split": "profile"},
                                "train": {"threads": 1}})
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out=str(Path(tmp) / "plan")))
        plan = make_plan(config)
        spec = split_spec(plan.split)
        ops = op_times(plan, args.repeats)

    print(f"machine: {machine()}")
    print(f"{PRESET} GPT (vocab {VOCAB}), P = {P}, micro-batch {BATCH}x{SEQ}, split {spec}, 1 thread\n")
    print(f"Per micro-batch, median of {args.repeats}:\n")
    print("| stage | B (ms) | I + W split (ms) | ratio to B | I + W re-walk (ms) | ratio to B |")
    print("|---|---|---|---|---|---|")
    for s, row in enumerate(ops):
        b, fast, slow = (1e3 * row[k] for k in ("B", "I+W split", "I+W re-walk"))
        print(f"| {s} | {b:.2f} | {fast:.2f} | {fast / b:.2f} | {slow:.2f} | {slow / b:.2f} |")


if __name__ == "__main__":
    main()
