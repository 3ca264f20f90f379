"""PACI's quality cost, and what closes it without a weight stash: each variant at its own best lr.

At the time-to-accuracy setting (experiments/tta.py: the `deep` GPT, P = 8, m = K = 8, 64 x 64
tokens per step, 400 steps) PACI ends 0.58 nats behind 1F1B-flush, and 2BW, with the same drift
but stashed weights, ends where PACI does: the cost is the delay, not inconsistent weights. This
study measures what the stash-free corrections of `paci train --compensate` buy back:

* "nesterov" (Ajanthan et al., ICML 2025, arXiv 2505.01099): delayed stages step with NAdamW,
  beta1 = 0.99, the last stage (never delayed) keeps AdamW. Controls: flush with the same NAdamW on
  every stage (is it a better optimizer rather than a delay correction?), and PACI with NAdamW on
  every stage (the paper's recipe as released).
* "predict" (ours, after SpecTrain, arXiv 1809.02839, and XPipe, arXiv 1911.04610): a forward
  that the schedule says an update will overtake runs on the weights AdamW's next step is
  predicted to reach (the current moments taken as the coming gradient), through the live weights
  and restored exactly afterwards; the predicted values exist only for that forward.
* recompute (`--recompute`): a backward re-runs its stage's forward with the live weights, so each
  stage's local gradient is taken at the weights it updates (only the input and the gradient
  from downstream are late).
* "pipemare" (Yang et al., arXiv 1910.05124): lr / Δ^p, annealed. It is the identity at Δ <= 1,
  so at K = m = 8 it is plain PACI; it is measured where it acts, at K = 2 (Δ up to 4).
* "dc" (DC-ASGD, Zheng et al., arXiv 1609.08326): a late micro-batch's gradient gains
  lambda * H (w_t - w_{t-1}), the last update recomputed from AdamW's state, H the curvature its
  step implies ((sqrt(v_hat) + eps) / lr), lambda in {0.25, 0.5, 1}.
* The learning rate decides it, so every variant is swept over 5e-4 to 4e-3 and judged at its own
  best rate and at flush's; then a longer warm-up, P = 4, a 4x longer horizon and 3 seeds for the
  headline cells.

Cells are shared with tta.py (same folder, same names), so the flush and plain PACI runs are not
repeated; each new cell is cached as it finishes and an interrupted study resumes.

    .venv/bin/python experiments/quality.py [--workers 2]    # run what is missing, then report
    .venv/bin/python experiments/quality.py report           # tables and plots from the cache
    .venv/bin/python experiments/quality.py --quick          # tiny model, 12 steps: about a minute

Cost on the 2-core machine: a 400-step cell takes 4-6 CPU-minutes, a 1600-step one 18-33 (more
with predict, and on a busy machine); the planned study is about 60 cells, 11 of them 1600 steps
long, roughly 8 CPU-hours on top of tta.py's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import save_figure  # noqa: E402
from tta import FULL, QUICK, Cell, Setting, load_cells, run_cells  # noqa: E402


@dataclass(frozen=True)
class Variant:
    label: str
    schedule: str
    options: tuple[tuple[str, object], ...] = ()  # Cell fields besides schedule, m, lr

    def cell(self, setting: Setting, lr: float, **more) -> Cell:
        return Cell(self.schedule, setting.flush_m, lr, **dict(self.options), **more)


NADAMW = (("optimizer", "nadamw"), ("beta1", 0.99))
FLUSH = Variant("1F1B-flush", "1f1b")
PACI = Variant("PACI", "paci")
NESTEROV = Variant("PACI + nesterov (NAdamW 0.99 on delayed stages)", "paci", (("compensate", "nesterov"),))
PREDICT = Variant("PACI + predict (overtaken forwards on predicted weights)", "paci", (("compensate", "predict"),))
RECOMPUTE = Variant("PACI + recompute (each stage's Jacobian at the live weights)", "paci", (("recompute", True),))
NESTEROV_ALL = Variant("PACI, NAdamW 0.99 on every stage", "paci", NADAMW)
COMPENSATED = [PREDICT, NESTEROV, RECOMPUTE, NESTEROV_ALL]
# the controls: the same optimizer without delay, and bf16 autocast (its Linear backward reads forward-time weights)
CONTROLS = [Variant("1F1B-flush, NAdamW 0.99 (control)", "1f1b", NADAMW),
            Variant("PACI, bf16 autocast", "paci", (("precision", "bf16"),)),
            Variant("1F1B-flush, bf16 autocast", "1f1b", (("precision", "bf16"),))]
VARIANTS = [FLUSH, PACI, *COMPENSATED, *CONTROLS]
# PipeMare where it acts: K = 2 at P = 8 gives Δ up to 4
PIPEMARE_K = 2
PIPEMARE = [Variant(f"PACI K={PIPEMARE_K}", "paci", (("accum", PIPEMARE_K),)),
            Variant(f"PACI K={PIPEMARE_K} + pipemare", "paci", (("accum", PIPEMARE_K), ("compensate", "pipemare")))]
# issue 19's remedies for AdamW: the window's partial gradient in the prediction, and over-relaxed
# predictions (gain gamma > 1: under-prediction is the less stable side in the linear delay model)
WINDOW = [Variant("PACI + predict-window (the window's gradient so far in the prediction)", "paci",
                  (("compensate", "predict-window"),)),
          *(Variant(f"PACI + {c}, gain {g:g}", "paci", (("compensate", c), ("predict_gain", g)))
            for c in ("predict", "predict-window") for g in (1.5, 2.0))]
# delay compensation without a copy (DC-ASGD): late gradients corrected by AdamW's implied curvature
# times its last update, lambda 1 the Newton-consistent scale (paci.runtime.stage.OptimizerSpec)
DC = [Variant(f"PACI + dc, lambda {lam:g}", "paci", (("compensate", "dc"), ("dc_lambda", lam))) for lam in (0.25, 0.5, 1.0)]


# a synchronous start (--sync-steps): is PACI's gap made in the first steps or at every step? The
# warm-up (5%), 10% and 25% of the run as 1F1B-flush, then plain PACI, at PACI's best rate
SYNC_START = (0.05, 0.1, 0.25)


def sweep(setting: Setting) -> tuple[float, ...]:
    """The learning rates every variant is run at."""
    return QUICK.lrs if setting is QUICK else (5e-4, 1e-3, 2e-3, 4e-3)


LONG_WARMUP = 0.2  # the second warm-up length, as a share of the steps (the default is 5%)
HORIZON = 4  # the longer runs are this many times the setting's steps


@dataclass
class Study:
    setting: Setting
    done: dict[str, dict]

    def get(self, cell: Cell) -> dict | None:
        return self.done.get(cell.name)

    def final(self, variant: Variant, lr: float, **more) -> float:
        result = self.get(variant.cell(self.setting, lr, **more))
        return result["final_val_loss"] if result else math.inf

    def best_lr(self, variant: Variant, **more) -> float | None:
        """The swept rate with the lowest final loss (seed 0); None before any ran."""
        run = [lr for lr in self.lrs if self.get(variant.cell(self.setting, lr, **more))]
        return min(run, key=lambda lr: self.final(variant, lr, **more)) if run else None

    @property
    def lrs(self) -> tuple[float, ...]:
        return tuple(sorted(set(sweep(self.setting)) | set(self.setting.lrs)))

    def swept(self, variant: Variant) -> bool:
        return all(self.get(variant.cell(self.setting, lr)) for lr in sweep(self.setting))

    def best_compensated(self) -> Variant | None:
        """The compensation with the lowest final loss at its best rate, among those fully swept."""
        swept = [v for v in COMPENSATED if self.swept(v)]
        return min(swept, key=lambda v: self.final(v, self.best_lr(v))) if swept else None

    def seeds(self, variant: Variant, lr: float, **more) -> list[float]:
        return [c["final_val_loss"] for s in self.setting.seeds
                if (c := self.get(variant.cell(self.setting, lr, seed=s, **more)))]


def planned_cells(setting: Setting, done: dict[str, dict]) -> list[Cell]:
    """What the study still needs, most important first: every compensation swept; then, at the
    best rates, 3 seeds, a longer warm-up and a 4x longer run; then the controls, P = 4 and
    PipeMare where it acts."""
    study = Study(setting, done)
    lrs = sweep(setting)
    cells = [v.cell(setting, lr) for v in (FLUSH, PACI, *COMPENSATED) for lr in lrs]
    best_comp = study.best_compensated() if all(study.swept(v) for v in (FLUSH, PACI, *COMPENSATED)) else None
    if best_comp is not None:  # the best rates again: 3 seeds and a longer warm-up
        best = {v: study.best_lr(v) for v in (FLUSH, PACI, best_comp)}
        warmup = max(1, round(LONG_WARMUP * setting.steps))
        cells += [v.cell(setting, lr, seed=s) for v, lr in best.items() for s in setting.seeds]
        cells += [v.cell(setting, lr, warmup=warmup) for v, lr in best.items()]
        cells += [v.cell(setting, lr, steps=HORIZON * setting.steps) for v, lr in best.items()]
    cells += [v.cell(setting, lr) for v in CONTROLS for lr in lrs]
    if best_comp is not None:  # P = 4, and PipeMare where it acts
        cells += [v.cell(setting, lr, stages=4) for v in (PACI, best_comp) for lr in lrs[:3]]
        cells += [v.cell(setting, lr) for v in PIPEMARE for lr in lrs[:2]]
    if study.swept(NESTEROV_ALL) and study.swept(CONTROLS[0]):  # does NAdamW catch up over a longer run?
        cells += [v.cell(setting, study.best_lr(v), steps=HORIZON * setting.steps) for v in (NESTEROV_ALL, CONTROLS[0])]
    if setting is not QUICK:  # the newer remedies, swept at the rates around the old prediction's best
        # predict-window (AdamW's default on paci since it measured best) with seeds at its best rate,
        # its gains, a synchronous start, then DC-ASGD (its curvature measured at 1e-5..1e-8 of the gradient)
        cells += [WINDOW[0].cell(setting, lr) for lr in lrs[:3]]
        if all(study.get(WINDOW[0].cell(setting, lr)) for lr in lrs[:3]):
            cells += [WINDOW[0].cell(setting, study.best_lr(WINDOW[0]), seed=s) for s in setting.seeds]
        cells += [v.cell(setting, lr) for v in WINDOW[1:] for lr in lrs[:3]]
        if (paci_lr := study.best_lr(PACI)) is not None:
            cells += [PACI.cell(setting, paci_lr, sync_steps=round(share * setting.steps)) for share in SYNC_START]
        cells += [v.cell(setting, lr) for v in DC for lr in lrs[:3]]
    if best_comp is not None:  # last, the costliest: 3 seeds of the longer runs too
        cells += [v.cell(setting, lr, steps=HORIZON * setting.steps, seed=s) for v, lr in best.items() for s in setting.seeds]
    return [c for c in dict.fromkeys(cells) if c.name not in done]


# ----------------------------------------------------------------------------------------------
# The report


def _loss(result: dict | None) -> str:
    return f"{result['final_val_loss']:.3f}" if result else "-"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f} ({len(values)})"


def report(study: Study) -> list[str]:
    st, lrs = study.setting, study.lrs
    flush_lr = study.best_lr(FLUSH)
    flush = study.final(FLUSH, flush_lr) if flush_lr else math.inf
    lines = [f"Setting: {st.preset} GPT (vocab {st.vocab_size}), P = {st.stages}, split {st.split}, m = {st.flush_m}, "
             f"{st.global_batch} x {st.seq_len} tokens per step, {st.steps} steps, warm-up 5%, cosine to 10%.", "",
             "Final validation loss (seed 0) against the peak learning rate:", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | at its best, vs flush's best |"
             + " at flush's lr, vs flush |", "|---|" + "---|" * (len(lrs) + 3)]
    for v in VARIANTS + PIPEMARE + WINDOW + DC:
        best = study.best_lr(v)
        at_best = study.final(v, best) if best else math.inf
        at_flush = study.final(v, flush_lr) if flush_lr else math.inf
        lines.append(f"| {v.label} | " + " | ".join(_loss(study.get(v.cell(st, lr))) for lr in lrs) +
                     f" | {best or '-'} | {_gap(at_best, flush)} | {_gap(at_flush, flush)} |")
    lines += ["", "The best rates again: a 20% warm-up, P = 4, 3 seeds, and a 4x longer run:", "",
              "| variant | lr | warm-up 20% | P = 4 | seeds (mean ± std) | 4x steps, seeds |", "|---|---|---|---|---|---|"]
    warmup = max(1, round(LONG_WARMUP * st.steps))
    for v in (FLUSH, PACI, *COMPENSATED, CONTROLS[0]):  # NAdamW on every stage runs long beside its flush control
        lr = study.best_lr(v)
        if lr is None:
            continue
        p4 = "-" if v.schedule == "1f1b" else " / ".join(
            f"{_loss(study.get(v.cell(st, x, stages=4)))} @{x:g}" for x in sweep(st)[:3])
        lines.append(f"| {v.label} | {lr:g} | {_loss(study.get(v.cell(st, lr, warmup=warmup)))} | {p4} | "
                     f"{_mean_std(study.seeds(v, lr))} | {_mean_std(study.seeds(v, lr, steps=HORIZON * st.steps))} |")
    if (paci_lr := study.best_lr(PACI)) is not None:
        lines += ["", f"A synchronous start (`--sync-steps N`: the first N steps 1F1B-flush, then PACI), at PACI's "
                      f"best lr {paci_lr:g}, seed 0; N = 0 is plain PACI:", "",
                  "| N | share of the run | final val loss | vs flush's best |", "|---|---|---|---|"]
        for share in (0.0, *SYNC_START):
            n = round(share * st.steps)
            value = study.final(PACI, paci_lr, **({"sync_steps": n} if n else {}))
            lines.append(f"| {n} | {share:.0%} | {'-' if math.isinf(value) else f'{value:.3f}'} | {_gap(value, flush)} |")
    return lines


def _gap(value: float, flush: float) -> str:
    return "-" if math.isinf(value) or math.isinf(flush) else f"{value:.3f} ({value - flush:+.3f})"


def horizon_pairs(study: Study) -> list[tuple[Variant, Variant]]:
    """(variant, its synchronous baseline) run at both horizons: PACI and the best compensation
    against 1F1B-flush (AdamW), NAdamW on every stage against flush with the same NAdamW."""
    best = study.best_compensated()
    return [(PACI, FLUSH), *([(best, FLUSH)] if best else []), (NESTEROV_ALL, CONTROLS[0])]


def horizon_gaps(study: Study, variant: Variant, baseline: Variant, steps: int) -> list[float]:
    """Per seed run by both (each at its own best rate of the 400-step sweep), the final loss gap."""
    more = {} if steps == study.setting.steps else {"steps": steps}
    lr, base_lr = study.best_lr(variant), study.best_lr(baseline)
    if lr is None or base_lr is None:
        return []
    gaps = []
    for seed in study.setting.seeds:
        mine = study.get(variant.cell(study.setting, lr, seed=seed, **more))
        theirs = study.get(baseline.cell(study.setting, base_lr, seed=seed, **more))
        if mine and theirs:
            gaps.append(mine["final_val_loss"] - theirs["final_val_loss"])
    return gaps


def plot(study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = study.setting
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for v in VARIANTS + PIPEMARE:
        points = [(lr, r["final_val_loss"]) for lr in study.lrs if (r := study.get(v.cell(st, lr)))]
        if points:
            left.plot(*zip(*points), "o-", label=v.label)
    left.set_xscale("log")
    left.set_xticks(study.lrs, [f"{lr:g}" for lr in study.lrs])
    left.minorticks_off()
    left.set_xlabel("peak learning rate")
    left.set_ylabel(f"final validation loss ({st.steps} steps)")
    left.set_title("Each variant across the learning rate")
    for v, baseline in horizon_pairs(study):
        points = [(steps, gaps) for steps in (st.steps, HORIZON * st.steps)
                  if (gaps := horizon_gaps(study, v, baseline, steps))]
        if points:
            middle.errorbar([steps for steps, _ in points], [statistics.mean(g) for _, g in points],
                            yerr=[statistics.stdev(g) if len(g) > 1 else 0.0 for _, g in points], fmt="o-",
                            capsize=3, label=f"{v.label} − {baseline.label}")
    middle.axhline(0.0, color="grey", lw=0.8)
    middle.set_ylim(top=middle.get_ylim()[1] + 0.2)  # room for the legend above the curves
    middle.set_xscale("log")
    middle.set_xticks([st.steps, HORIZON * st.steps], [str(st.steps), str(HORIZON * st.steps)])
    middle.minorticks_off()
    middle.set_xlabel("training steps (the same schedule of lr, stretched)")
    middle.set_ylabel("final validation loss − its synchronous baseline's")
    middle.set_title("The gap against the horizon (each at its best lr)")
    for v in (FLUSH, PACI, *COMPENSATED, CONTROLS[0]):  # NAdamW on every stage runs long beside its flush control
        lr = study.best_lr(v)
        if lr and (r := study.get(v.cell(st, lr))):
            right.plot(*zip(*r["eval"]), label=f"{v.label}, lr {lr:g}")
    right.set_xlabel("optimizer step")
    right.set_ylabel("validation loss")
    right.set_ylim(top=min(right.get_ylim()[1], 7.0))
    right.set_title("At each variant's best learning rate")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right" if ax is middle else "best")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "cells", "report"])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 stages, 12 steps: about a minute")
    parser.add_argument("--cache", type=Path, help="cells folder's parent (default: tta.py's, shared)")
    parser.add_argument("--workers", type=int, default=2, help="quality runs at once, one thread each")
    parser.add_argument("--plot", type=Path, help="PNG (default docs/figures/quality.png; quick: in the cache)")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    cache = args.cache or HERE / "results" / ("tta-quick" if args.quick else "tta")
    if args.command in ("all", "cells"):
        run_cells(setting, cache, args.workers, lambda done: planned_cells(setting, done))
    if args.command in ("all", "report"):
        study = Study(setting, load_cells(cache))
        print("\n".join(report(study)))
        plot(study, args.plot or (cache / "quality.png" if args.quick else HERE.parent / "docs" / "figures" /
                                  "quality.png"))


if __name__ == "__main__":
    main()
