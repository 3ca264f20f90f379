"""The optimizer as an axis of the time-to-accuracy study: does PACI keep flush's quality with Muon?

experiments/tta.py found that with AdamW PACI's one-update delay costs 0.5-0.6 nats at P = 8,
more than its faster steps buy back. The literature blames the optimizer (Zmushko et al. 2026,
arXiv 2606.30634: a one-step delay costs AdamW 0.28 nats on a 360M model and Muon 0.012). This
study repeats tta.py's cells with `--optimizer muon` (paci.optim.MuonAdamW: torch's Muon on the
hidden matrices, AdamW on embeddings, head and 1-D parameters) on the same setting (the `deep`
GPT, P = 8, 64 x 64 tokens per step, 400 steps, the pinned split), and with AdamW at beta1 0.98,
the other delay-robust choice the literature names:

* each of flush (m = 8) and PACI (K = m = 8) at its own best learning rate, from a sweep that
  starts at 1e-3 .. 8e-3 (Muon) or 5e-4 .. 2e-3 (AdamW 0.98) and is extended by factors of 2 while
  the best is at an edge; the headline cells with 3 seeds; the 1600-step pair with Muon;
* PACI at m = K in {1, 2, 4, 16, 32} with Muon (the drift ablation), bracketed the same way
  around PACI's best at m = 8;
* time to target on the calibrated clock of tta.py, whose optimizer step U is charged as measured
  here for each optimizer (`add_optimizer_clock`: MuonAdamW and AdamW stepped side by side per
  stage, one thread, and the stored AdamW U scaled by the ratio);
* Speedup_best against the fastest synchronous schedule with the same optimizer, and against the
  fastest synchronous schedule with any optimizer; the equal wall-clock budget.

    .venv/bin/python experiments/optimizers.py [--workers 2] [--quick]   # clock, cells, report
    .venv/bin/python experiments/optimizers.py report                    # tables and plot from the cache

It shares tta.py's cache (experiments/results/tta/cells, one JSON file per cell, committed): the
AdamW cells are tta.py's, the new ones are added beside them. Cost: about 45 cells of 4-6
CPU-minutes (one thread; m = 32 and the 1600-step pair are slower), roughly 5 CPU-hours on the
2-core machine. --quick (tiny model, 4 stages, 12 steps) takes about a minute and is what CI runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import save_figure  # noqa: E402
from tta import (BUDGET_SYNC, FULL, QUICK, Cell, Setting, crossing_step, load_cells, make_clock,  # noqa: E402
                 run_cells, step_time)

# The optimizers on the axis: (name for --optimizer, beta1) -> the first learning rates tried.
OPTIMIZERS = {("adamw", 0.9): FULL.lrs, ("muon", 0.9): (1e-3, 2e-3, 4e-3, 8e-3), ("adamw", 0.98): (5e-4, 1e-3, 2e-3)}
QUICK_LRS = {("adamw", 0.9): QUICK.lrs, ("muon", 0.9): (0.016, 0.032, 0.064)}  # CI's smoke test: Muon only
LONG_STEPS = 1600  # the headline pair's length
HORIZONS = (400, 1600, 6400)  # the regime grid: the gap against the run's length (steps at FULL's 400)
PAPER_LR, PAPER_WARMUP = 3e-4, 0.01  # the paper's absolute recipe: peak lr, warm-up share
DRIFT_M = (1, 2, 4, 16, 32)  # PACI at K = m besides the setting's flush_m
LR_LIMITS = (1e-5, 0.1)  # the sweep never goes beyond
COMPENSATIONS = ("none", "predict")  # PACI's variants on the axis (tta.py ran AdamW's predict cells)


def label(opt: tuple[str, float]) -> str:
    return opt[0] if opt[1] == 0.9 else f"{opt[0]} β1 {opt[1]:g}"


def cell(schedule: str, m: int, lr: float, opt: tuple[str, float], **kw) -> Cell:
    return Cell(schedule, m, lr, optimizer=opt[0], beta1=opt[1], **kw)


def loss(done: dict[str, dict], c: Cell, seeds: tuple[int, ...] = (0,)) -> float:
    values = [done[n]["final_val_loss"] for s in seeds if (n := dataclasses.replace(c, seed=s).name) in done]
    values = [v if math.isfinite(v) else math.inf for v in values]
    return sum(values) / len(values) if values else math.inf


def bracket(done: dict[str, dict], make, start: tuple[float, ...]) -> tuple[list[Cell], float | None]:
    """(cells still to run, the best learning rate once it is bracketed): the `start` rates, then one
    factor of 2 beyond whichever edge holds the best, until the best has a neighbour on both sides."""
    lrs = sorted(set(start) | {c["lr"] for c in done.values() if make(c["lr"]).name == c["name"]})
    missing = [make(lr) for lr in lrs if make(lr).name not in done]
    if missing:
        return missing, None
    best = min(lrs, key=lambda lr: loss(done, make(lr)))
    if best == lrs[0] and best / 2 >= LR_LIMITS[0]:
        return [make(best / 2)], None
    if best == lrs[-1] and best * 2 <= LR_LIMITS[1]:
        return [make(best * 2)], None
    return [], best


def planned_cells(setting: Setting, done: dict[str, dict], clock: dict | None, starts: dict) -> list[Cell]:
    """Every cell not yet cached, most important first; cells that depend on a best rate appear once
    it is bracketed."""
    m = setting.flush_m
    todo: list[Cell] = []
    for opt in (o for o in starts if o != ("adamw", 0.9)):  # tta.py plans AdamW's own cells
        flush_cells, flush_lr = bracket(done, lambda lr: cell("1f1b", m, lr, opt), starts[opt])
        paci_cells, paci_lr = bracket(done, lambda lr: cell("paci", m, lr, opt), starts[opt])
        todo += flush_cells + paci_cells
        if flush_lr is None or paci_lr is None:
            continue
        heads = [cell("1f1b", m, flush_lr, opt), cell("paci", m, paci_lr, opt), cell("paci", m, flush_lr, opt)]
        todo += [dataclasses.replace(c, seed=s) for c in heads for s in setting.seeds]
        if opt[0] != "muon":
            continue
        near = tuple(lr for lr in (paci_lr / 2, paci_lr, paci_lr * 2) if LR_LIMITS[0] <= lr <= LR_LIMITS[1])
        predict_cells, predict_lr = bracket(done, lambda lr: cell("paci", m, lr, opt, compensate="predict"), near)
        todo += predict_cells
        if predict_lr is not None:
            todo += [cell("paci", m, predict_lr, opt, compensate="predict", seed=s) for s in setting.seeds]
        seeded = {}  # K > m with every seed run at its best rate: their mean final loss
        for k in (setting.microbatches if setting is QUICK else DRIFT_M):  # quick: at PACI's rate only
            if k != m and setting is QUICK:
                todo.append(cell("paci", k, paci_lr, opt))
            elif k != m:
                drift_cells, drift_lr = bracket(done, lambda lr, k=k: cell("paci", k, lr, opt), near)
                todo += drift_cells
                if k > m and drift_lr is not None:  # where PACI may come within seed noise of flush
                    todo += [cell("paci", k, drift_lr, opt, seed=s) for s in setting.seeds]
                    if (value := loss(done, cell("paci", k, drift_lr, opt), setting.seeds)) < math.inf and all(
                            cell("paci", k, drift_lr, opt, seed=s).name in done for s in setting.seeds):
                        seeded[k] = (value, drift_lr)
        long = setting.steps * LONG_STEPS // FULL.steps
        todo.append(cell("1f1b", m, flush_lr, opt, steps=long))
        if seeded:  # the long run of PACI's best K first: the recommended setting
            k = min(seeded, key=lambda k: seeded[k][0])
            todo.append(cell("paci", k, seeded[k][1], opt, steps=long))
        todo.append(cell("paci", m, paci_lr, opt, steps=long))
        if clock is not None and (budget := equal_budget_steps(setting, clock, opt)) != setting.steps:
            todo += [cell("paci", m, lr, opt, steps=budget) for lr in dict.fromkeys((paci_lr, flush_lr))]
    todo += regime_cells(setting, done, starts)
    return [c for c in dict.fromkeys(todo) if c.name not in done]


def regime_cells(setting: Setting, done: dict[str, dict], starts: dict) -> list[Cell]:
    """Issue 19's regime grid, last: AdamW and Muon, flush and PACI at flush's m, each at its best
    rate of the full-length sweep, over every horizon; PACI at flush's rate too (matched) up to
    the middle one; and one pair at the paper's absolute recipe (lr 3e-4, 1% warm-up)."""
    m, cells, longest = setting.flush_m, [], []
    for opt in (("adamw", 0.9), ("muon", 0.9)):
        if opt not in starts:
            continue
        flush_lr = bracket(done, lambda lr: cell("1f1b", m, lr, opt), starts[opt])[1]
        paci_lr = bracket(done, lambda lr: cell("paci", m, lr, opt), starts[opt])[1]
        if flush_lr is None or paci_lr is None:
            continue
        for h in HORIZONS[1:2] if setting is QUICK else HORIZONS[1:]:  # CI's smoke test: not the longest
            steps = setting.steps * h // FULL.steps
            pair = [cell("1f1b", m, flush_lr, opt, steps=steps), cell("paci", m, paci_lr, opt, steps=steps)]
            (longest if h == HORIZONS[-1] else cells).extend(pair)
            if h <= HORIZONS[1]:
                cells.append(cell("paci", m, flush_lr, opt, steps=steps))
        warmup = max(1, round(PAPER_WARMUP * setting.steps))
        cells += [cell(s, m, PAPER_LR, opt, warmup=warmup) for s in ("1f1b", "paci")]
    return cells + longest  # the longest horizon's runs (over an hour each) after every short one


