"""The training job: resolve a config into a plan, build the stages, run the schedule, record metrics.

`make_plan` checks everything (data, sizes, split, schedule) before anything is written, so bad
input leaves no run directory behind. `train` then runs every stage in this process over the
local transport; the multi-process runtime (`paci.runtime.launch`) builds the same plan and runs
one stage per rank, producing the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from paci import checkpoint, schedules
from paci.config import RunConfig
from paci.data import TokenData, load_data
from paci.files import check_writable, write_text
from paci.ir import (Action, Op, Schedule, WeightPolicy, evaluation_rounds, from_step, stage_delay, steps_together,
                     updates_ahead, with_evaluation)
from paci.metrics import Record, Recorder, StatsEvent, StepStats, to_json
from paci.model import PRESETS, GPTConfig, build_units, num_units
from paci.partition import check_split, choose_split, parse_bytes, split_spec
from paci.profiler import check_memory
from paci.report import render_png, write_chrome_trace
from paci.runtime.executor import gather_trace, join_mesh, run_in_process, run_on_rank
from paci.runtime.launch import StopRequest, Stopped, env_rank, init_distributed, rank_device
from paci.runtime.payload import shard
from paci.runtime.stage import PREDICTIONS, OptimizerSpec, Stage
from paci.runtime.transport import StatsChannel
from paci.sim import CostModel, check_size, simulate
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

    def is_drain(self, step: int) -> bool:
        """Is a checkpoint taken after optimizer step `step`? Also at step 0 (after the first
        validation), so that a run restarted before its first interval resumes rather than fails."""
        last = self.schedule.num_steps
        periodic = self.checkpoint_every > 0 and step % self.checkpoint_every == 0
        return self.checkpoints and (step in (0, last) or periodic)

    @functools.cached_property
    def eval_rounds(self) -> list[int]:
        """The step after which each validation round runs (0: before training); none with --no-eval."""
        train = self.config.train
        return evaluation_rounds(self.schedule.num_steps, train.eval_every) if train.eval else []

    @property
    def drains_midway(self) -> bool:
        """Are there drain points before the end (where a requested stop can save and stop)?"""
        return 0 < self.checkpoint_every < self.schedule.num_steps

    @functools.cached_property
    def clips_globally(self) -> bool:
        """--clip-grad-norm by the global norm over every stage: only where all stages step together
        (Δ = 0 at every stage: the flush schedules); otherwise each stage clips by its own norm."""
        return bool(self.optimizer.clip_grad_norm) and self.num_stages > 1 and steps_together(self.schedule)

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
                              predict_gain=opt.predict_gain)
    schedule = with_evaluation(base, config.train.eval_every, eval_batches) if config.train.eval else base
    plan = Plan(config, data, model, split, schedule, optimizer, seq_len, config.data.batch_size, eval_batches,
                every, config.train.checkpoint, run_dir, manifest)
    if manifest is not None:
        checkpoint.check_identity(manifest["identity"], plan.identity())
        if manifest["step"] >= schedule.num_steps:
            raise ValueError(f"--resume {run_dir}: the run finished all {schedule.num_steps} steps; nothing to resume")
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
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"--out {path} already exists and is not empty; choose a new run directory")
    check_writable(path, "--out", folder=True)
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


def save_stage(plan: Plan, stage: Stage) -> dict:
    """This stage's file of the checkpoint at its current step; returns the manifest entry."""
    payload = {**stage.state_dict(), "stage": stage.index, "units": list(plan.split[stage.index])}
    return checkpoint.save_stage(plan.run_dir, stage.version, stage.index, payload)


def finish_checkpoint(plan: Plan, step: int, entries: list[dict]) -> None:
    """Every stage file is written: the manifest makes the checkpoint complete."""
    checkpoint.write_manifest(plan.run_dir, step, plan.identity(), entries,
                              {"next_microbatch": step * plan.schedule.accumulation})


def resume_stage(plan: Plan, stage: Stage) -> None:
    if plan.resume is not None:
        stage.load_state_dict(checkpoint.load_stage(plan.resume, stage.index, stage.device))


def make_recorder(plan: Plan, on_record: Callable[[Record], None] | None) -> Recorder:
    return Recorder(plan.run_dir, plan.schedule, tokens_per_microbatch=plan.tokens_per_microbatch,
                    eval_rounds=plan.eval_rounds,
                    lr_at=plan.optimizer.lr_at, on_record=on_record, resume_step=plan.start_step,
                    norm_stages=plan.num_stages if plan.optimizer.clip_grad_norm else 0)


# ----------------------------------------------------------------------------------------------


