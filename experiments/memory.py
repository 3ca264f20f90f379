"""Peak bytes per stage for every schedule: the simulator's prediction from profiled bytes, and measured.

The paper's claim: PACI's peak memory equals 1F1B-flush's (live weights, no copies), while
PipeDream and PipeDream-2BW pay for their stashed weight copies. Two settings, each split into
stages by the profiled partitioner, with every schedule at K = m:

* P = 8: the `deep` GPT preset (vocab 1024), m = 8 micro-batches of 8 x 64 tokens. Predicted
  only: the simulator fed with the split's profiled static, activation and weight bytes
  (`paci.profiler.stage_costs`).
* P = 2: the `small` preset (vocab 1024), m = 4 micro-batches of 8 x 64 tokens. Predicted the same
  way, and measured in a real run of every schedule (4 steps, random tokens, all stages in one
  process: the runtime is bit-identical to the multi-process run and each stage's order is
  fixed). `paci.runtime.memory.StageMemory` counts each stage's own tensors between actions:
  parameters, gradients, optimizer state, the storages autograd saved (a pack hook) and stashed
  weight copies. The simulator counts the static part (parameters + gradients + AdamW state) as
  always allocated, so "measured" is the largest static part plus the peak of saved activations
  + weight copies; the live peak (the runtime frees gradients at each U) is shown beside it.

Cost: about 40 s wall and 40 CPU-s on 2 cores (profiling both presets, then 7 short runs);
--quick (tiny preset, P = 4 and 2): about 10 s. Cells are cached as JSON under --out:

    .venv/bin/python experiments/memory.py [--quick] [--out runs/memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from paci import schedules
from paci.model import PRESETS, build_units
from paci.partition import partition, stage_memory_model
from paci.profiler import profile_units, stage_costs
from paci.runtime.executor import run_local
from paci.runtime.memory import StageMemory
from paci.runtime.stage import OptimizerSpec, Stage
from paci.runtime.transport import LocalTransport
from paci.sim import CostModel, simulate

sys.path.insert(0, str(Path(__file__).parent))
from common import Cells, cpu_seconds, machine, save_figure  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "zb-h1", "async-1f1b", "pipedream", "2bw", "paci")
VOCAB = 1024
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Setting:
    preset: str
    stages: int
    microbatches: int
    measure: bool  # also run every schedule for real and count its bytes
    batch: int = 8
    seq_len: int = 64
    steps: int = 4


@dataclasses.dataclass(frozen=True)
class Setup:
    settings: tuple[Setting, ...]
    repeats: int = 20  # profiler rounds per unit (the split follows the times)


FULL = Setup((Setting("deep", 8, 8, False), Setting("small", 2, 4, True)))
QUICK = Setup((Setting("tiny", 4, 4, False, seq_len=32, steps=3), Setting("tiny", 2, 4, True, seq_len=32, steps=3)),
              repeats=3)


def config_of(setting: Setting):
    return dataclasses.replace(PRESETS[setting.preset], vocab_size=VOCAB)


def plan(setting: Setting, repeats: int, cells: Cells) -> dict:
    """Profile the units (one thread), split them into stages and keep the split's cost model (cached)."""
    name = f"plan-{setting.preset}-p{setting.stages}"
    cached = cells.get(name)
    if cached is not None:
        return cached
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profiles = profile_units(config_of(setting), setting.batch, setting.seq_len, "cpu", repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    inflight, copies = stage_memory_model("paci", setting.stages, setting.microbatches)
    split = partition(profiles, setting.stages, inflight, copies)  # no budget on CPU: the same for all schedules
    costs = stage_costs(profiles, split.ranges)
    return cells.put(name, {"split": split.spec, "ranges": [list(r) for r in split.ranges], "costs": costs.as_dict()})


def predict(setting: Setting, costs: CostModel) -> dict[str, list[dict]]:
    """Per schedule and stage: the simulator's peak bytes, in-flight micro-batches and weight copies."""
    out = {}
    for name in SCHEDULES:
        schedule = schedules.build(name, setting.stages, setting.microbatches, setting.steps)
        result = simulate(schedule, costs)
        out[name] = [{"peak": peak, "inflight": m.peak_inflight, "copies": m.weight_copies}
                     for peak, m in zip(result.peak_bytes, result.metrics.per_stage)]
    return out


def measure(setting: Setting, ranges: list[list[int]], name: str) -> list[dict]:
    """Run `name` for real (one process) and count every stage's bytes between its actions."""
    config = config_of(setting)
    schedule = schedules.build(name, setting.stages, setting.microbatches, setting.steps)

    def batch(mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(VOCAB, (setting.batch, setting.seq_len + 1), generator=torch.Generator().manual_seed(mb))
        return tokens[:, :-1], tokens[:, 1:]

    optim = OptimizerSpec(lr=1e-3, total_steps=setting.steps)
    stages = [Stage(s, setting.stages, build_units(config, 0, start, stop), policy=schedule.weight_policy,
                    optim=optim, loss_scale=1.0 / schedule.accumulation, train_batch=batch, val_batch=batch)
              for s, (start, stop) in enumerate(ranges)]
    meters = [StageMemory(stage) for stage in stages]
    samples: list[list] = [[] for _ in stages]
    run_local(stages, schedule, LocalTransport(), lambda stage, action: samples[stage.index].append(
        meters[stage.index].sample()))
    out = []
    for stage, taken in zip(stages, samples):
        static = max(s.weights + s.gradients + s.optimizer for s in taken)
        held = max(s.activations + s.stash for s in taken)
        out.append({"measured": static + held, "static": static, "held": held,
                    "live_peak": max(s.total for s in taken), "activations": max(s.activations for s in taken),
                    "copies": max(s.stash for s in taken) // max(1, sum(p.nbytes for p in stage.module.parameters()))})
    return out


def predicted_table(setting: Setting, predicted: dict[str, list[dict]]) -> str:
    """Per schedule: predicted peak MiB of every stage, the largest against 1F1B's, and all weight copies."""
    base = predicted["1f1b"]
    head = " | ".join(f"stage {s}" for s in range(setting.stages))
    lines = [f"| schedule | {head} | max / 1F1B's max | weight copies |",
             "|---|" + "---|" * (setting.stages + 2)]
    for name, per_stage in predicted.items():
        peaks = " | ".join(f"{p['peak'] / MiB:.2f}" for p in per_stage)
        ratio = max(p["peak"] for p in per_stage) / max(p["peak"] for p in base)
        lines.append(f"| {name} | {peaks} | {ratio:.3f} | {sum(p['copies'] for p in per_stage)} |")
    return "\n".join(lines)


def measured_table(predicted: dict[str, list[dict]], measured: dict[str, list[dict]]) -> str:
    """Per schedule and stage: predicted and measured peak, their difference, the live peak, and the copies."""
    lines = ["| schedule | stage | predicted MiB | measured MiB | measured/predicted | measured − predicted "
             "| live peak MiB | in flight (pred.) | weight copies pred./meas. |", "|---" * 9 + "|"]
    for name in SCHEDULES:
        for s, (p, m) in enumerate(zip(predicted[name], measured[name])):
            lines.append(f"| {name} | {s} | {p['peak'] / MiB:.3f} | {m['measured'] / MiB:.3f} | "
                         f"{m['measured'] / p['peak']:.4f} | {m['measured'] - p['peak']:+,.0f} B | "
                         f"{m['live_peak'] / MiB:.3f} | {p['inflight']} | {p['copies']} / {m['copies']} |")
    return "\n".join(lines)


def claims(predicted: dict[str, list[dict]], measured: dict[str, list[dict]] | None, costs: CostModel) -> list[str]:
    """PACI against 1F1B, and the stashing schedules' excess against their copies' weight bytes."""
    out = []
    for label, table, key in (("predicted", predicted, "peak"), ("measured", measured, "measured")):
        if table is None:
            continue
        gaps = [a[key] - b[key] for a, b in zip(table["paci"], table["1f1b"])]
        out.append(f"{label}: PACI − 1F1B-flush per stage {', '.join(f'{g:+,.0f}' for g in gaps)} B")
        for name in ("pipedream", "2bw"):
            extra = [a[key] - b[key] for a, b in zip(table[name], table["paci"])]
            copies = [w * c["copies"] for w, c in zip(costs.weight_bytes, predicted[name])]
            residue = ", ".join(f"{e - c:+,.0f}" for e, c in zip(extra, copies))
            out.append(f"{label}: {name} − PACI per stage {', '.join(f'{e / MiB:.3f}' for e in extra)} MiB; minus "
                       f"its predicted copies × weight bytes: {residue} B")
    return out


def plot(results: list[tuple[Setting, dict, dict | None]], path: Path) -> None:
    """One panel per setting: peak MiB per stage and schedule, predicted (lines) and measured (crosses)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    fig = Figure(figsize=(5.5 * len(results), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    for ax, (setting, predicted, measured) in zip(fig.subplots(1, len(results), squeeze=False)[0], results):
        stages = list(range(setting.stages))
        for index, name in enumerate(SCHEDULES):
            ax.plot(stages, [p["peak"] / MiB for p in predicted[name]], "o-", color=f"C{index}", label=name,
                    markersize=3 + 0.6 * (len(SCHEDULES) - index), alpha=0.8)
            if measured is not None:
                ax.plot(stages, [m["measured"] / MiB for m in measured[name]], "x", color=f"C{index}",
                        markersize=10, markeredgewidth=2)
        ax.set_xticks(stages)
        ax.set_xlabel("stage")
        ax.set_ylabel("peak MiB (x: measured)")
        ax.set_title(f"{setting.preset}, P = {setting.stages}, m = K = {setting.microbatches}")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset at P = 4 and 2, 3 steps (seconds)")
    parser.add_argument("--out", type=Path, help="cell folder (default runs/memory, runs/memory-quick)")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    out = args.out or Path("runs/memory-quick" if args.quick else "runs/memory")
    cells = Cells(out, dataclasses.asdict(setup))
    start, cpu = time.monotonic(), cpu_seconds()
    print(f"machine: {machine()}")
    results, text = [], []
    for setting in setup.settings:
        planned = plan(setting, setup.repeats, cells)
        costs = CostModel.from_dict(planned["costs"])
        predicted = predict(setting, costs)
        measured = None
        if setting.measure:
            measured = {name: cells.get(f"measured-{setting.preset}-p{setting.stages}-{name}")
                        or cells.put(f"measured-{setting.preset}-p{setting.stages}-{name}",
                                     measure(setting, planned["ranges"], name)) for name in SCHEDULES}
        results.append((setting, predicted, measured))
        text += [f"### {setting.preset} GPT (vocab {VOCAB}), P = {setting.stages}, m = K = {setting.microbatches} "
                 f"micro-batches of {setting.batch} x {setting.seq_len} tokens, split {planned['split']}", "",
                 "Predicted peak MiB per stage:", "", predicted_table(setting, predicted), ""]
        if measured is not None:
            text += ["Predicted against measured:", "", measured_table(predicted, measured), ""]
        text += [f"* {line}" for line in claims(predicted, measured, costs)] + [""]
    plot(results, out / "memory.png")
    (out / "tables.md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"this invocation: {time.monotonic() - start:.0f} s wall, {cpu_seconds() - cpu:.0f} CPU-s "
          f"(cached cells cost nothing); plot {out / 'memory.png'}")


if __name__ == "__main__":
    main()