# ----------------------------------------------------------------------------------------------
# The clock, with each optimizer's step


def on_clock(schedule: str, opt: tuple[str, float], compensate: str = "none") -> str:
    """The clock's name for `schedule` run with `opt` and `compensate` (tta.step_time's schedule
    argument): AdamW at any beta1 steps in the same time."""
    name = schedule if opt[0] == "adamw" else f"{schedule}-{opt[0]}"
    return name if compensate == "none" else f"{name}-{compensate}"


def add_optimizer_clock(setting: Setting, cache: Path, clock: dict, name: str = "muon", repeats: int = 50) -> dict:
    """tta.py's clock with `name`'s optimizer step: per stage and m, the stored AdamW U times the
    measured ratio of `name`'s step to AdamW's (both as a stage builds them, stepped alternately on
    the same parameters, one thread, medians); added to clock.json once."""
    if all(f"1f1b-{name}-m{m}" in clock["step_end_s"] for m in setting.microbatches):
        return clock
    from clock import model_config, step_end_times, update_costs
    from paci import schedules

    config = model_config(setting.preset, setting.vocab_size)
    ranges = setting.ranges()
    measured = update_costs(config, ranges, ("adamw", name), repeats=repeats)
    ratios = [b / a for a, b in zip(measured["adamw"], measured[name])]
    clock.setdefault("optimizers", {})[name] = {"update_ratio": ratios}
    for m in setting.microbatches:
        costs = optimizer_costs(setting, clock, m, name)
        for schedule in (*BUDGET_SYNC, "paci"):
            ends = step_end_times(schedules.build(schedule, setting.stages, m, setting.steps), costs)
            clock["step_end_s"][f"{schedule}-{name}-m{m}"] = [round(t, 6) for t in ends]
    (cache / "clock.json").write_text(json.dumps(clock) + "\n")
    return clock


