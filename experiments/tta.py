"""Time to accuracy at P = 8: does PACI reach a target validation loss sooner than 1F1B-flush?

The paper's headline (arXiv 2606.07881; GPT-2 Medium, 8 stages): PACI reaches a target
perplexity up to 1.69x sooner than the fastest 1F1B-flush setting, 2.04x sooner than flush at the
same number of micro-batches m. The same question at the scale two CPU cores allow:

* Model and data: the `deep` GPT (8 layers, width 128, 1024-token BPE vocabulary), the embedded
  corpus, P = 8 stages with one pinned split (profiled once on this machine, so that every run
  shares the layers' grouping into stages), a global batch of 64 sequences x 64 tokens per step
  cut into m micro-batches of 64/m, 400 steps, AdamW (warm-up 5%, cosine to 10%), validation on
  the same 64 held-out sequences every 20 steps. Data are numbered by sequence, so every run sees
  the same sequences in the same steps whatever m is.
* Quality: exact single-process runs (the schedule alone fixes every weight version; the
  multi-process runtime computes the same numbers bit for bit). 1F1B-flush is trained once, at
  m = 8: GPipe, 1F1B-flush and ZB-H1 at any m compute the same updates (to float summation
  order; tests/test_train.py), so, as the paper does, one trajectory is timed with each
  schedule's clock. PACI (K = m) is trained at every m, because m sets its drift bound.
* Time: the calibrated clock of experiments/clock.py, i.e. the simulator fed with per-op costs
  profiled here with one thread per stage at each micro-batch size, and the gloo link measured
  here. `clock.py check` compares it with real runs at P = 2.
* Fairness: every schedule is judged at its own best peak learning rate from a sweep, and also at
  flush's best. Headline cells get 3 seeds.

    .venv/bin/python experiments/tta.py [--workers 2] [--quick]    # clock, cells, report
    .venv/bin/python experiments/tta.py report                     # tables and plot from the cache

Every finished cell is a small JSON file under experiments/results/tta/ (committed), so an
interrupted study resumes where it stopped, in this session or the next. Cost of the full study:
about 30 quality runs of 4-8 CPU-minutes each (m = 32 is the slowest), roughly 3 CPU-hours on
the 2-core machine, plus about 2 minutes for the clock. --quick (tiny model, 4 stages, 12 steps)
takes under a minute and is what CI runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import save_figure  # noqa: E402


@dataclass(frozen=True)
class Setting:
    preset: str
    vocab_size: int
    stages: int
    splits: dict[int, str]  # P -> the pinned split ("uniform" or unit ranges)
    global_batch: int  # sequences per optimizer step
    seq_len: int
    steps: int
    eval_every: int
    eval_sequences: int
    microbatches: tuple[int, ...]  # m values; PACI runs with K = m
    flush_m: int  # the m at which the flush trajectory is trained
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]  # for the headline cells
    in_process: bool = False  # train the cells in this process, one at a time (the quick smoke test's
    # cells are so small that a fresh process's start, torch and its optimizers' imports, would be most of each)

    def batch_size(self, m: int) -> int:
        return self.global_batch // m

    @property
    def split(self) -> str:
        return self.splits[self.stages]

    def ranges(self) -> list[tuple[int, int]]:
        """The pinned split at the setting's P, as unit ranges."""
        from clock import model_config
        from paci.model import num_units
        from paci.partition import parse_split, uniform_split

        n = num_units(model_config(self.preset, self.vocab_size))
        return uniform_split(n, self.stages) if self.split == "uniform" else parse_split(self.split, n, self.stages)


# The splits were profiled once on this machine (experiments/clock.py profiled_split, micro-batch 8x64)
# and are pinned: which layers share a stage decides which weights a PACI backward sees.
FULL = Setting(preset="deep", vocab_size=1024, stages=8,
               splits={8: "0:3,3:5,5:7,7:10,10:12,12:14,14:16,16:18", 4: "0:5,5:10,10:14,14:18", 2: "0:10,10:18"},
               global_batch=64, seq_len=64, steps=400, eval_every=20, eval_sequences=64,
               microbatches=(4, 8, 16, 32), flush_m=8, lrs=(2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3), seeds=(0, 1, 2))
QUICK = Setting(preset="tiny", vocab_size=512, stages=4, splits={4: "uniform", 2: "uniform"}, global_batch=8, seq_len=32, steps=12,
                eval_every=4, eval_sequences=8, microbatches=(2, 4), flush_m=4, lrs=(2e-3, 4e-3), seeds=(0, 1),
                in_process=True)
