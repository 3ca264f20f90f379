"""The GPT job of `paci train`: resolve a config into a plan (model, corpus, split), then hand it to the loop.

`make_plan` checks everything (data, sizes, split, schedule) before anything is written, so bad
input leaves no run directory behind. `train` runs every stage in this process, `train_rank` this
rank's stages of a launched run; both through `paci.driver`, the loop `paci.Pipeline` runs too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from paci import checkpoint, driver, schedules
from paci.config import RunConfig
from paci.data import TokenData, load_data
from paci.driver import Run
from paci.ir import Schedule, WeightPolicy, evaluation_rounds, stage_delay, updates_ahead, with_evaluation
from paci.metrics import Record
from paci.model import PRESETS, GPTConfig, build_units, num_units
from paci.checks import parse_bytes
from paci.partition import check_split, split_spec
from paci.profiler import check_memory, choose_split
from paci.runtime import mesh
from paci.runtime.launch import StopRequest
from paci.runtime.mesh import env_rank, rank_device
from paci.runtime.payload import shard
from paci.runtime.stage import PREDICTIONS, OptimizerSpec, Stage
from paci.sim import check_size
from paci.trace import Trace


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
    checkpoint_every: int  # optimizer steps between drain points (0: only the end of the run)
    checkpoints: bool  # False: no checkpoint at all (--no-checkpoint)
    run_dir: Path = Path()
    resume: dict | None = None  # the manifest of the checkpoint this run continues from
    rebuild: Callable[[tuple[int, ...]], Schedule] | None = None  # the schedule with drain points added (driver.Run)

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def num_ranks(self) -> int:
        """Processes per pipeline: num_stages, or with an interleaved schedule num_stages / chunks."""
        return self.schedule.ranks

    @property
    def tokens_per_microbatch(self) -> int:
        """Tokens in one micro-batch, over every data-parallel replica."""
        return self.batch_size * self.seq_len * self.config.pipeline.dp

    @property
    def start_step(self) -> int:
        """The optimizer step this run starts after: 0, or the resumed checkpoint's."""
        return self.resume["step"] if self.resume else 0

    @functools.cached_property
    def eval_rounds(self) -> list[int]:
        """The step after which each validation round runs (0: before training); none with --no-eval."""
        train = self.config.train
        return evaluation_rounds(self.schedule.num_steps, train.eval_every) if train.eval else []

    @property
    def drains_midway(self) -> bool:
        """Can a requested stop save before the end (driver.Run.drains_midway)?"""
        return to_run(self).drains_midway

    def identity(self) -> dict:
        """What fixes the computation: a checkpoint resumes only a run that agrees on all of it."""
        c = self.config
        fields = {"schedule": c.pipeline.schedule, "stages": self.num_stages, "microbatches": c.pipeline.microbatches,
                  "accum": self.schedule.accumulation, "split": split_spec(self.split),
                  "model": dataclasses.asdict(self.model), "precision": c.train.precision, "steps": c.train.steps,
                  "seed": c.train.seed, "data": self.data.source, "batch_size": self.batch_size,
                  "seq_len": self.seq_len, "recompute": c.pipeline.recompute, "checkpoint_every": self.checkpoint_every,
                  **({"ranks": self.num_ranks} if self.num_ranks != self.num_stages else {}),
                  **({"sync_steps": c.pipeline.sync_steps} if c.pipeline.sync_steps else {}),
                  "optimizer": dataclasses.asdict(self.optimizer),
                  **({"dp": c.pipeline.dp} if c.pipeline.dp > 1 else {})}
        return json.loads(json.dumps(fields))  # as the manifest stores it (tuples become lists)