def optimizer_costs(setting: Setting, clock: dict, m: int, name: str):
    """The clock's stored per-stage costs at m, each update scaled by `name`'s measured ratio to AdamW's."""
    from clock import model_config
    from paci.sim import CostModel

    stored, ratios = clock["costs"][str(m)], clock["optimizers"][name]["update_ratio"]
    activation = setting.batch_size(m) * setting.seq_len * model_config(setting.preset, setting.vocab_size).n_embd * 4
    return CostModel.from_dict({"forward": stored["forward_s"], "backward": stored["backward_s"],
                                "weight": stored["weight_s"], "update": [u * r for u, r in zip(stored["update_s"], ratios)],
                                "latency": clock["link"]["latency_s"], "bandwidth": clock["link"]["bandwidth_Bps"],
                                "message_bytes": [activation] * (setting.stages - 1) + [0], "time_unit": "s"})


def add_predicted_clock(setting: Setting, cache: Path, clock: dict, name: str = "muon") -> dict:
    """PACI + predict with `name` on the clock: its costs with each stage's forward longer by its
    predicted share of the measured extra, and its update by the window's one orthogonalisation
    (experiments/clock.py predicted_forwards, one thread); added to clock.json once."""
    if all(f"paci-{name}-predict-m{m}" in clock["step_end_s"] for m in setting.microbatches):
        return clock
    from clock import model_config, predicted_forwards, step_end_times, with_predicted_forwards
    from paci import schedules

    config = model_config(setting.preset, setting.vocab_size)
    ranges = setting.ranges()
    for m in setting.microbatches:
        schedule = schedules.build("paci", setting.stages, m, setting.steps)
        measured = predicted_forwards(config, ranges, setting.batch_size(m), setting.seq_len, schedule,
                                      repeats=5 if setting is QUICK else 30, optimizer=name)
        clock["optimizers"][name].setdefault("predict", {})[str(m)] = measured
        costs = with_predicted_forwards(optimizer_costs(setting, clock, m, name), measured)
        clock["step_end_s"][f"paci-{name}-predict-m{m}"] = [round(t, 6) for t in step_end_times(schedule, costs)]
    (cache / "clock.json").write_text(json.dumps(clock) + "\n")
    return clock