SYNC = ("1f1b", "gpipe", "zb-h1", "interleaved-1f1b")  # the synchronous schedules, all on the flush trajectory
# Cells this long can outlast a session: they checkpoint every LONG_CHECKPOINT steps under <cache>/runs/<cell>
# (each checkpoint a drain point: one in a 1600-step run, 7 in a 6400-step one) and a restarted study resumes
# them, bit-identically. The 1600-step cells committed before this (stop 30) ran with no drain point.
LONG_CELL, LONG_CHECKPOINT = 1600, 800
BUDGET_SYNC = SYNC[:3]  # the equal-budget cells were planned (and trained) against these, before interleaving
CHUNKS = 2  # interleaved-1f1b: stages per rank


# ----------------------------------------------------------------------------------------------
# Cells: one quality run each, cached as a JSON file


@dataclass(frozen=True)
class Cell:
    schedule: str  # "1f1b" (the flush trajectory), "paci" or "2bw"
    m: int
    lr: float
    seed: int = 0
    steps: int | None = None  # None: the setting's; more for the equal-budget runs
    stages: int | None = None  # None: the setting's P
    accum: int | None = None  # K; None: K = m
    optimizer: str = "adamw"
    beta1: float = 0.9
    compensate: str = "none"  # experiments/quality.py: stash-free corrections for delayed gradients
    predict_gain: float = 1.0  # --predict-gain, with compensate predict or predict-window
    dc_lambda: float = 1.0  # --dc-lambda, with compensate dc
    sync_steps: int = 0  # --sync-steps: the first optimizer steps as 1F1B-flush
    warmup: int | None = None  # None: 5% of the steps
    recompute: bool = False
    precision: str = "fp32"

    @property
    def name(self) -> str:
        extra = (f"-steps{self.steps}" if self.steps else "") + (f"-P{self.stages}" if self.stages else "")
        extra += f"-K{self.accum}" if self.accum else ""
        extra += f"-{self.optimizer}{self.beta1:g}" if (self.optimizer, self.beta1) != ("adamw", 0.9) else ""
        extra += f"-{self.compensate}" if self.compensate != "none" else ""
        extra += f"-g{self.predict_gain:g}" if self.predict_gain != 1.0 else ""
        extra += f"-l{self.dc_lambda:g}" if self.dc_lambda != 1.0 else ""
        extra += f"-sync{self.sync_steps}" if self.sync_steps else ""
        extra += f"-wu{self.warmup}" if self.warmup is not None else ""
        extra += "-recompute" if self.recompute else ""
        extra += f"-{self.precision}" if self.precision != "fp32" else ""
        return f"{self.schedule}-m{self.m}-lr{self.lr:g}-s{self.seed}{extra}"

    def flags(self) -> list[str]:
        """The `paci train` flags this cell adds to the setting's."""
        flags = ["--accum", str(self.accum)] if self.accum else []
        flags += ["--optimizer", self.optimizer, "--beta1", str(self.beta1), "--compensate", self.compensate]
        flags += ["--predict-gain", str(self.predict_gain)] if self.predict_gain != 1.0 else []
        flags += ["--dc-lambda", str(self.dc_lambda)] if self.dc_lambda != 1.0 else []
        flags += ["--sync-steps", str(self.sync_steps)] if self.sync_steps else []
        flags += ["--recompute"] if self.recompute else []
        flags += ["--precision", self.precision]
        return flags + (["--warmup", str(self.warmup)] if self.warmup is not None else [])