def claim_run_dir(plan: Plan) -> None:
    """Make the run directory this run's alone: creating its metrics.jsonl exclusively decides it.
    Two runs started in the same second under the default name get <name> and <name>-2."""
    for n in itertools.count(1):
        path = plan.run_dir if n == 1 else plan.run_dir.with_name(f"{plan.run_dir.name}-{n}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and plan.config.train.out is None:
            continue
        path.mkdir(parents=True, exist_ok=True)
        try:
            (path / "metrics.jsonl").open("x").close()
        except FileExistsError:
            if plan.config.train.out is not None:
                raise ValueError(f"--out {path} is already used by another run; choose a new run directory") from None
            continue
        plan.run_dir = path
        return


def write_header(plan: Plan) -> None:
    """config.json: the run's settings and everything resolved from them (kept as is by a resume)."""
    if plan.resume is not None:
        return
    resolved = {**plan.config.as_dict(), "resolved": {
        "model": dataclasses.asdict(plan.model), "split": split_spec(plan.split), "seq_len": plan.seq_len,
        "num_microbatches": plan.schedule.num_microbatches, "accumulation": plan.schedule.accumulation,
        "num_steps": plan.schedule.num_steps, "warmup_steps": plan.optimizer.warmup_steps,
        "weight_policy": plan.schedule.weight_policy.value, "data": repr(plan.data),
        "checkpoint_every": plan.checkpoint_every}}
    write_text(plan.run_dir / "config.json", json.dumps(resolved, indent=1) + "\n")


def write_summary(plan: Plan, recorder: Recorder, extra: Record) -> Record:
    """summary.json: the recorder's final numbers plus `extra`; called once every version was verified."""
    summary = {**recorder.summary(), **extra, "schedule": plan.schedule.name, "num_stages": plan.num_stages,
               "run_dir": str(plan.run_dir), "versions_verified": True}
    write_text(plan.run_dir / "summary.json", to_json(summary, indent=1) + "\n")
    return summary


def train(config: RunConfig, on_record: Callable[[Record], None] | None = None,
          on_plan: Callable[[Plan], None] | None = None, resume: bool = False,
          stop: StopRequest | None = None) -> tuple[Record, Trace]:
    """Train with every stage in this process. Returns the summary and the measured trace. With
    `resume`, continue the run in `config.train.out` from its newest complete checkpoint. Once
    `stop` is requested, the run raises Stopped at its next checkpoint, once that is complete."""
    if config.pipeline.dp > 1:
        raise ValueError(f"--dp {config.pipeline.dp} runs one process per stage and replica: use --nproc or torchrun")
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)  # before profiling the split
    plan = make_plan(config, resume=resume)
    device = default_device()
    stages = [build_stage(plan, s, device) for s in range(plan.num_stages)]
    for stage in stages:
        resume_stage(plan, stage)
    if not resume:
        claim_run_dir(plan)
    write_header(plan)
    if on_plan is not None:
        on_plan(plan)
    recorder = make_recorder(plan, on_record)
    stats = StepStats(plan.schedule.accumulation, plan.eval_batches)

    def listener(stage: Stage, action: Action) -> None:
        for event in stats(stage, action):
            recorder.consume(event)
        if action.op is Op.U and plan.optimizer.clip_grad_norm:
            recorder.add_norm(stage.version, stage.index, stage.grad_norm)

    saved: dict[int, list[dict]] = {}

    def on_drain(stage: Stage) -> None:  # the last stage to reach a drain point completes the checkpoint
        entries = saved.setdefault(stage.version, [])
        entries.append(save_stage(plan, stage))
        if len(entries) == plan.num_stages:
            finish_checkpoint(plan, stage.version, saved.pop(stage.version))
            if stop is not None and stop.requested:
                raise Stopped(stage.version)

    try:
        with stop.armed(plan.drains_midway) if stop is not None else contextlib.nullcontext():
            trace = run_in_process(stages, plan.schedule, clip_globally=plan.clips_globally,
                                   start_step=plan.start_step, listener=listener, is_drain=plan.is_drain,
                                   on_drain=on_drain)
    finally:
        recorder.close()
    return write_summary(plan, recorder, {"skipped_updates": [stage.skipped for stage in stages]}), trace


# ----------------------------------------------------------------------------------------------
# One stage per rank over torch.distributed (launched by `paci train --nproc P` or torchrun)