def equal_budget_steps(setting: Setting, clock: dict, opt: tuple[str, float]) -> int:
    """Steps PACI at flush's m takes, with `opt`, in the time the fastest synchronous setting with `opt`
    needs for the full run."""
    fastest = min(step_time(clock, on_clock(s, opt), m, setting.steps) for s in BUDGET_SYNC for m in setting.microbatches)
    period = step_time(clock, on_clock("paci", opt), setting.flush_m, setting.steps) / setting.steps
    return int(fastest / period)


# ----------------------------------------------------------------------------------------------
# The report


@dataclass
class Axis:
    """The cached cells seen along the optimizer axis."""

    setting: Setting
    clock: dict
    done: dict[str, dict]
    starts: dict

    def opts(self) -> list[tuple[str, float]]:
        """The optimizers with a bracketed flush and PACI rate at flush's m."""
        m = self.setting.flush_m
        return [opt for opt in self.starts if all(
            bracket(self.done, lambda lr, s=s: cell(s, m, lr, opt), self.starts[opt])[1] is not None
            for s in ("1f1b", "paci"))]

    def lrs(self, schedule: str, m: int, opt: tuple[str, float], compensate: str = "none") -> list[float]:
        return sorted({c["lr"] for c in self.done.values()
                       if cell(schedule, m, c["lr"], opt, compensate=compensate).name == c["name"]})

    def best(self, schedule: str, m: int, opt: tuple[str, float], compensate: str = "none") -> float | None:
        lrs = self.lrs(schedule, m, opt, compensate)
        return min(lrs, key=lambda lr: loss(self.done, cell(schedule, m, lr, opt, compensate=compensate))) \
            if lrs else None

    def get(self, c: Cell) -> dict | None:
        return self.done.get(c.name)

    def seeds(self, c: Cell) -> tuple[float, float, int] | None:
        values = [r["final_val_loss"] for s in self.setting.seeds if (r := self.get(dataclasses.replace(c, seed=s)))]
        if not values:
            return None
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return mean, std, len(values)

    def fastest_sync(self, opt: tuple[str, float], target: float, seed: int = 0) -> tuple[float | None, str]:
        """The fastest synchronous (schedule, m) to `target` on flush's trajectory with `opt` at its best lr."""
        m = self.setting.flush_m
        flush = self.get(cell("1f1b", m, self.best("1f1b", m, opt), opt, seed=seed))
        step = crossing_step(flush["eval"], target) if flush else None
        if step is None:
            return None, "-"
        return min((step_time(self.clock, on_clock(s, opt), k, step), f"{s} m={k}") for s in BUDGET_SYNC
                   for k in self.setting.microbatches)

    def fastest_paci(self, opt: tuple[str, float], target: float, seed: int = 0) -> tuple[float | None, str]:
        """The fastest PACI (K = m, over the m and compensations run, each at its best lr) to `target` with `opt`."""
        options = []
        for k in self.setting.microbatches:
            for comp in COMPENSATIONS:
                lr = self.best("paci", k, opt, comp)
                run = self.get(cell("paci", k, lr, opt, compensate=comp, seed=seed)) if lr is not None else None
                step = crossing_step(run["eval"], target) if run else None
                if step is not None and f"{on_clock('paci', opt, comp)}-m{k}" in self.clock["step_end_s"]:
                    options.append((step_time(self.clock, on_clock("paci", opt, comp), k, step),
                                    f"m={k}" + ("" if comp == "none" else f" +{comp}")))
        return min(options) if options else (None, "-")

    def targets(self) -> list[float]:
        """The best final loss any flush reaches (mean over seeds), and looser ones below the start."""
        m = self.setting.flush_m
        finals = {opt: self.seeds(cell("1f1b", m, self.best("1f1b", m, opt), opt))[0] for opt in self.opts()}
        best = min(finals.values())
        start = min(self.get(cell("1f1b", m, self.best("1f1b", m, opt), opt))["eval"][0][1] for opt in self.opts())
        worst = max(finals.values())
        gaps = sorted({round(best + g, 3) for g in (1.0, 0.5, 0.2, 0.1, 0.05, 0.0)} | {round(worst, 3)}, reverse=True)
        return [t for t in gaps if t < start]


