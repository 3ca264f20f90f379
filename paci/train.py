"""The training job: resolve a config into a plan, build the stages, run the schedule, record metrics.

`make_plan` checks everything (data, sizes, split, schedule) before anything is written, so bad
input leaves no run directory behind. `train` then runs every stage in this process over the
local transport; the multi-process runtime (`paci.runtime.launch`) builds the same plan and runs
one stage per rank, producing the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paci import schedules
from paci.config import RunConfig
from paci.data import TokenData, load_data
from paci.ir import Action, Op, Schedule, evaluation_rounds, with_evaluation
from paci.model import PRESETS, GPTConfig, build_units, num_units
from paci.runtime.executor import run_local
from paci.runtime.stage import OptimizerSpec, Stage
from paci.runtime.transport import LocalTransport
from paci.sim import CostModel, simulate
from paci.trace import Trace

Record = dict[str, object]


@dataclass
class Plan:
    """A run, fully resolved and checked."""

    config: RunConfig
    data: TokenData
    model: GPTConfig
    split: list[tuple[int, int]]  # [start, stop) units per stage
    schedule: Schedule  # the training schedule with evaluation rounds inserted
    optimizer: OptimizerSpec
    seq_len: int
    batch_size: int
    eval_batches: int
    predicted_drift: list[np.ndarray] = field(repr=False)  # per stage: Δ of every micro-batch, from the schedule
    run_dir: Path = Path()

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def tokens_per_microbatch(self) -> int:
        return self.batch_size * self.seq_len


def uniform_split(num_units: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges of units whose sizes differ by at most one (earlier stages get the extra)."""
    if num_stages > num_units:
        raise ValueError(f"{num_stages} stages but the model has only {num_units} units; use --stages <= {num_units} "
                         "or a preset with more layers")
    base, extra = divmod(num_units, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def make_plan(config: RunConfig) -> Plan:
    data = load_data(config.data.path, config.model.vocab_size)
    preset = PRESETS[config.model.preset]
    seq_len = config.data.seq_len or preset.block_size
    model = dataclasses.replace(preset, vocab_size=data.vocab_size, block_size=max(seq_len, preset.block_size))
    data.check_fits(config.data.batch_size, seq_len)
    eval_batches = min(config.train.eval_batches, data.num_val_batches(config.data.batch_size, seq_len))
    pipe = config.pipeline
    split = uniform_split(num_units(model), pipe.stages)
    base = schedules.build(pipe.schedule, pipe.stages, pipe.microbatches, config.train.steps, pipe.accum)
    opt = config.optim
    warmup = opt.warmup_steps if opt.warmup_steps is not None else max(1, base.num_steps // 20)
    optimizer = OptimizerSpec(lr=opt.lr, weight_decay=opt.weight_decay, warmup_steps=warmup,
                              total_steps=base.num_steps, min_lr_ratio=opt.min_lr_ratio)
    schedule = with_evaluation(base, config.train.eval_every, eval_batches)
    return Plan(config, data, model, split, schedule, optimizer, seq_len, config.data.batch_size, eval_batches,
                predicted_drift(base), _run_dir(config))


def predicted_drift(schedule: Schedule) -> list[np.ndarray]:
    """Δ of every (stage, micro-batch) as the static schedule fixes it (the simulator's versions)."""
    trace = simulate(schedule, CostModel.per_stage(schedule.num_stages)).trace
    return [np.subtract(*reversed(trace.versions(s))) for s in range(schedule.num_stages)]


def _run_dir(config: RunConfig) -> Path:
    if config.train.out is not None:
        path = Path(config.train.out)
    else:
        path = Path("runs") / f"{config.pipeline.schedule}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"--out {path} already exists and is not empty; choose a new run directory")
    return path


def build_stage(plan: Plan, index: int, device: torch.device) -> Stage:
    start, stop = plan.split[index]
    seed, batch_size, seq_len = plan.config.train.seed, plan.batch_size, plan.seq_len
    return Stage(index, plan.num_stages, build_units(plan.model, seed, start, stop),
                 policy=plan.schedule.weight_policy, optim=plan.optimizer,
                 loss_scale=1.0 / plan.schedule.accumulation,
                 train_batch=lambda mb: plan.data.batch(seed, mb, batch_size, seq_len),
                 val_batch=lambda i: plan.data.val_batch(i % plan.eval_batches, batch_size, seq_len),
                 device=device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Metrics: the rank holding the last stage turns its losses into one record per step.


class Recorder:
    """Listens to the last stage; writes metrics.jsonl (one object per step) and calls `on_record`."""

    def __init__(self, plan: Plan, on_record: Callable[[Record], None] | None = None) -> None:
        self.plan = plan
        self.on_record = on_record
        self.records: list[Record] = []
        self.start = time.perf_counter()
        self._rounds = evaluation_rounds(plan.schedule.num_steps, plan.config.train.eval_every)
        self._pending: Record | None = None
        self._val: dict[int, float] = {}  # step -> val loss
        self._max_drift = 0
        self._file = open(plan.run_dir / "metrics.jsonl", "a")

    def __call__(self, stage: Stage, action: Action) -> None:
        if not stage.is_last:
            return
        if action.op is Op.U:
            self._step_done(stage)
        elif action.op is Op.E and (action.microbatch + 1) % self.plan.eval_batches == 0:
            self._round_done(stage, action.microbatch // self.plan.eval_batches)

    def _step_done(self, stage: Stage) -> None:
        step, k = stage.version, self.plan.schedule.accumulation
        mbs = range((step - 1) * k, step * k)
        drift = Counter(int(d[mb]) for d in self.plan.predicted_drift for mb in mbs)
        self._max_drift = max(self._max_drift, max(drift))
        wall = time.perf_counter() - self.start
        tokens = step * k * self.plan.tokens_per_microbatch
        self._flush()
        self._pending = {"step": step, "tokens": tokens,
                         "loss": float(np.mean([stage.losses.pop(mb).item() for mb in mbs])),
                         "lr": self.plan.optimizer.lr_at(step - 1), "wall_s": round(wall, 3),
                         "tok_per_s": tokens / wall, "drift_histogram": dict(sorted(drift.items())),
                         "max_drift": self._max_drift}
        if step not in self._rounds:
            self._flush()

    def _round_done(self, stage: Stage, round_index: int) -> None:
        n = self.plan.eval_batches
        indices = range(round_index * n, (round_index + 1) * n)
        loss = float(np.mean([stage.eval_losses.pop(i) for i in indices]))
        step = self._rounds[round_index]
        self._val[step] = loss
        if step == 0:
            self._emit({"step": 0, "tokens": 0, "val_loss": loss, "val_ppl": math.exp(loss), "wall_s": 0.0})
        elif self._pending is not None and self._pending["step"] == step:
            self._pending.update(val_loss=loss, val_ppl=math.exp(loss))
            self._flush()

    def _flush(self) -> None:
        if self._pending is not None:
            self._emit(self._pending)
            self._pending = None

    def _emit(self, record: Record) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.on_record is not None:
            self.on_record(record)

    def close(self) -> None:
        self._flush()
        self._file.close()

    def summary(self) -> Record:
        steps = [r for r in self.records if "loss" in r]
        vals = [r for r in self.records if "val_loss" in r]
        last = steps[-1] if steps else {}
        return {"final_train_loss": last.get("loss"), "final_val_loss": vals[-1]["val_loss"] if vals else None,
                "final_val_ppl": vals[-1]["val_ppl"] if vals else None, "initial_val_loss": vals[0]["val_loss"]
                if vals else None, "steps": last.get("step", 0), "tokens": last.get("tokens", 0),
                "max_drift": self._max_drift, "wall_s": round(time.perf_counter() - self.start, 3),
                "tokens_per_s": last.get("tok_per_s")}


def verify_drift(plan: Plan, stages: list[Stage]) -> None:
    """Every recorded (v_f, v_b) must match the schedule's prediction; a mismatch is a runtime bug."""
    for stage in stages:
        expected = plan.predicted_drift[stage.index]
        for mb, (v_f, v_b) in stage.versions.items():
            if v_b - v_f != expected[mb]:
                raise RuntimeError(f"stage {stage.index}, micro-batch {mb}: measured Δ={v_b - v_f}, "
                                   f"the schedule predicts {expected[mb]}")


# ----------------------------------------------------------------------------------------------


def write_header(plan: Plan) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**plan.config.as_dict(), "resolved": {
        "model": dataclasses.asdict(plan.model), "split": plan.split, "seq_len": plan.seq_len,
        "num_microbatches": plan.schedule.num_microbatches, "accumulation": plan.schedule.accumulation,
        "num_steps": plan.schedule.num_steps, "warmup_steps": plan.optimizer.warmup_steps,
        "weight_policy": plan.schedule.weight_policy.value, "data": repr(plan.data)}}
    (plan.run_dir / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")


def train(config: RunConfig, on_record: Callable[[Record], None] | None = None,
          on_plan: Callable[[Plan], None] | None = None) -> tuple[Record, Trace]:
    """Train with every stage in this process. Returns the summary and the measured trace."""
    plan = make_plan(config)
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    device = default_device()
    stages = [build_stage(plan, s, device) for s in range(plan.num_stages)]
    write_header(plan)
    if on_plan is not None:
        on_plan(plan)
    recorder = Recorder(plan, on_record)
    try:
        trace = run_local(stages, plan.schedule, LocalTransport(), recorder)
    finally:
        recorder.close()
    verify_drift(plan, stages)
    summary = {**recorder.summary(), "schedule": plan.schedule.name, "num_stages": plan.num_stages,
               "run_dir": str(plan.run_dir), "drift_verified": True}
    (plan.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary, trace