def train_rank(config: RunConfig, on_record: Callable[[Record], None] | None = None,
               on_plan: Callable[[Plan], None] | None = None, resume: bool = False,
               stop: StopRequest | None = None) -> Record | None:
    """This rank's part of a multi-process run. Rank 0 writes the run directory and returns the
    summary. At each checkpoint the ranks agree whether any was asked to `stop` (Stopped)."""
    info = env_rank()
    device = rank_device(info)
    ranks, dp = config.pipeline.stages, config.pipeline.dp  # --stages: the pipeline's ranks
    if ranks * dp != info.world_size:
        raise ValueError(f"the world has {info.world_size} ranks but the pipeline has {ranks} stages"
                         + (f" x {dp} replicas" if dp > 1 else "") + f"; pass --stages {info.world_size // dp}"
                         + (f" --dp {dp}" if dp > 1 else "") + " (one process per stage and replica)")
    replica, index = divmod(info.rank, ranks)  # a (dp, pp) mesh: each replica on consecutive ranks
    if not dist.is_initialized():
        init_distributed(device, config.pipeline.timeout_s)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if config.pipeline.split == "profile":  # measured once on rank 0 (the others wait up to the timeout)
        config = dataclasses.replace(config, pipeline=dataclasses.replace(
            config.pipeline, split=_broadcast(split_spec(make_plan(config).split) if info.rank == 0 else "")))
    plan = make_plan(config, resume=resume)
    last = ranks - 1  # replica 0's rank of the last stage: the one that reports to rank 0
    stats_group = dist.new_group([0, last])
    checkpoint_group = dist.new_group(list(range(info.world_size)))  # apart from the P2P traffic
    # this rank's stage, or its chunks of an interleaved schedule
    stages = [build_stage(plan, s, device, replica) for s in plan.schedule.stages_of(index)]
    for stage in stages:
        resume_stage(plan, stage)
    messages = sum(1 for _ in _stats_order(plan))
    channel = StatsChannel(stats_group, info.rank, last, 0, messages, device,
                           config.pipeline.timeout_s) if info.rank in (0, last) else None
    norm_channels = _norm_channels(plan, info.rank, device) if plan.optimizer.clip_grad_norm else {}
    pipeline_group = join_mesh(stages, device, dp, ranks, config.pipeline.timeout_s, plan.clips_globally)
    dist.barrier()  # everyone has checked the plan before rank 0 writes anything
    recorder = None
    if info.rank == 0:
        if not resume:
            claim_run_dir(plan)
        write_header(plan)
        if on_plan is not None:
            on_plan(plan)
        recorder = make_recorder(plan, on_record)
    plan.run_dir = Path(_broadcast(str(plan.run_dir)))
    try:
        with stop.armed(plan.drains_midway) if stop is not None else contextlib.nullcontext():
            trace = _run_rank(plan, stages, replica, channel, recorder, checkpoint_group, norm_channels, stop)
        return _gather(plan, stages, trace, recorder, pipeline_group) if replica == 0 else None
    finally:
        if recorder is not None:
            recorder.close()


def _norm_channels(plan: Plan, rank: int, device: torch.device) -> dict[int, StatsChannel]:
    """With clipping, every rank s > 0 sends its gradient norm of each step to rank 0, which records
    them: one channel (and group) per rank, {s: channel} on rank 0, {rank: channel} on rank s."""
    channels = {}
    steps = plan.schedule.num_steps - plan.start_step
    for s in range(1, plan.num_stages):
        group = dist.new_group([0, s])  # every rank creates every group, in the same order
        if rank in (0, s):
            channels[s] = StatsChannel(group, rank, s, 0, steps, device, plan.config.pipeline.timeout_s)
    return channels