def _fmt(seconds: float | None, name: str = "") -> str:
    return "not reached" if seconds is None else f"{seconds:.3g} s" + (f" ({name})" if name else "")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def report(setting: Setting, clock: dict, done: dict[str, dict], starts: dict) -> list[str]:
    axis = Axis(setting, clock, done, starts)
    st, m = setting, setting.flush_m
    lines = [f"Setting: tta.py's ({st.preset} GPT, vocab {st.vocab_size}, P = {st.stages}, split {st.split}, "
             f"{st.global_batch} x {st.seq_len} tokens per step, {st.steps} steps, warm-up 5%, cosine to 10%); "
             f"the optimizer varies. Synchronous schedules: {', '.join(BUDGET_SYNC)} on flush's trajectory.", ""]
    if "optimizers" in clock:
        ratios = clock["optimizers"]["muon"]["update_ratio"]
        lines += ["Optimizer step U per stage on the clock, Muon (MuonAdamW) / AdamW, measured side by side, one thread: " +
                  ", ".join(f"{r:.1f}" for r in ratios) + ".", "",
                  "| m | " + " | ".join(f"{s} {o}" for o in ("adamw", "muon") for s in (*BUDGET_SYNC, "paci")) + " |",
                  "|---|" + "---|" * (2 * len(BUDGET_SYNC) + 2)]
        for k in st.microbatches:
            lines.append(f"| {k} | " + " | ".join(
                f"{step_time(clock, on_clock(s, (o, 0.9)), k, st.steps) / st.steps:.3f}"
                for o in ("adamw", "muon") for s in (*BUDGET_SYNC, "paci")) + " |")
        lines += ["", "(seconds per step, steady state, on the calibrated clock)", ""]
    lines += ["Final validation loss after the full run, seed 0, over each optimizer's learning-rate sweep:", ""]
    for opt in starts:
        ks = sorted({m, *st.microbatches, *(() if st is QUICK else DRIFT_M)})
        rows = [("1f1b", m, "none", f"flush m={m}")] + [
            ("paci", k, comp, f"paci{'' if comp == 'none' else '+' + comp} K=m={k}")
            for comp in COMPENSATIONS for k in ks if axis.lrs("paci", k, opt, comp)]
        lrs = sorted({lr for schedule, k, comp, _ in rows for lr in axis.lrs(schedule, k, opt, comp)})
        if not lrs:
            continue
        lines += [f"{label(opt)}:", "", "| run | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]
        for schedule, k, comp, name in rows:
            lines.append(f"| {name} | " + " | ".join(
                f"{r['final_val_loss']:.3f}" if (r := axis.get(cell(schedule, k, lr, opt, compensate=comp))) else "-"
                for lr in lrs) + " |")
        lines.append("")
    lines += [f"Headline cells over seeds {list(st.seeds)} (final validation loss, mean ± std); the gap is to flush "
              "with the same optimizer:", "", "| optimizer | run | seeds | final val loss | gap to flush |",
              "|---|---|---|---|---|"]
    for opt in axis.opts():
        flush_lr, paci_lr = axis.best("1f1b", m, opt), axis.best("paci", m, opt)
        flush = axis.seeds(cell("1f1b", m, flush_lr, opt))
        runs = {cell("1f1b", m, flush_lr, opt): f"flush m={m}, lr {flush_lr:g}",
                cell("paci", m, flush_lr, opt): f"paci m={m}, lr {flush_lr:g} (flush's best)",
                cell("paci", m, paci_lr, opt): f"paci m={m}, lr {paci_lr:g} (its best)"}  # the last name wins
        if (predict_lr := axis.best("paci", m, opt, "predict")) is not None:
            runs[cell("paci", m, predict_lr, opt, compensate="predict")] = \
                f"paci+predict m={m}, lr {predict_lr:g} (its best)"
        for c, name in runs.items():
            if (stats := axis.seeds(c)) is None:
                continue
            gap = "" if c.schedule == "1f1b" else f"{stats[0] - flush[0]:+.3f}"
            lines.append(f"| {label(opt)} | {name} | {stats[2]} | {stats[0]:.3f} ± {stats[1]:.3f} | {gap} |")
    opts = axis.opts()
    if opts:
        lines += ["", "Time to target validation loss on the calibrated clock (seed 0, each run at its own best lr): "
                  "the fastest synchronous setting and the fastest PACI (K = m, plain or +predict, over what was run) "
                  "per optimizer; "
                  "Speedup same = that optimizer's fastest sync / its fastest PACI; Speedup any = the fastest sync "
                  "with any optimizer / the fastest PACI with any optimizer:", "",
                  "| target | " + " | ".join(f"sync {label(o)} | paci {label(o)} | Speedup same" for o in opts) +
                  " | Speedup any |", "|---|" + "---|" * (3 * len(opts) + 1)]
        for target in axis.targets():
            sync = {o: axis.fastest_sync(o, target) for o in opts}
            paci = {o: axis.fastest_paci(o, target) for o in opts}
            best_sync = min((t for t, _ in sync.values() if t is not None), default=None)
            best_paci = min((t for t, _ in paci.values() if t is not None), default=None)
            lines.append(f"| {target:.3f} | " + " | ".join(
                f"{_fmt(*sync[o])} | {_fmt(*paci[o])} | {_ratio(sync[o][0], paci[o][0])}" for o in opts) +
                f" | {_ratio(best_sync, best_paci)} |")
    lines += seed_table(axis) + budget_table(axis) + drift_table(axis) + long_table(axis) + regime_table(axis)
    return lines


def regime_table(axis: Axis) -> list[str]:
    """The gap to flush against the horizon, at each one's best rate and at flush's, and at the paper's recipe."""
    st, m = axis.setting, axis.setting.flush_m
    lines = ["", "Where the regime changes (seed 0): the gap to flush against the run's length, each at its best "
                 f"rate of the {st.steps}-step sweep (the schedule of lr stretched), at flush's rate (matched), and "
                 f"at the paper's recipe (lr {PAPER_LR:g}, {PAPER_WARMUP:.0%} warm-up, {st.steps} steps):", "",
             "| optimizer | steps | flush | PACI (its rate) | gap | PACI (flush's rate) | gap |", "|---|---|---|---|---|---|---|"]
    fmt = lambda r: "not run" if r is None else f"{r['final_val_loss']:.3f}"  # noqa: E731
    gap = lambda r, f: "-" if r is None or f is None else f"{r['final_val_loss'] - f['final_val_loss']:+.3f}"  # noqa: E731
    for opt in axis.opts():
        if opt[1] != 0.9:
            continue
        flush_lr, paci_lr = axis.best("1f1b", m, opt), axis.best("paci", m, opt)
        for h in HORIZONS:
            steps = st.steps * h // FULL.steps
            extra = {} if steps == st.steps else {"steps": steps}
            flush = axis.get(cell("1f1b", m, flush_lr, opt, **extra))
            own, matched = (axis.get(cell("paci", m, lr, opt, **extra)) for lr in (paci_lr, flush_lr))
            lines.append(f"| {label(opt)} | {steps} | {fmt(flush)} | {fmt(own)} | {gap(own, flush)} | {fmt(matched)} | "
                         f"{gap(matched, flush)} |")
        warmup = max(1, round(PAPER_WARMUP * st.steps))
        flush, paci = (axis.get(cell(s, m, PAPER_LR, opt, warmup=warmup)) for s in ("1f1b", "paci"))
        lines.append(f"| {label(opt)}, paper's recipe | {st.steps} | {fmt(flush)} | {fmt(paci)} | {gap(paci, flush)} | | |")
    return lines


def seed_table(axis: Axis) -> list[str]:
    """Speedup same per seed: each seed's flush trajectory against the fastest PACI among the runs of
    that seed (the m and compensations with all seeds, each at its seed-0 best lr)."""
    st, lines = axis.setting, []
    for opt in axis.opts():
        rows = []
        for target in axis.targets():
            ratios = []
            for seed in st.seeds:
                (sync, _), (paci, name) = axis.fastest_sync(opt, target, seed), axis.fastest_paci(opt, target, seed)
                ratios.append("flush: not reached" if sync is None else "PACI: not reached" if paci is None
                              else f"{sync / paci:.2f}x ({name})")
            if any(r.endswith(")") for r in ratios):
                rows.append(f"| {target:.3f} | " + " | ".join(ratios) + " |")
        if rows:
            lines += ["", f"Speedup same per seed, {label(opt)} (seed s of flush against the fastest PACI of seed s):",
                      "", "| target | " + " | ".join(f"seed {s}" for s in st.seeds) + " |",
                      "|---|" + "---|" * len(st.seeds), *rows]
    return lines


def budget_table(axis: Axis) -> list[str]:
    st, m = axis.setting, axis.setting.flush_m
    lines = ["", f"Equal wall-clock budget: PACI m={m} gets the steps its speed buys in the time the fastest "
                 "synchronous setting with the same optimizer needs for the full run (seed 0):", "",
             "| optimizer | run | steps | final val loss | vs flush |", "|---|---|---|---|---|"]
    for opt in axis.opts():
        if opt[0] != "muon":
            continue
        flush_lr, paci_lr = axis.best("1f1b", m, opt), axis.best("paci", m, opt)
        flush = axis.get(cell("1f1b", m, flush_lr, opt))
        steps = equal_budget_steps(st, axis.clock, opt)
        lines.append(f"| {label(opt)} | flush, lr {flush_lr:g} | {st.steps} | {flush['final_val_loss']:.3f} | |")
        for lr in dict.fromkeys((paci_lr, flush_lr)):
            r = axis.get(cell("paci", m, lr, opt, steps=None if steps == st.steps else steps))
            lines.append(f"| {label(opt)} | paci m={m}, lr {lr:g} | {steps} | "
                         f"{'not run' if r is None else format(r['final_val_loss'], '.3f')} | "
                         f"{'-' if r is None else format(r['final_val_loss'] - flush['final_val_loss'], '+.3f')} |")
    return lines


def drift_table(axis: Axis) -> list[str]:
    """PACI + Muon at K = m against flush + Muon: at PACI's best lr at flush's m, and each K at its own best."""
    st, m, opt = axis.setting, axis.setting.flush_m, ("muon", 0.9)
    if opt not in axis.opts():
        return []
    paci_lr, flush_lr = axis.best("paci", m, opt), axis.best("1f1b", m, opt)
    flush = axis.seeds(cell("1f1b", m, flush_lr, opt))
    same = axis.get(cell("1f1b", m, paci_lr, opt))
    lines = ["", f"Drift ablation with Muon (P = {st.stages}, K = m): the gap to flush + Muon at its best "
                 f"(lr {flush_lr:g}, {flush[0]:.3f} ± {flush[1]:.3f} over {flush[2]} seeds: the seed noise) and to "
                 f"flush at the same lr {paci_lr:g}" + (f" ({same['final_val_loss']:.3f})" if same else "") + ":", "",
             "| K | bound ⌈(P−1−s)/K⌉ at s = 0 | mean Δ | at lr " + f"{paci_lr:g} | gap to flush, same lr | "
             "own best lr | at it (mean ± std over seeds where run) | gap to flush's best |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted({m, *(st.microbatches if st is QUICK else DRIFT_M)}):
        r = axis.get(cell("paci", k, paci_lr, opt))
        best = axis.best("paci", k, opt)
        own = axis.get(cell("paci", k, best, opt)) if best is not None else None
        if r is None and own is None:
            continue
        ref = r or own
        histogram = ref["drift_histogram"]
        mean = sum(int(d) * n for d, n in histogram.items()) / max(1, sum(histogram.values()))
        at = f"{r['final_val_loss']:.3f}" if r else "-"
        gap_same = f"{r['final_val_loss'] - same['final_val_loss']:+.3f}" if r and same else "-"
        seeds = axis.seeds(cell("paci", k, best, opt))
        at_best = f"{seeds[0]:.3f}" + (f" ± {seeds[1]:.3f} ({seeds[2]} seeds)" if seeds[2] > 1 else "")
        lines.append(f"| {k} | {math.ceil((st.stages - 1) / k)} | {mean:.3f} | {at} | {gap_same} | {best:g} | "
                     f"{at_best} | {seeds[0] - flush[0]:+.3f} |")
    return lines


def long_table(axis: Axis) -> list[str]:
    st, m, opt = axis.setting, axis.setting.flush_m, ("muon", 0.9)
    if opt not in axis.opts():
        return []
    long = st.steps * LONG_STEPS // FULL.steps
    rows = [(f"flush m={m}", axis.get(cell("1f1b", m, axis.best("1f1b", m, opt), opt, steps=long)))] + [
        (f"paci K=m={k}", axis.get(cell("paci", k, axis.best("paci", k, opt), opt, steps=long)))
        for k in sorted({m, *DRIFT_M}) if axis.best("paci", k, opt) is not None]
    if not any(r for _, r in rows):
        return []
    lines = ["", f"The headline pair with Muon over {long} steps (seed 0, each at its best lr at {st.steps} steps):", "",
             "| run | lr | final val loss | gap to flush |", "|---|---|---|---|"]
    flush = rows[0][1]
    for name, r in rows:
        if r is not None:
            gap = "" if r is flush or flush is None else f"{r['final_val_loss'] - flush['final_val_loss']:+.3f}"
            lines.append(f"| {name} | {r['lr']:g} | {r['final_val_loss']:.3f} | {gap} |")
    return lines


def plot(setting: Setting, clock: dict, done: dict[str, dict], starts: dict, path: Path) -> None:
    """Validation loss against calibrated wall-clock: each optimizer's fastest sync trajectory and PACI at flush's m."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = Axis(setting, clock, done, starts)
    m = setting.flush_m
    fig, ax = plt.subplots(figsize=(8, 5))
    targets = axis.targets() if axis.opts() else []
    for opt, color in zip(axis.opts(), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        flush_lr, paci_lr = axis.best("1f1b", m, opt), axis.best("paci", m, opt)
        _, name = axis.fastest_sync(opt, targets[0]) if targets else (None, "-")  # a target every optimizer reaches
        schedule, k = (name.split(" m=")[0], int(name.split(" m=")[1])) if name != "-" else ("1f1b", m)
        flush = axis.get(cell("1f1b", m, flush_lr, opt))
        ax.plot([step_time(clock, on_clock(schedule, opt), k, s) for s, _ in flush["eval"]],
                [v for _, v in flush["eval"]], "-", color=color, lw=2,
                label=f"{label(opt)}: fastest sync {schedule if name == '-' else name} (lr {flush_lr:g})")
        paci = axis.get(cell("paci", m, paci_lr, opt))
        ax.plot([step_time(clock, on_clock("paci", opt), m, s) for s, _ in paci["eval"]],
                [v for _, v in paci["eval"]], "--", color=color, lw=1.5, label=f"{label(opt)}: paci K=m={m} (lr {paci_lr:g})")
    ax.set_xlabel(f"calibrated wall-clock (s): P = {setting.stages}, one core of this machine per stage")
    ax.set_ylabel("validation loss")
    if targets:
        ax.set_ylim(min(targets) - 0.2, min(targets) + 2.0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Time to accuracy with the optimizer as an axis: sync (solid) against PACI (dashed)")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "clock", "cells", "report"])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 stages, 12 steps: about a minute")
    parser.add_argument("--cache", type=Path, help="tta.py's results folder (default experiments/results/tta[-quick])")
    parser.add_argument("--workers", type=int, default=2, help="quality runs at once, one thread each")
    parser.add_argument("--plot", type=Path, help="PNG (default docs/figures/optimizers.png; quick: in the cache)")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    starts = QUICK_LRS if args.quick else OPTIMIZERS
    cache = args.cache or HERE / "results" / ("tta-quick" if args.quick else "tta")
    clock_file = cache / "clock.json"
    if args.command in ("all", "clock"):
        clock = add_optimizer_clock(setting, cache, make_clock(setting, cache), repeats=5 if args.quick else 50)
        clock = add_predicted_clock(setting, cache, clock)
    else:
        clock = json.loads(clock_file.read_text()) if clock_file.is_file() else None
    if args.command in ("all", "cells"):
        run_cells(setting, cache, args.workers, lambda done: planned_cells(setting, done, clock, starts))
    if args.command in ("all", "report"):
        if clock is None:
            raise SystemExit(f"no clock in {cache}: run `experiments/optimizers.py clock` first (on a quiet machine)")
        done = load_cells(cache)
        print("\n".join(report(setting, clock, done, starts)))
        plot(setting, clock, done, starts,
             args.plot or (cache / "optimizers.png" if args.quick else HERE.parent / "docs" / "figures" / "optimizers.png"))


if __name__ == "__main__":
    main()