def make_plan(config: RunConfig, resume: bool = False) -> Plan:
    """Resolve and check everything, cheapest checks first; profiles the units for a "profile" split.
    With `resume`, --out is an existing run directory and the plan continues its newest checkpoint."""
    run_dir = Path(config.train.out) if resume else _run_dir(config)
    manifest = checkpoint.latest(run_dir) if resume else None
    pipe = config.pipeline
    base = schedules.build(pipe.schedule, pipe.stages, pipe.microbatches, config.train.steps, pipe.accum,
                           chunks=pipe.chunks, sync_steps=pipe.sync_steps)
    check_size(base)  # the run keeps a trace of every action and simulates it at the end
    every = schedules.drain_interval(base, pipe.microbatches, config.train.checkpoint_every) if config.train.checkpoint else 0
    if every and every < base.num_steps:  # drain points: the schedule fills and drains around each checkpoint
        base = schedules.build(pipe.schedule, pipe.stages, pipe.microbatches, config.train.steps, pipe.accum, every,
                               pipe.chunks, pipe.sync_steps)
    chunks = base.stages_per_rank if base.stages_per_rank > 1 else None
    if chunks and config.optim.clip_grad_norm:
        raise ValueError("--clip-grad-norm with interleaved-1f1b is not supported yet (a rank steps its stages at "
                         "different times, so the global norm has no one point to be exchanged at)")
    if config.optim.compensate in PREDICTIONS and base.weight_policy is WeightPolicy.STASHED:
        raise ValueError(f"--compensate {config.optim.compensate} moves live weights; {pipe.schedule} stashes them "
                         "instead")
    preset = PRESETS[config.model.preset]
    seq_len = config.data.seq_len or preset.block_size
    pinned = pinned_split(pipe.split)
    check_split(pinned, num_units(preset), base.num_stages)  # before the data, which may take minutes
    budget = parse_bytes(pipe.memory_per_stage) if pipe.memory_per_stage is not None else None
    data = load_data(config.data.path, config.model.vocab_size, batch_shape=(config.data.batch_size, seq_len))
    model = dataclasses.replace(preset, vocab_size=data.vocab_size, block_size=max(seq_len, preset.block_size))
    check_memory(model, config.data.batch_size, seq_len, default_device())
    eval_batches = min(config.train.eval_batches,
                       data.num_val_batches(config.data.batch_size * config.pipeline.dp, seq_len))
    split = choose_split(pinned, model, base.num_stages, pipe.schedule, pipe.microbatches, pipe.accum,
                         config.data.batch_size, seq_len, default_device(), budget, config.train.precision, chunks)
    opt = config.optim
    warmup = opt.warmup_steps if opt.warmup_steps is not None else max(1, base.num_steps // 20)
    optimizer = OptimizerSpec(lr=opt.lr, weight_decay=opt.weight_decay, betas=(opt.beta1, 0.95), warmup_steps=warmup,
                              total_steps=base.num_steps, min_lr_ratio=opt.min_lr_ratio, name=opt.optimizer,
                              compensate=opt.compensate, clip_grad_norm=opt.clip_grad_norm,
                              predict_gain=opt.predict_gain, dc_lambda=opt.dc_lambda)
    def rebuild(drains: tuple[int, ...] = ()) -> Schedule:  # the training schedule, with drains added after these steps
        built = schedules.build(pipe.schedule, pipe.stages, pipe.microbatches, config.train.steps, pipe.accum, every,
                                pipe.chunks, pipe.sync_steps, drains) if drains else base
        return with_evaluation(built, config.train.eval_every, eval_batches) if config.train.eval else built

    plan = Plan(config, data, model, split, rebuild(), optimizer, seq_len, config.data.batch_size, eval_batches,
                every, config.train.checkpoint, run_dir, manifest, rebuild)
    if manifest is not None:
        checkpoint.check_identity(manifest["identity"], plan.identity())
        if manifest["step"] >= plan.schedule.num_steps:
            raise ValueError(f"--resume {run_dir}: the run finished all {plan.schedule.num_steps} steps; nothing to resume")
    return plan


def pinned_split(spec: str) -> str:
    """--split RUN_DIR: the split that run resolved (its config.json), so a profiled split, which
    depends on the machine's timings, can be reused exactly; any other spec is returned as is."""
    if "/" not in spec and not Path(spec).is_dir():
        return spec
    path = Path(spec) / "config.json"
    try:
        return json.loads(path.read_text())["resolved"]["split"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--split {spec}: expected a paci run directory with a config.json that records its "
                         "split, or a split like 0:3,3:6") from None


def _run_dir(config: RunConfig) -> Path:
    if config.train.out is not None:
        path = Path(config.train.out)
    else:
        path = Path("runs") / f"{config.pipeline.schedule}-{time.strftime('%Y%m%d-%H%M%S')}"
    driver.check_new_run_dir(path, "--out")
    return path


def build_stage(plan: Plan, index: int, device: torch.device, replica: int = 0) -> Stage:
    """Stage `index`; with data parallelism, of `replica`, whose micro-batch mb (and validation
    batch) is its share, `batch_size` sequences, of the dp x `batch_size` of micro-batch mb."""
    start, stop = plan.split[index]
    seed, batch_size, seq_len, dp = plan.config.train.seed, plan.batch_size, plan.seq_len, plan.config.pipeline.dp

    def share(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return shard(batch, replica, dp) if dp > 1 else batch

    def train_batch(mb: int) -> tuple[torch.Tensor, torch.Tensor]:
        return share(plan.data.batch(seed, mb, dp * batch_size, seq_len))

    return Stage(index, plan.num_stages, build_units(plan.model, seed, start, stop),
                 policy=plan.schedule.weight_policy, optim=plan.optimizer.for_stage(stage_delay(plan.schedule, index)),
                 loss_scale=1.0 / plan.schedule.accumulation,
                 train_batch=train_batch,
                 val_batch=lambda i: share(plan.data.val_batch(i % plan.eval_batches, dp * batch_size, seq_len)),
                 device=device, recompute=plan.config.pipeline.recompute,
                 updates_ahead=updates_ahead(plan.schedule, index), precision=plan.config.train.precision,
                 nonfinite_limit=plan.config.train.nonfinite_limit, poison=injected_nan(index))


def injected_nan(stage: int) -> list[int]:
    """Fault injection for tests and drills: PACI_INJECT_NAN="s:mb,..." turns stage s's output of
    micro-batch mb into NaN, the way an overflow would."""
    spec = os.environ.get("PACI_INJECT_NAN", "")
    try:
        pairs = [tuple(map(int, item.split(":"))) for item in spec.split(",") if item.strip()]
        return [mb for s, mb in pairs if s == stage]
    except ValueError:
        raise ValueError(f"PACI_INJECT_NAN={spec!r}: expected stage:microbatch pairs like 0:5,1:9") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_run(plan: Plan) -> Run:
    """The plan as the training loop takes it (paci.driver)."""
    config = plan.config
    resolved = None if plan.resume is not None else {**config.as_dict(), "resolved": {
        "model": dataclasses.asdict(plan.model), "split": split_spec(plan.split), "seq_len": plan.seq_len,
        "num_microbatches": plan.schedule.num_microbatches, "accumulation": plan.schedule.accumulation,
        "num_steps": plan.schedule.num_steps, "warmup_steps": plan.optimizer.warmup_steps,
        "weight_policy": plan.schedule.weight_policy.value, "data": repr(plan.data),
        "checkpoint_every": plan.checkpoint_every}}
    return Run(plan.schedule, functools.partial(build_stage, plan), plan.split, plan.identity(),
               lambda: plan.tokens_per_microbatch, plan.optimizer.lr_at, plan.eval_rounds, plan.eval_batches,
               plan.checkpoint_every, plan.checkpoints, plan.run_dir, named=config.train.out is not None,
               resume=plan.resume, header=resolved, dp=config.pipeline.dp, clip_grad_norm=plan.optimizer.clip_grad_norm,
               timeout_s=config.pipeline.timeout_s, trace=config.train.trace, plots=config.train.plots,
               rebuild=plan.rebuild, microbatches=config.pipeline.microbatches)


def train(config: RunConfig, on_record: Callable[[Record], None] | None = None,
          on_plan: Callable[[Plan], None] | None = None, resume: bool = False,
          stop: StopRequest | None = None, drains: tuple[int, ...] = ()) -> tuple[Record, Trace]:
    """Train with every stage in this process. Returns the summary and the measured trace. With
    `resume`, continue the run in `config.train.out` from its newest complete checkpoint. Once
    `stop` is requested, the run drains at its next step boundary, saves a checkpoint there and
    raises Stopped. `drains`: drain points (and checkpoints) after these steps besides the
    periodic ones, as a stop adds them (the run such a stop and its resume equal)."""
    if config.pipeline.dp > 1:
        raise ValueError(f"--dp {config.pipeline.dp} runs one process per stage and replica: use --nproc or torchrun")
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)  # before profiling the split
    plan = make_plan(config, resume=resume)
    summary, trace, stages = driver.run_local(_drained(to_run(plan), drains), default_device(), on_record,
                                              _started(plan, on_plan), stop)
    return summary, trace


def _drained(run: Run, drains: tuple[int, ...]) -> Run:
    if drains:
        run.add_drains(*drains)
    return run


def _started(plan: Plan, on_plan: Callable[[Plan], None] | None) -> Callable[[Run], None]:
    def started(run: Run) -> None:  # the run directory is claimed (and named): the plan learns it
        plan.run_dir = run.run_dir
        if on_plan is not None:
            on_plan(plan)
    return started


def train_rank(config: RunConfig, on_record: Callable[[Record], None] | None = None,
               on_plan: Callable[[Plan], None] | None = None, resume: bool = False,
               stop: StopRequest | None = None, drains: tuple[int, ...] = ()) -> Record | None:
    """This rank's part of a multi-process run (launched by `paci train --nproc P` or torchrun).
    Rank 0 writes the run directory and returns the summary. A `stop` is rank 0's to act on (it
    drains at its next step boundary and tells the others); at each checkpoint the ranks also
    agree whether any was asked (Stopped). `drains` as for `train`."""
    info = env_rank()
    device = rank_device(info)
    ranks, dp = config.pipeline.stages, config.pipeline.dp  # --stages: the pipeline's ranks
    if ranks * dp != info.world_size:
        raise ValueError(f"the world has {info.world_size} ranks but the pipeline has {ranks} stages"
                         + (f" x {dp} replicas" if dp > 1 else "") + f"; pass --stages {info.world_size // dp}"
                         + (f" --dp {dp}" if dp > 1 else "") + " (one process per stage and replica)")
    mesh.join(device, config.pipeline.timeout_s)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if config.pipeline.split == "profile":  # measured once on rank 0 (the others wait up to the timeout)
        config = dataclasses.replace(config, pipeline=dataclasses.replace(
            config.pipeline, split=mesh.broadcast(split_spec(make_plan(config).split) if info.rank == 0 else "")))
    plan = make_plan(config, resume=resume)
    summary, _ = driver.run_rank(_drained(to_run(plan), drains), device, on_record, _started(plan, on_plan), stop)
    return summary