def _run_rank(plan: Plan, stages: list[Stage], replica: int, channel: StatsChannel | None, recorder: Recorder | None,
              checkpoint_group, norm_channels: dict[int, StatsChannel], stop: StopRequest | None) -> Trace:
    stats = StepStats(plan.schedule.accumulation, plan.eval_batches)
    due = _stats_order(plan)  # on rank 0: the step after which each stats message is sent
    next_due = next(due, None)

    next_norm = {s: plan.start_step + 1 for s in norm_channels}  # on rank 0: the step of each rank's next norm

    def record_until(step: float) -> None:
        nonlocal next_due
        if recorder is None:
            return
        for s, norms in norm_channels.items():  # sent at each rank's U, which comes before stage 0's next U
            while next_norm[s] <= min(step, plan.schedule.num_steps):
                at, norm, *_ = norms.receive()
                recorder.add_norm(int(at), s, norm)
                next_norm[s] += 1
        while next_due is not None and next_due <= step:
            recorder.consume(StatsEvent(*_as_event(channel.receive())))
            next_due = next(due, None)

    written: list[dict] = []  # this rank's stage files of the drain point being taken

    def on_drain(stage: Stage) -> None:
        """Each rank writes its stage files (one per stage it holds); rank 0, having recorded every
        step up to here, writes the manifest once all files are on disk (a gather, at a point where
        the pipeline is empty anyway)."""
        if replica == 0:  # the other replicas hold the same weights
            written.append(save_stage(plan, stage))
        if stage is not stages[-1]:  # the executor drains a rank's stages in order, at one point
            return
        record_until(stage.version)
        world = dist.get_world_size()
        entries = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(list(written), entries, dst=0, group=checkpoint_group)
        written.clear()
        if entries is not None:
            finish_checkpoint(plan, stage.version, [e for part in entries[:plan.num_ranks] for e in part])
        if stop is not None:  # a stop asked of any rank (they get the signal at slightly different times)
            asked = torch.tensor([float(stop.requested)], device=stage.device)
            dist.all_reduce(asked, op=dist.ReduceOp.MAX, group=checkpoint_group)
            if asked.item():
                raise Stopped(stage.version)

    def listener(stage: Stage, action: Action) -> None:
        if stage.is_last:
            for event in stats(stage, action):
                if channel is not None:  # replica 0's last stage reports (its losses are the replicas' mean)
                    channel.send(event)
        if action.op is Op.U and plan.optimizer.clip_grad_norm:
            if recorder is not None:
                recorder.add_norm(stage.version, stage.index, stage.grad_norm)
            elif stage.index in norm_channels and replica == 0:
                norm_channels[stage.index].send((stage.version, stage.grad_norm, 0.0, 0.0, 0.0))
        if action.op is Op.U:  # when stage 0 finishes step v, the last rank has long sent everything of step v-1
            record_until(stage.version - 1)

    trace = run_on_rank(stages, plan.schedule, stages[0].device, plan.config.pipeline.timeout_s,
                        offset=replica * plan.num_ranks, start_step=plan.start_step, listener=listener,
                        is_drain=plan.is_drain, on_drain=on_drain)
    if channel is not None and stages[-1].is_last:
        channel.flush()
    for stage in stages:
        if stage.index in norm_channels:
            norm_channels[stage.index].flush()
    record_until(math.inf)
    return trace


def _stats_order(plan: Plan) -> Iterator[int]:
    """The last rank's stats messages in send order, each as the step after which it is sent (from
    the start of this run, which a resume puts after its checkpoint's step and evaluation round)."""
    rounds = set(plan.eval_rounds)
    if not plan.start_step and 0 in rounds:
        yield 0  # validation before training
    for step in range(plan.start_step + 1, plan.schedule.num_steps + 1):
        yield step
        if step in rounds:
            yield step


def _as_event(values: tuple[float, ...]) -> tuple[int, int, float, int, float]:
    return int(values[0]), int(values[1]), values[2], int(values[3]), values[4]


def _broadcast(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _gather(plan: Plan, stages: list[Stage], trace: Trace, recorder: Recorder | None, group=None) -> Record | None:
    """Collect every rank's trace, memory and skipped updates on rank 0 (each rank checked its own
    versions as it ran); write the trace files and summary."""
    mine = (_peak_memory(stages[0].device), {stage.index: stage.skipped for stage in stages})
    gathered = gather_trace(trace, [stage.index for stage in stages], mine, group)
    if gathered is None:
        return None
    trace, extras = gathered
    skipped = {index: steps for _, per_stage in extras for index, steps in per_stage.items()}
    report = run_report(plan, trace, [memory for memory, _ in extras])
    recorder.append_final(report)
    return write_summary(plan, recorder, {**report, "skipped_updates": [skipped[s] for s in range(plan.num_stages)]})


def run_report(plan: Plan, trace: Trace, peak_memory: list[int]) -> Record:
    """Measured utilisation and bubble, the simulator's prediction from the measured op means, files."""
    metrics = trace.metrics()
    predicted = simulate(from_step(plan.schedule, plan.start_step), CostModel.from_trace(trace))
    if plan.config.train.trace:
        write_chrome_trace([trace, predicted.trace], plan.run_dir / "trace.json")
    if plan.config.train.plots:
        shown = 8 * plan.num_stages * plan.schedule.accumulation  # the first few steps, readable
        render_png(trace, plan.run_dir / "timeline.png", title=f"{plan.schedule.name}: measured", max_actions=shown)
        render_png(predicted.trace, plan.run_dir / "timeline_predicted.png", max_actions=shown,
                   title=f"{plan.schedule.name}: predicted from the measured op times")
    makespan = metrics.makespan
    return {"bubble_fraction": metrics.bubble_fraction,
            "per_stage_utilization": [round(s.busy / makespan, 4) for s in metrics.per_stage],
            "tokens_per_s": plan.schedule.num_microbatches * plan.tokens_per_microbatch / makespan,
            "measured_makespan_s": makespan, "predicted_makespan_s": predicted.metrics.makespan,
            "makespan_ratio": makespan / predicted.metrics.makespan,
            "peak_memory_bytes": peak_memory, "wait_s": [float(sum(c.wait)) for c in trace.stages]}
