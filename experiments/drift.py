"""Drift ablation: PACI's quality gap to 1F1B-flush against the drift Δ it allows.

At stage s of a P-stage PACI pipe a backward crosses at most ⌈(P−1−s)/K⌉ optimizer steps. Two
sweeps on the time-to-accuracy setting (experiments/tta.py: the `deep` GPT, 64 x 64 tokens per
step, 400 steps), at the learning rate that is best for PACI at m = 8 there, against 1F1B-flush at
the same learning rate (so the gap is the drift's alone):

* K in {1, 2, 4, 8, 16, 32} at P = 8, with K = m: the global batch is cut into K micro-batches,
  so every optimizer step sees the same 64 sequences as flush's (K = 1 is naive async 1F1B);
* P in {2, 4, 8} at K = m = 8 (flush computes the same updates at any P, so one flush run serves).

Per run: the bound and the largest Δ per stage (from the schedule, which every run checks its
recorded versions against), the mean Δ over all backwards (recorded by the run), and the final
validation loss minus flush's.

    .venv/bin/python experiments/drift.py [--quick]

It shares tta.py's cache (experiments/results/tta/): cells already run there are reused and the
new ones (K = 1, 2, 16, 32 at P = 8 and P = 2, 4, at most six) are added to it, about 30
CPU-minutes. --quick: the tiny setting, under a minute.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import save_figure  # noqa: E402
from tta import FULL, QUICK, Cell, Setting, best_lr, load_cells, run_cells  # noqa: E402

from paci import schedules  # noqa: E402
from paci.ir import stage_versions  # noqa: E402

K_VALUES = {FULL.preset: (1, 2, 4, 8, 16, 32), QUICK.preset: (1, 2, 4)}
P_VALUES = {FULL.preset: (2, 4, 8), QUICK.preset: (2, 4)}


def cells(setting: Setting, lr: float) -> list[tuple[int, int, Cell]]:
    """(P, K, cell) for both sweeps; the cell at the setting's own P carries stages=None (tta's name)."""
    k_sweep = [(setting.stages, k) for k in K_VALUES[setting.preset]]
    p_sweep = [(p, setting.flush_m) for p in P_VALUES[setting.preset] if p != setting.stages]
    return [(p, k, Cell("paci", k, lr, stages=None if p == setting.stages else p)) for p, k in k_sweep + p_sweep]


def drift_per_stage(num_stages: int, k: int, steps: int) -> list[int]:
    """The largest Δ at each stage over the run, from the schedule itself."""
    schedule = schedules.build("paci", num_stages, k, steps)
    return [max(v_b - v_f for _, v_f, v_b in stage_versions(schedule, s)) for s in range(num_stages)]


def table(setting: Setting, lr: float, done: dict[str, dict]) -> list[str]:
    flush = done.get(Cell("1f1b", setting.flush_m, lr).name)
    lines = [f"PACI (K = m) against 1F1B-flush at lr {lr:g} (PACI's best at m = {setting.flush_m}), "
             f"{setting.steps} steps, seed 0; "
             f"flush ends at {flush['final_val_loss']:.3f}." if flush else "flush not run yet", "",
             "| P | K | bound ⌈(P−1−s)/K⌉, s = 0..P−1 | largest Δ per stage | mean Δ | final val loss | gap to flush |",
             "|---|---|---|---|---|---|---|"]
    for p, k, cell in cells(setting, lr):
        result = done.get(cell.name)
        bound = [math.ceil((p - 1 - s) / k) for s in range(p)]
        if result is None:
            lines.append(f"| {p} | {k} | {bound} | - | - | not run | - |")
            continue
        histogram = result["drift_histogram"]
        mean = sum(int(d) * n for d, n in histogram.items()) / sum(histogram.values())
        gap = f"{result['final_val_loss'] - flush['final_val_loss']:+.3f}" if flush else "-"
        lines.append(f"| {p} | {k} | {bound} | {drift_per_stage(p, k, result['steps'])} | {mean:.3f} | "
                     f"{result['final_val_loss']:.3f} | {gap} |")
    return lines


def plot(setting: Setting, lr: float, done: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flush = done[Cell("1f1b", setting.flush_m, lr).name]["final_val_loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for sweep, marker in (("K", "o"), ("P", "s")):
        points = []
        for p, k, cell in cells(setting, lr):
            result = done.get(cell.name)
            if result is None or (sweep == "K") != (p == setting.stages):
                continue
            histogram = result["drift_histogram"]
            mean = sum(int(d) * n for d, n in histogram.items()) / sum(histogram.values())
            points.append((mean, result["final_val_loss"] - flush, f"P={p} K={k}"))
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker, ls="none",
                label=f"{sweep} sweep" if sweep == "P" else f"K sweep (P = {setting.stages})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("mean drift Δ over all backwards")
    ax.set_ylabel("final val loss − flush's")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny setting: under a minute")
    parser.add_argument("--cache", type=Path, help="tta.py's results folder (default experiments/results/tta[-quick])")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="PNG (default docs/figures/drift.png; quick: in the cache)")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    cache = args.cache or HERE / "results" / ("tta-quick" if args.quick else "tta")
    sweep = [Cell(name, setting.flush_m, lr) for name in ("1f1b", "paci") for lr in setting.lrs]

    def plan(done: dict[str, dict]) -> list[Cell]:  # tta's m = 8 sweep first, then the K cells at PACI's best lr
        missing = [c for c in sweep if c.name not in done]
        if missing:
            return missing
        return [cell for _, _, cell in cells(setting, best_lr(setting, done, "paci", setting.flush_m))
                if cell.name not in done]

    run_cells(setting, cache, args.workers, plan)
    done = load_cells(cache)
    lr = best_lr(setting, done, "paci", setting.flush_m)
    print("\n".join(table(setting, lr, done)))
    plot(setting, lr, done, args.plot or (cache / "drift.png" if args.quick else HERE.parent / "docs" / "figures" /
                                          "drift.png"))


if __name__ == "__main__":
    main()