def run_cell(setting: Setting, cell: Cell, cache: Path, threads: int) -> dict:
    """Train one cell (single process) and keep what the report needs: the evaluation curve."""
    path = cache / "cells" / f"{cell.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    b = setting.batch_size(cell.m)
    steps = cell.steps or setting.steps
    stages = cell.stages or setting.stages
    long = steps >= LONG_CELL
    with tempfile.TemporaryDirectory() as tmp:
        run = cache / "runs" / cell.name if long else Path(tmp) / "run"
        spent = _spent(run)  # wall seconds of the earlier, interrupted parts of a long cell
        if long and any(run.glob("checkpoints/step-*/manifest.json")):
            cmd = ["train", "--resume", str(run), "--json", "--threads", str(threads)]
        else:
            shutil.rmtree(run, ignore_errors=True)  # a long cell stopped before its first checkpoint
            spent = 0.0
            cmd = ["train", "--preset", setting.preset, "--vocab-size",
                   str(setting.vocab_size), "--schedule", cell.schedule, "--stages", str(stages),
                   "--microbatches", str(cell.m), "--batch-size", str(b), "--seq-len", str(setting.seq_len),
                   "--steps", str(steps), "--lr", str(cell.lr), "--seed", str(cell.seed),
                   "--split", setting.splits[stages], "--eval-every", str(setting.eval_every),
                   "--eval-batches", str(setting.eval_sequences // b), "--threads", str(threads), "--out", str(run),
                   "--json", "--no-plots",  # a cell keeps its curve; the figures are the report's
                   *(["--checkpoint-every", str(LONG_CHECKPOINT)] if long else ["--no-checkpoint"]),  # else the
                   *cell.flags()]  # paper's schedule, with no drain points
        started = time.perf_counter()
        if long:
            run.parent.mkdir(parents=True, exist_ok=True)
            _marker(run, "started").write_text(f"{time.time()}\n")
        code, stdout, stderr = _paci(cmd, setting.in_process)
        if long:
            _marker(run, "wall_s").write_text(f"{spent + time.perf_counter() - started:.1f}\n")
            _marker(run, "started").unlink()
        if code != 0:
            raise RuntimeError(f"cell {cell.name} failed:\n{stderr[-3000:]}")
        summary = json.loads(stdout)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drift: dict[str, int] = {}
    for record in records:
        for delta, count in record.get("drift_histogram", {}).items():
            drift[delta] = drift.get(delta, 0) + count
    result = {**dataclasses.asdict(cell), "name": cell.name, "steps": steps, "stages": stages, "batch_size": b,
              "eval": [[r["step"], round(r["val_loss"], 5)] for r in records if "val_loss" in r],
              "train_loss": [round(r["loss"], 4) for r in records if "loss" in r],
              "final_val_loss": summary["final_val_loss"], "max_drift": summary["max_drift"], "drift_histogram": drift,
              "cpu_wall_s": round(spent + time.perf_counter() - started, 1), "threads": threads,
              **({"checkpoint_every": LONG_CHECKPOINT} if long else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(result) + "\n")
    os.replace(tmp_path, path)
    if long:
        shutil.rmtree(run)
        for name in ("started", "wall_s"):
            _marker(run, name).unlink(missing_ok=True)
    return result


def _marker(run: Path, name: str) -> Path:
    """A long cell's bookkeeping beside its run directory (paci train wants that one to itself)."""
    return run.parent / f"{run.name}.{name}"


def _spent(run: Path) -> float:
    """The wall seconds a long cell's run directory has cost so far: its finished parts, plus an
    interrupted one up to its newest checkpoint (what came after was lost and is trained again)."""
    wall, started = _marker(run, "wall_s"), _marker(run, "started")
    spent = float(wall.read_text()) if wall.is_file() else 0.0
    manifests = list(run.glob("checkpoints/step-*/manifest.json"))
    if started.is_file() and manifests:
        newest = max(p.stat().st_mtime for p in manifests)
        spent += max(0.0, newest - float(started.read_text()))
    return spent


def _paci(args: list[str], in_process: bool) -> tuple[int, str, str]:
    """`paci ARGS`: in a fresh process, or through the same entry point in this one; the exit code,
    stdout and stderr."""
    if not in_process:
        done = subprocess.run([sys.executable, "-m", "paci", *args], capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr
    from paci.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def load_cells(cache: Path) -> dict[str, dict]:
    folder = cache / "cells"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def planned_cells(setting: Setting, done: dict[str, dict], clock: dict | None) -> list[Cell]:
    """Every cell the study needs that is not cached yet, most important first. Cells that depend on
    others (the best learning rates; with a clock, the equal-budget length) appear once those are known."""
    m = setting.flush_m
    sweep = [Cell("1f1b", m, lr) for lr in setting.lrs] + [Cell("paci", m, lr) for lr in setting.lrs]
    cells = [c for c in sweep if c.name not in done]
    if not cells:  # the headline: flush and PACI at the same m, 3 seeds, and PACI's equal budget
        flush_lr, paci_lr = best_lr(setting, done, "1f1b", m), best_lr(setting, done, "paci", m)
        headline = [Cell("1f1b", m, flush_lr), Cell("paci", m, paci_lr), Cell("paci", m, flush_lr)]
        cells = [dataclasses.replace(c, seed=s) for c in headline for s in setting.seeds]
        budget = setting.steps if clock is None else equal_budget_steps(setting, clock, m)
        if budget != setting.steps:
            cells += [Cell("paci", m, paci_lr, steps=budget), Cell("paci", m, flush_lr, steps=budget)]
        # diagnosis: 2BW has PACI's drift but stashed weights, so it splits PACI's gap into delay and inconsistency
        cells += [Cell("2bw", m, lr) for lr in dict.fromkeys((paci_lr, flush_lr))]
        # the other m: the rates within a factor 2 of the best found for that m (before any run, of
        # the best at the nearest smaller m), until that best is not at the edge of what was run
        best = paci_lr
        for k in sorted(k for k in setting.microbatches if k != m):
            run = [lr for lr in setting.lrs if Cell("paci", k, lr).name in done]
            best = min(run, key=lambda lr: final_loss(done, Cell("paci", k, lr))) if run else best
            cells += [Cell("paci", k, lr) for lr in setting.lrs if best / 2 <= lr <= 2 * best]
        # PACI's default, --compensate predict, at every m: the rates within a factor 2 of its best at m
        predict = [Cell("paci", m, lr, compensate="predict") for lr in setting.lrs]
        cells += predict
        if all(c.name in done for c in predict):
            best = best_lr(setting, done, "paci", m, "predict")
            cells += [Cell("paci", m, best, seed=s, compensate="predict") for s in setting.seeds]
            cells += [Cell("paci", k, lr, compensate="predict") for k in setting.microbatches if k != m
                      for lr in setting.lrs if best / 2 <= lr <= 2 * best]
    return [c for c in dict.fromkeys(cells) if c.name not in done]


def final_loss(done: dict[str, dict], cell: Cell, seeds: tuple[int, ...] = (0,)) -> float:
    values = [done[dataclasses.replace(cell, seed=s).name]["final_val_loss"] for s in seeds
              if dataclasses.replace(cell, seed=s).name in done]
    return sum(values) / len(values) if values else math.inf


def best_lr(setting: Setting, done: dict[str, dict], schedule: str, m: int, compensate: str = "none") -> float:
    return min(setting.lrs, key=lambda lr: final_loss(done, Cell(schedule, m, lr, compensate=compensate)))


def equal_budget_steps(setting: Setting, clock: dict, paci_m: int) -> int:
    """Steps PACI at m takes in the time the fastest synchronous setting needs for the full run."""
    fastest = min(step_time(clock, s, m, setting.steps) for s in BUDGET_SYNC for m in setting.microbatches)
    period = step_time(clock, "paci", paci_m, setting.steps) / setting.steps
    return int(fastest / period)


# ----------------------------------------------------------------------------------------------
# The clock: simulated time at which each optimizer step ends, per schedule and m


def make_clock(setting: Setting, cache: Path) -> dict:
    path = cache / "clock.json"
    if path.is_file():
        return json.loads(path.read_text())
    from clock import check, clock_costs, measure_link, model_config, step_end_times
    from paci import schedules

    config = model_config(setting.preset, setting.vocab_size)
    ranges = setting.ranges()
    link = measure_link()
    # the calibration: real P = 2 runs of this model (skipped in quick mode, which only smoke-tests)
    checked = [] if setting is QUICK else check(setting.preset, setting.vocab_size, setting.flush_m,
                                                 setting.batch_size(setting.flush_m), 40, setting.seq_len, link)
    scale = checked[0]["scale"] if checked else 1.0
    clock = {"link": link, "split": setting.split, "steps": setting.steps, "scale": scale, "check": checked,
             "costs": {}, "step_end_s": {}}
    for m in setting.microbatches:
        costs = clock_costs(config, ranges, setting.batch_size(m), setting.seq_len, link, scale)
        clock["costs"][str(m)] = {"forward_s": costs.forward, "backward_s": costs.backward,
                                  "weight_s": costs.weight, "update_s": costs.update}
        for name in (*BUDGET_SYNC, "paci"):  # interleaving needs a finer split: add_interleaved
            ends = step_end_times(schedules.build(name, setting.stages, m, setting.steps), costs)
            clock["step_end_s"][f"{name}-m{m}"] = [round(t, 6) for t in ends]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clock) + "\n")
    return clock


def add_predicted(setting: Setting, cache: Path, clock: dict) -> dict:
    """PACI with --compensate predict on the clock: each stage's forward longer by its predicted share
    of the measured extra (experiments/clock.py predicted_forwards), at every m; added to clock.json
    once, next to the entries it already holds."""
    if all(f"paci-predict-m{m}" in clock["step_end_s"] for m in setting.microbatches):
        return clock
    from clock import model_config, predicted_forwards, step_end_times, with_predicted_forwards
    from paci import schedules
    from paci.sim import CostModel

    config = model_config(setting.preset, setting.vocab_size)
    ranges = setting.ranges()
    clock.setdefault("predict", {})
    for m in setting.microbatches:
        schedule = schedules.build("paci", setting.stages, m, setting.steps)
        # the clock's own costs, as stored (a fresh profile would be taken on a differently busy machine)
        stored = clock["costs"][str(m)]
        activation = setting.batch_size(m) * setting.seq_len * config.n_embd * 4
        costs = CostModel.from_dict({"forward": stored["forward_s"], "backward": stored["backward_s"],
                                     "weight": stored["weight_s"], "update": stored["update_s"],
                                     "latency": clock["link"]["latency_s"], "bandwidth": clock["link"]["bandwidth_Bps"],
                                     "message_bytes": [activation] * (setting.stages - 1) + [0], "time_unit": "s"})
        plain = [round(t, 6) for t in step_end_times(schedule, costs)]
        if plain != clock["step_end_s"][f"paci-m{m}"]:
            raise RuntimeError(f"m={m}: the stored costs do not reproduce the clock's PACI times")
        measured = predicted_forwards(config, ranges, setting.batch_size(m), setting.seq_len, schedule,
                                      repeats=5 if setting is QUICK else 30)
        clock["predict"][str(m)] = measured
        costs = with_predicted_forwards(costs, measured)
        clock["step_end_s"][f"paci-predict-m{m}"] = [round(t, 6) for t in step_end_times(schedule, costs)]
    (cache / "clock.json").write_text(json.dumps(clock) + "\n")
    return clock


def synchronous(clock: dict) -> list[str]:
    """The synchronous schedules the clock times (interleaving needs two units per stage)."""
    return [s for s in SYNC if any(key.startswith(f"{s}-m") for key in clock["step_end_s"])]


def add_interleaved(setting: Setting, cache: Path, clock: dict) -> dict:
    """Interleaved 1F1B (CHUNKS stages per rank) on the clock, at every m; added to clock.json once.

    The model is cut into CHUNKS x P stages by the partitioner on a fresh one-thread profile of its
    units, whose times are first calibrated to the clock: each unit's forward, backward, input
    gradient and update times are scaled so that the units of each stage of the pinned P-stage split
    add up to that stage's stored (calibrated) costs. So the same model takes the same compute on
    both clocks, distributed over its units as the profile says."""
    from clock import model_config, step_end_times, unit_profiles
    from paci import schedules
    from paci.model import num_units
    from paci.partition import partition, split_spec, stage_memory_model
    from paci.profiler import stage_costs

    config = model_config(setting.preset, setting.vocab_size)
    n, stages = num_units(config), CHUNKS * setting.stages
    if n < stages or all(f"interleaved-1f1b-m{m}" in clock["step_end_s"] for m in setting.microbatches):
        return clock
    ranges = setting.ranges()
    clock.setdefault("interleaved", {"chunks": CHUNKS, "splits": {}})
    for m in setting.microbatches:
        profiles = calibrated(unit_profiles(config, setting.batch_size(m), setting.seq_len), ranges,
                              clock["costs"][str(m)])
        inflight, copies = stage_memory_model("1f1b", stages, m)
        split = list(partition(profiles, stages, inflight, copies).ranges)
        activation = setting.batch_size(m) * setting.seq_len * config.n_embd * 4
        costs = stage_costs(profiles, split, message_bytes=[activation] * (stages - 1) + [0],
                            latency=clock["link"]["latency_s"], bandwidth=clock["link"]["bandwidth_Bps"])
        schedule = schedules.build("interleaved-1f1b", setting.stages, m, setting.steps, chunks=CHUNKS)
        clock["interleaved"]["splits"][str(m)] = split_spec(split)
        clock["step_end_s"][f"interleaved-1f1b-m{m}"] = [round(t, 6) for t in step_end_times(schedule, costs)]
    (cache / "clock.json").write_text(json.dumps(clock) + "\n")
    return clock


def calibrated(profiles: list, ranges: list[tuple[int, int]], stored: dict) -> list:
    """`profiles` with each unit's times scaled so that every stage of `ranges` sums to `stored`
    (the clock's per-stage seconds: forward_s, backward_s, weight_s = backward - input gradient, update_s)."""
    out = list(profiles)
    for j, (start, stop) in enumerate(ranges):
        units = profiles[start:stop]
        fresh_input = 0.0 if j == 0 else sum(p.input_backward_s for p in units)  # stage 0 takes no input gradient
        stored_input = stored["backward_s"][j] - stored["weight_s"][j]
        factor = {"forward_s": stored["forward_s"][j] / sum(p.forward_s for p in units),
                  "backward_s": stored["backward_s"][j] / sum(p.backward_s for p in units),
                  "input_backward_s": stored_input / fresh_input if fresh_input else 1.0,
                  "update_s": stored["update_s"][j] / max(sum(p.update_s for p in units), 1e-12)}
        for i in range(start, stop):
            out[i] = dataclasses.replace(profiles[i], **{k: getattr(profiles[i], k) * f for k, f in factor.items()})
    return out


def step_time(clock: dict, schedule: str, m: int, step: float) -> float:
    """Seconds until every stage has finished step `step` (fractional steps interpolate; beyond the
    simulated run, the steady period of its second half extends it)."""
    ends = clock["step_end_s"][f"{schedule}-m{m}"]
    n = len(ends)
    if step <= 0:
        return 0.0
    if step > n:
        period = (ends[-1] - ends[n // 2 - 1]) / (n - n // 2)
        return ends[-1] + (step - n) * period
    low = int(math.floor(step))
    before = ends[low - 1] if low >= 1 else 0.0
    after = ends[min(low, n - 1)]
    return before + (step - low) * (after - before)


# ----------------------------------------------------------------------------------------------
# Time to a target, and the report


def crossing_step(curve: list[list[float]], target: float) -> float | None:
    """The first (fractional) step at which the evaluation curve reaches `target`, interpolating
    linearly between evaluations; None if it never does."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * max(0.0, (l0 - target) / (l0 - l1))
    return None


def time_to(clock: dict, schedule: str, m: int, cell: dict, target: float) -> float | None:
    step = crossing_step(cell["eval"], target)
    return None if step is None else step_time(clock, schedule, m, step)


@dataclass
class Study:
    setting: Setting
    clock: dict
    done: dict[str, dict]

    def cell(self, schedule: str, m: int, lr: float, seed: int = 0, steps: int | None = None,
             compensate: str = "none") -> dict | None:
        return self.done.get(Cell(schedule, m, lr, seed, steps, compensate=compensate).name)

    def flush_lr(self) -> float:
        return best_lr(self.setting, self.done, "1f1b", self.setting.flush_m)

    def fastest_sync(self, target: float, lr: float, seed: int = 0) -> tuple[float | None, str]:
        """The fastest synchronous (schedule, m) to `target` on the flush trajectory at `lr`."""
        cell = self.cell("1f1b", self.setting.flush_m, lr, seed)
        options = [(time_to(self.clock, s, m, cell, target), f"{s} m={m}") for s in synchronous(self.clock)
                   for m in self.setting.microbatches] if cell else []
        reached = [o for o in options if o[0] is not None]
        return min(reached) if reached else (None, "-")

    def paci_time(self, m: int, lr: float, target: float, seed: int = 0, steps: int | None = None,
                  compensate: str = "none") -> float | None:
        cell = self.cell("paci", m, lr, seed, steps, compensate)
        clock = "paci" if compensate == "none" else f"paci-{compensate}"
        return None if cell is None else time_to(self.clock, clock, m, cell, target)

    def targets(self) -> list[float]:
        """The best final loss flush reaches (mean over seeds), and looser ones below the initial loss."""
        flush = self.cell("1f1b", self.setting.flush_m, self.flush_lr())
        best = final_loss(self.done, Cell("1f1b", self.setting.flush_m, self.flush_lr()), self.setting.seeds)
        return [round(best + gap, 3) for gap in (1.0, 0.5, 0.2, 0.1, 0.05, 0.0) if best + gap < flush["eval"][0][1]]


def _fmt(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.3g} s"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def report(study: Study) -> list[str]:
    st, clock = study.setting, study.clock
    sync_names = synchronous(clock)
    flush_lr = study.flush_lr()
    paci_m, paci_lr = st.flush_m, best_lr(st, study.done, "paci", st.flush_m)  # the headline: PACI at flush's m
    lines = [f"Setting: {st.preset} GPT (vocab {st.vocab_size}), P = {st.stages}, split {st.split}, "
             f"{st.global_batch} x {st.seq_len} tokens per step, {st.steps} steps; lr sweep {list(st.lrs)}.",
             f"Clock: one thread per stage, link latency {1e6 * clock['link']['latency_s']:.0f} us, "
             f"bandwidth {clock['link']['bandwidth_Bps'] / 1e9:.2f} GB/s (gloo, two local processes); profiled "
             f"compute times x {clock['scale']:.3f}, the calibration below.", ""]
    if clock["check"]:
        from clock import check_table

        lines += ["The clock against real runs at P = 2 (one thread per rank, 40 steps, m = "
                  f"{st.flush_m}); the factor is 1F1B's measured / predicted, the other rows test it:", "",
                  *check_table(clock["check"]), ""]
    lines += ["Calibrated time per step (steady state, s) and the bubble ceiling; paci+predict charges each "
              "predicted forward its measured extra:", "",
              "| m | micro-batch | " + " | ".join(sync_names) + " | paci | paci+predict | paci / fastest sync at this m | "
              "paci+predict / fastest sync | (m+P-1)/m |", "|---|---|" + "---|" * (len(sync_names) + 5)]
    for m in st.microbatches:
        period = {s: step_time(clock, s, m, st.steps) / st.steps for s in (*sync_names, "paci", "paci-predict")}
        sync = min(period[s] for s in sync_names)
        lines.append(f"| {m} | {st.batch_size(m)} x {st.seq_len} | " +
                     " | ".join(f"{period[s]:.3f}" for s in sync_names) +
                     f" | {period['paci']:.3f} | {period['paci-predict']:.3f} | {sync / period['paci']:.2f}x | "
                     f"{sync / period['paci-predict']:.2f}x | {(m + st.stages - 1) / m:.2f} |")
    lines += ["", "Final validation loss after the full run, seed 0 (the learning-rate sweep):", "",
              "| run | " + " | ".join(f"lr {lr:g}" for lr in st.lrs) + " |", "|---|" + "---|" * len(st.lrs)]
    rows = [("1f1b", st.flush_m, "flush (any sync schedule, any m)", "none")] + \
           [("paci", m, f"paci K=m={m} (max Δ {max_drift(study, m)})", "none") for m in st.microbatches] + \
           [("paci", m, f"paci+predict K=m={m}", "predict") for m in st.microbatches] + \
           [("2bw", st.flush_m, f"2bw K=m={st.flush_m} (PACI's drift, stashed weights)", "none")]
    for schedule, m, label, compensate in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{c['final_val_loss']:.3f}" if (c := study.cell(schedule, m, lr, compensate=compensate)) else "-"
            for lr in st.lrs) + " |")
    for compensate, name in (("none", "paci"), ("predict", "paci+predict")):
        lines += ["", f"Time to target validation loss, {name}: each run at its own best lr (flush {flush_lr:g}); "
                      "the fastest sync setting is named; Speedup_best = fastest sync / fastest PACI, Speedup_match = "
                      "1F1B-flush / PACI at the same m; seed 0:", "",
                  "| target | fastest sync | " + " | ".join(f"{name} m={m}" for m in st.microbatches) +
                  f" | Speedup_best | Speedup_match (m={st.flush_m}) |",
                  "|---|---|" + "---|" * (len(st.microbatches) + 2)]
        for target in study.targets():
            sync_t, sync_name = study.fastest_sync(target, flush_lr)
            paci = {m: study.paci_time(m, best_lr(st, study.done, "paci", m, compensate), target,
                                       compensate=compensate) for m in st.microbatches}
            fastest_paci = min((t for t in paci.values() if t is not None), default=None)
            match_sync = time_to(clock, "1f1b", st.flush_m,
                                 study.cell("1f1b", st.flush_m, flush_lr) or {"eval": []}, target)
            ran = {m: study.cell("paci", m, best_lr(st, study.done, "paci", m, compensate),
                                 compensate=compensate) is not None for m in st.microbatches}
            lines.append(f"| {target:.3f} | {_fmt(sync_t)} ({sync_name}) | " +
                         " | ".join(_fmt(paci[m]) if ran[m] else "-" for m in st.microbatches) +
                         f" | {_ratio(sync_t, fastest_paci)} | {_ratio(match_sync, paci[st.flush_m])} |")
    lines += headline(study, flush_lr, paci_m, paci_lr)
    return lines


def max_drift(study: Study, m: int) -> str:
    cells = [c for c in study.done.values() if c["schedule"] == "paci" and c["m"] == m
             and c["stages"] == study.setting.stages]
    return str(cells[0]["max_drift"]) if cells else "?"


def headline(study: Study, flush_lr: float, paci_m: int, paci_lr: float) -> list[str]:
    """Mean ± std over seeds of the final loss, and the equal-wall-clock-budget comparison."""
    st = study.setting
    lines = ["", f"Headline cells over seeds {list(st.seeds)} (final validation loss, mean ± std):", "",
             "| run | seeds | final val loss | gap to flush |", "|---|---|---|---|"]
    flush = _seed_stats(study, "1f1b", st.flush_m, flush_lr)
    predict_lr = best_lr(st, study.done, "paci", paci_m, "predict")
    for label, schedule, m, lr, compensate in [
            (f"flush m={st.flush_m}, lr {flush_lr:g}", "1f1b", st.flush_m, flush_lr, "none"),
            (f"paci m={paci_m}, lr {paci_lr:g} (its best)", "paci", paci_m, paci_lr, "none"),
            (f"paci m={paci_m}, lr {flush_lr:g} (flush's best)", "paci", paci_m, flush_lr, "none"),
            (f"paci+predict m={paci_m}, lr {predict_lr:g} (its best)", "paci", paci_m, predict_lr, "predict")]:
        stats = _seed_stats(study, schedule, m, lr, compensate=compensate)
        if stats is None:
            continue
        gap = "-" if flush is None or schedule == "1f1b" else f"{stats[0] - flush[0]:+.3f}"
        lines.append(f"| {label} | {stats[2]} | {stats[0]:.3f} ± {stats[1]:.3f} | {gap} |")
    steps = equal_budget_steps(st, study.clock, paci_m)
    lines += ["", f"Equal wall-clock budget: PACI m={paci_m} gets the {steps} steps its speed buys in the time the "
                  "fastest sync setting needs for the full run (seed 0):", "",
              "| run | steps | final val loss | vs flush |", "|---|---|---|---|"]
    if flush is not None:
        lines.append(f"| flush, lr {flush_lr:g} | {st.steps} | {flush[0]:.3f} | |")
    for lr in dict.fromkeys((paci_lr, flush_lr)):
        c = study.cell("paci", paci_m, lr, 0, None if steps == st.steps else steps)
        vs = "-" if flush is None or c is None else f"{c['final_val_loss'] - flush[0]:+.3f}"
        lines.append(f"| paci m={paci_m}, lr {lr:g} | {steps} | "
                     f"{'not run' if c is None else format(c['final_val_loss'], '.3f')} | {vs} |")
    return lines


def _seed_stats(study: Study, schedule: str, m: int, lr: float, steps: int | None = None,
                compensate: str = "none") -> tuple[float, float, int] | None:
    values = [c["final_val_loss"] for s in study.setting.seeds
              if (c := study.cell(schedule, m, lr, s, steps, compensate))]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std, len(values)


def plot(study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, clock = study.setting, study.clock
    flush_lr = study.flush_lr()
    fig, ax = plt.subplots(figsize=(8, 5))
    flush = study.cell("1f1b", st.flush_m, flush_lr)
    _, name = study.fastest_sync(study.targets()[-1], flush_lr)
    schedule, m = (name.split(" m=")[0], int(name.split(" m=")[1])) if name != "-" else ("1f1b", st.flush_m)
    if flush:
        ax.plot([step_time(clock, schedule, m, s) for s, _ in flush["eval"]], [l for _, l in flush["eval"]],
                "k-", lw=2, label=f"fastest sync: {name} (lr {flush_lr:g})")
    for m in st.microbatches:
        lr = best_lr(st, study.done, "paci", m)
        if (c := study.cell("paci", m, lr)):
            ax.plot([step_time(clock, "paci", m, s) for s, _ in c["eval"]], [l for _, l in c["eval"]],
                    label=f"paci K=m={m} (lr {lr:g})")
    for m in st.microbatches:
        lr = best_lr(st, study.done, "paci", m, "predict")
        if (c := study.cell("paci", m, lr, compensate="predict")):
            ax.plot([step_time(clock, "paci-predict", m, s) for s, _ in c["eval"]], [l for _, l in c["eval"]], ":",
                    lw=2, label=f"paci+predict K=m={m} (lr {lr:g})")
    budget = equal_budget_steps(st, clock, st.flush_m)
    for c in study.done.values():
        if c["name"] in {Cell("paci", st.flush_m, lr, 0, budget).name for lr in st.lrs} and budget != st.steps:
            ax.plot([step_time(clock, "paci", c["m"], s) for s, _ in c["eval"]], [l for _, l in c["eval"]], "--",
                    label=f"paci m={c['m']} lr {c['lr']:g}, equal budget ({c['steps']} steps)")
    ax.set_xlabel(f"calibrated wall-clock (s): P = {st.stages}, one core of this machine per stage")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], (flush["eval"][1][1] if flush and len(flush["eval"]) > 1 else 10)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Time to accuracy: PACI against the fastest synchronous schedule")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "clock", "cells", "report"])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 stages, 12 steps: under a minute")
    parser.add_argument("--cache", type=Path, help="results folder (default experiments/results/tta[-quick])")
    parser.add_argument("--workers", type=int, default=2, help="quality runs at once, one thread each")
    parser.add_argument("--plot", type=Path, help="PNG to write (default docs/figures/tta.png; quick: in the cache)")
    args = parser.parse_args()
    setting = QUICK if args.quick else FULL
    cache = args.cache or HERE / "results" / ("tta-quick" if args.quick else "tta")
    clock_file = cache / "clock.json"
    clock = add_interleaved(setting, cache, add_predicted(setting, cache, make_clock(setting, cache))) \
        if args.command in ("all", "clock") else json.loads(clock_file.read_text()) if clock_file.is_file() else None
    if args.command in ("all", "cells"):  # without a clock yet, all but the equal-budget cells
        run_cells(setting, cache, args.workers, lambda done: planned_cells(setting, done, clock))
    if args.command in ("all", "report"):
        if clock is None:
            raise SystemExit(f"no clock in {cache}: run `experiments/tta.py clock` first (on a quiet machine)")
        study = Study(setting, clock, load_cells(cache))
        print("\n".join(report(study)))
        plot(study, args.plot or (cache / "tta.png" if args.quick else HERE.parent / "docs" / "figures" / "tta.png"))


def run_cells(setting: Setting, cache: Path, workers: int, plan: Callable[[dict[str, dict]], list[Cell]]) -> None:
    """Run the cells `plan(cached cells)` asks for, `workers` at a time (one thread each of the
    machine's cores), planning again after each batch, until it asks for none; each cell is cached
    as it ends, so an interrupted study resumes where it stopped."""
    # in this process: one at a time, on the main thread (where `paci train` handles signals), one thread
    threads = 1 if setting.in_process else max(1, (os.cpu_count() or 1) // workers)
    while cells := plan(load_cells(cache)):
        print(f"{len(cells)} cells to run: {', '.join(c.name for c in cells)}", flush=True)
        if setting.in_process:
            results = [run_cell(setting, cells[0], cache, threads)]
        else:
            with ThreadPoolExecutor(workers) as pool:
                results = pool.map(lambda c: run_cell(setting, c, cache, threads), cells[:workers])
        for result in results:
            print(f"  {result['name']}: final val loss {result['final_val_loss']:.3f} "
                  f"({result['cpu_wall_s']:.0f} s)", flush=True)

if __name__ == "__main__":
    main()
