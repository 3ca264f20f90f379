"""The training loop every run gets: checkpoints, metrics, validation, stops, the closing report.

`paci train` (the built-in GPT) and `paci.Pipeline.fit` (a user's own units) each resolve their
inputs into a `Run`, the model-agnostic description of one run: its schedule (with evaluation
rounds and drain points), how to build stage s, where its files go and what identifies it. Then
`run_local` drives every stage in this process and `run_rank` this rank's stages of a launched
run (paci's own `--nproc`, or torchrun), with the same numbers bit for bit. This module is the one
place that turns a schedule's drain points into checkpoints, a last stage's losses into
metrics.jsonl records, and a finished trace into summary.json; its callers add only what is
theirs (a model, data, a config file, a progress line).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from paci import checkpoint
from paci.files import check_writable, write_text
from paci.ir import Action, Op, Schedule, from_step, steps_together
from paci.metrics import Record, Recorder, StatsEvent, StepStats, to_json
from paci.report import plot_curves, render_png, write_chrome_trace
from paci.runtime.executor import gather_trace, join_mesh, run_in_process, run_on_rank
from paci.runtime import mesh
from paci.runtime.launch import StopRequest, Stopped
from paci.runtime.mesh import env_rank
from paci.runtime.stage import Stage
from paci.runtime.transport import StatsChannel
from paci.sim import CostModel, simulate
from paci.trace import Trace

MakeStage = Callable[[int, torch.device, int], Stage]  # (stage index, device, replica) -> the stage


@dataclass
class Run:
    """One run, resolved and checked: what the loop needs to know, and nothing about the model."""

    schedule: Schedule  # the training schedule, with its evaluation rounds and drain points
    make_stage: MakeStage
    split: list[tuple[int, int]]  # [start, stop) units per stage, recorded in each stage's file
    identity: dict  # what fixes the computation: a checkpoint resumes only a run that agrees on all of it
    # tokens in one micro-batch over every data-parallel replica; asked once the stages are built
    # (and a resumed run's data are back at their position)
    tokens_per_microbatch: Callable[[], int]
    lr_at: Callable[[int], float] | None  # the learning rate of optimizer step i (0-based); None: the last stage's
    eval_rounds: list[int] = field(default_factory=list)  # the step after which each validation round runs
    eval_batches: int = 0  # micro-batches per validation round
    checkpoint_every: int = 0  # optimizer steps between drain points (0: only the end of the run)
    checkpoints: bool = False
    run_dir: Path | None = None  # None: nothing is written (no records file, no checkpoint)
    named: bool = True  # the user chose run_dir: a taken one is an error, not a reason to pick <name>-2
    resume: dict | None = None  # the manifest of the checkpoint this run continues from
    header: dict | None = None  # config.json's contents (written once, by a run that starts afresh)
    dp: int = 1
    clip_grad_norm: float = 0.0
    timeout_s: float = 45.0
    trace: bool = False  # trace.json (multi-process runs)
    plots: bool = False  # loss.png; timeline.png and timeline_predicted.png (multi-process runs)
    # what a stage's checkpoint file holds besides the stage's own state (a data loader's position),
    # and how a resumed stage takes it back
    extra_state: Callable[[Stage], dict] | None = None
    load_extra_state: Callable[[Stage, dict], None] | None = None
    version_base: int = 0  # the stages' version before this schedule (a Pipeline fitted again)
    # the schedule again with drain points added after these steps (a prompt stop's); None: a
    # requested stop waits for the next scheduled drain point
    rebuild: Callable[[tuple[int, ...]], Schedule] | None = None
    microbatches: int = 1  # per mini-batch: a drain point falls between whole mini-batches
    drains: tuple[int, ...] = ()  # the drain points a prompt stop added (this run's or its checkpoint's)

    def __post_init__(self) -> None:
        if self.resume is not None and self.resume.get("drains"):  # the run it continues stopped promptly
            self.add_drains(*self.resume["drains"])

    def add_drains(self, *steps: int) -> None:
        """Drain (and checkpoint) after each of `steps` too: the schedule is rebuilt with them."""
        if self.rebuild is None:
            raise ValueError("this run cannot add drain points (no rebuild)")
        self.drains = tuple(sorted({*self.drains, *steps}))
        self.schedule = self.rebuild(self.drains)

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def num_ranks(self) -> int:
        """Processes per pipeline: num_stages, or with an interleaved schedule num_stages / chunks."""
        return self.schedule.ranks

    @property
    def start_step(self) -> int:
        """The optimizer step this run starts after: 0, or the resumed checkpoint's."""
        return self.resume["step"] if self.resume else 0

    def is_drain(self, step: int) -> bool:
        """Is a checkpoint taken after optimizer step `step`? Also at step 0 (after the first
        validation), so that a run restarted before its first interval resumes rather than fails."""
        last = self.schedule.num_steps
        periodic = self.checkpoint_every > 0 and step % self.checkpoint_every == 0
        return self.checkpoints and (step in (0, last) or periodic or step in self.drains)

    @property
    def drains_midway(self) -> bool:
        """Can a requested stop save before the end: at a scheduled drain point, or at one it adds?"""
        return self.checkpoints and (0 < self.checkpoint_every < self.schedule.num_steps
                                     or bool(self.stop_points()))

    def stop_points(self) -> list[int]:
        """The steps after which a requested stop may add a drain point: each that ends a whole
        mini-batch, has no validation round after it (whose messages a drain would reorder) and is
        not a drain point already (where the stop saves anyway), from this run's start on."""
        if not self.checkpoints or self.run_dir is None or self.rebuild is None:
            return []
        k, rounds = self.schedule.accumulation, set(self.eval_rounds)
        return [step for step in range(self.start_step + 1, self.schedule.num_steps)
                if step * k % self.microbatches == 0 and step not in rounds and not self.is_drain(step)]

    @property
    def clips_globally(self) -> bool:
        """Clipping by the global norm over every stage: only where all stages step together (Δ = 0
        at every stage: the flush schedules); otherwise each stage clips by its own norm."""
        return bool(self.clip_grad_norm) and self.num_stages > 1 and steps_together(self.schedule)


Listener = Callable[[Record], None]


class PromptStop:
    """A requested stop drains the pipeline at the next step boundary stage 0 reaches: before its
    first forward of step S + 1, if a stop is requested, drain point S is added to the run (the
    schedule rebuilt with it), and the stages switch to the new schedule, which equals the old one
    on every rank up to there (tests/test_schedules.py); they drain, the checkpoint is saved, the
    run raises Stopped. In one process stage 0's executor decides; on a launched run rank 0 does
    and tells every rank (a `StatsChannel` of one field), which each asks before its own first forward of the step.
    Only at `Run.stop_points`; elsewhere the next one, or a scheduled drain point, serves."""

    def __init__(self, run: Run, stop: StopRequest, channel: StatsChannel | None = None, lead: int = 0) -> None:
        self.run, self.stop, self.channel, self.lead = run, stop, channel, lead  # lead: this rank's first stage
        self._points = iter(run.stop_points())
        self._next = next(self._points, None)

    def __call__(self, action: Action) -> Schedule | None:
        k = self.run.schedule.accumulation
        if action.stage != self.lead or action.microbatch % k or action.microbatch // k != self._next:
            return None
        step, self._next = self._next, next(self._points, None)
        if self.channel is None or self.channel.rank == self.channel.src:
            drain = self.stop.requested
            if self.channel is not None:
                self.channel.send((float(drain),))
        else:
            drain = bool(self.channel.receive()[0])
        if not drain:
            return None
        self.run.add_drains(step)
        return self.run.schedule


def run_local(run: Run, device: torch.device, on_record: Listener | None = None,
              on_start: Callable[[Run], None] | None = None, stop: StopRequest | None = None,
              stages: list[Stage] | None = None) -> tuple[Record, Trace, list[Stage]]:
    """Every stage in this process. Returns the summary, the measured trace and the stages (pass
    them back as `stages` to continue them with another schedule). Once `stop` is requested, the
    run drains at its next step boundary (PromptStop), saves a checkpoint there and raises Stopped."""
    if stages is None:
        stages = [run.make_stage(s, device, 0) for s in range(run.num_stages)]
        for stage in stages:
            resume_stage(run, stage)
    claim_run_dir(run)
    if on_start is not None:
        on_start(run)
    recorder = make_recorder(run, on_record)
    stats = StepStats(run.schedule.accumulation, run.eval_batches, run.version_base)

    def listener(stage: Stage, action: Action) -> None:
        for event in stats(stage, action):
            recorder.consume(event)
        if action.op is Op.U and run.clip_grad_norm:
            recorder.add_norm(stage.version - run.version_base, stage.index, stage.grad_norm)

    saved: dict[int, list[dict]] = {}

    def on_drain(stage: Stage) -> None:  # the last stage to reach a drain point completes the checkpoint
        entries = saved.setdefault(stage.version, [])
        entries.append(save_stage(run, stage))
        if len(entries) == run.num_stages:
            finish_checkpoint(run, stage.version, saved.pop(stage.version))
            if stop is not None and stop.requested:
                raise Stopped(stage.version)

    checkpointing = run.checkpoints and run.run_dir is not None
    prompt = PromptStop(run, stop) if stop is not None and run.stop_points() else None
    try:
        with stop.armed(run.drains_midway) if stop is not None else contextlib.nullcontext():
            trace = run_in_process(stages, run.schedule, clip_globally=run.clips_globally, start_step=run.start_step,
                                   listener=listener, is_drain=run.is_drain if checkpointing else None,
                                   on_drain=on_drain if checkpointing else None, reschedule=prompt)
    finally:
        recorder.close()
    return write_summary(run, recorder, {"skipped_updates": [stage.skipped for stage in stages]}), trace, stages


class Joined(NamedTuple):
    """A rank's stages, connected to their peers, and their pipeline's process group."""

    stages: list[Stage]
    group: object


def run_rank(run: Run, device: torch.device, on_record: Listener | None = None,
             on_start: Callable[[Run], None] | None = None, stop: StopRequest | None = None,
             joined: Joined | None = None) -> tuple[Record | None, Joined]:
    """This rank's part of a multi-process run (rank = replica x P + p: a (dp, pp) mesh). Rank 0
    writes the run directory, records every step and returns the summary (None elsewhere); at each
    checkpoint the ranks agree whether any was asked to `stop` (Stopped). Also returns this rank's
    stages, joined to their mesh: pass them back as `joined` to continue them with another schedule."""
    info = env_rank()
    if run.num_ranks * run.dp != info.world_size:
        raise ValueError(f"the world has {info.world_size} ranks but the pipeline has {run.num_ranks} stages"
                         + (f" x {run.dp} replicas" if run.dp > 1 else "") + "; launch one process per stage "
                         "and replica")
    replica, index = divmod(info.rank, run.num_ranks)
    mesh.join(device, run.timeout_s)
    last = run.num_ranks - 1  # replica 0's rank of the last stage: the one that reports to rank 0
    stats_group = mesh.new_group([0, last])
    checkpoint_group = mesh.new_group(range(info.world_size))  # apart from the P2P traffic
    points = run.stop_points() if stop is not None else []
    prompt = None
    if points:  # every rank creates the same groups in the same order
        flags = StatsChannel(mesh.new_group(range(info.world_size), backend="gloo"), info.rank, 0,
                             range(1, info.world_size), len(points), torch.device("cpu"), run.timeout_s, width=1)
        prompt = PromptStop(run, stop, flags, lead=index)
    if joined is None:  # this rank's stage, or its chunks of an interleaved schedule
        stages = [run.make_stage(s, device, replica) for s in run.schedule.stages_of(index)]
        for stage in stages:
            resume_stage(run, stage)
        joined = Joined(stages, join_mesh(stages, device, run.dp, run.num_ranks, run.timeout_s, run.clips_globally))
    stages = joined.stages
    messages = sum(1 for _ in _stats_order(run))
    channel = StatsChannel(stats_group, info.rank, last, 0, messages, device,
                           run.timeout_s) if info.rank in (0, last) else None
    norm_channels = _norm_channels(run, info.rank, device) if run.clip_grad_norm else {}
    mesh.barrier()  # everyone has checked the run before rank 0 writes anything
    recorder = None
    if info.rank == 0:
        claim_run_dir(run)
        if on_start is not None:
            on_start(run)
        recorder = make_recorder(run, on_record)
    if run.run_dir is not None:
        run.run_dir = Path(mesh.broadcast(str(run.run_dir)))
    try:
        with stop.armed(run.drains_midway) if stop is not None else contextlib.nullcontext():
            trace = _run_rank(run, stages, replica, channel, recorder, checkpoint_group, norm_channels, stop, prompt)
        return (_gather(run, stages, trace, recorder, joined.group) if replica == 0 else None), joined
    finally:
        if recorder is not None:
            recorder.close()


# ----------------------------------------------------------------------------------------------
# the run directory: config.json, checkpoints, metrics.jsonl, summary.json


def claim_run_dir(run: Run) -> None:
    """Make the run directory this run's alone (a resumed run's is its own already): creating its
    metrics.jsonl exclusively decides it. Two runs started in the same second under a default name
    get <name> and <name>-2. Then config.json."""
    if run.run_dir is None or run.resume is not None:
        return
    for n in itertools.count(1):
        path = run.run_dir if n == 1 else run.run_dir.with_name(f"{run.run_dir.name}-{n}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not run.named:
            continue
        path.mkdir(parents=True, exist_ok=True)
        try:
            (path / "metrics.jsonl").open("x").close()
        except FileExistsError:
            if run.named:
                raise ValueError(f"the run directory {path} is already used by another run; choose a new one") from None
            continue
        run.run_dir = path
        break
    if run.header is not None:
        write_text(run.run_dir / "config.json", json.dumps(run.header, indent=1) + "\n")


def check_new_run_dir(path: Path, what: str) -> None:
    """A new run's directory must not exist or be empty, and must be creatable."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what} {path} already exists and is not empty; choose a new run directory")
    check_writable(path, what, folder=True)


def save_stage(run: Run, stage: Stage) -> dict:
    """This stage's file of the checkpoint at its current step; returns the manifest entry."""
    extra = run.extra_state(stage) if run.extra_state is not None else {}
    state = {**stage.state_dict(), **extra, "stage": stage.index, "units": list(run.split[stage.index]),
             "optimizer_class": type(stage.optimizer).__qualname__,
             "hyperparameters": _hyperparameters(stage.optimizer.param_groups)}
    return checkpoint.save_stage(run.run_dir, stage.version, stage.index, state)


def finish_checkpoint(run: Run, step: int, entries: list[dict]) -> None:
    """Every stage file is written: the manifest makes the checkpoint complete."""
    checkpoint.write_manifest(run.run_dir, step, run.identity, entries,
                              {"next_microbatch": step * run.schedule.accumulation,
                               **({"drains": list(run.drains)} if run.drains else {})})


def resume_stage(run: Run, stage: Stage) -> None:
    """A resumed run's stage takes back its state; its optimizer must be the one the checkpoint was
    written with (class and every hyper-parameter: loading would silently replace them)."""
    if run.resume is None:
        return
    state = checkpoint.load_stage(run.resume, stage.index, stage.device)
    saved = {"optimizer_class": state["optimizer_class"], "param_groups": state["hyperparameters"]}
    current = {"optimizer_class": type(stage.optimizer).__qualname__,
               "param_groups": _hyperparameters(stage.optimizer.param_groups)}
    if stage.scheduler is None:  # an LR scheduler moves "lr" (and "initial_lr" is what it started from)
        checkpoint.check_identity(saved, current)
    else:
        checkpoint.check_identity(_without_lr(saved), _without_lr(current))
    stage.load_state_dict(state)
    if run.load_extra_state is not None:
        run.load_extra_state(stage, state)


def _hyperparameters(groups: list[dict]) -> dict:
    """An optimizer's param groups without their parameters, as JSON holds them (a function by name)."""
    def plain(value):
        return getattr(value, "__qualname__", None) or repr(value)

    return json.loads(json.dumps({str(i): {k: v for k, v in g.items() if k != "params"} for i, g in enumerate(groups)},
                                 default=plain))


def _without_lr(fields: dict) -> dict:
    return {**fields, "param_groups": {i: {k: v for k, v in g.items() if k != "lr"}
                                       for i, g in fields["param_groups"].items()}}


def make_recorder(run: Run, on_record: Listener | None) -> Recorder:
    return Recorder(run.run_dir, run.schedule, tokens_per_microbatch=run.tokens_per_microbatch(),
                    eval_rounds=run.eval_rounds, lr_at=run.lr_at, on_record=on_record, resume_step=run.start_step,
                    norm_stages=run.num_stages if run.clip_grad_norm else 0)


def write_summary(run: Run, recorder: Recorder, extra: Record) -> Record:
    """The recorder's final numbers plus `extra` (summary.json when the run has a directory);
    called once every version was verified."""
    summary = {**recorder.summary(), **extra, "schedule": run.schedule.name, "num_stages": run.num_stages,
               "run_dir": None if run.run_dir is None else str(run.run_dir), "versions_verified": True}
    if run.run_dir is not None:
        write_text(run.run_dir / "summary.json", to_json(summary, indent=1) + "\n")
        if run.plots:
            _plot_losses(run.run_dir)
    return summary


def _plot_losses(run_dir: Path) -> None:
    """loss.png: the training loss of every step and the validation rounds, from metrics.jsonl
    (the whole run's, also after a resume)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {"train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
              "val loss": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]}
    plot_curves(curves, run_dir / "loss.png", xlabel="optimizer step", ylabel="loss", title=run_dir.name,
                markers=("val loss",))


# ----------------------------------------------------------------------------------------------
# one rank of a launched run


def _norm_channels(run: Run, rank: int, device: torch.device) -> dict[int, StatsChannel]:
    """With clipping, every rank s > 0 sends its gradient norm of each step to rank 0, which records
    them: one channel (and group) per rank, {s: channel} on rank 0, {rank: channel} on rank s."""
    channels = {}
    steps = run.schedule.num_steps - run.start_step
    for s in range(1, run.num_stages):
        group = mesh.new_group([0, s])  # every rank creates every group, in the same order
        if rank in (0, s):
            channels[s] = StatsChannel(group, rank, s, 0, steps, device, run.timeout_s)
    return channels


def _run_rank(run: Run, stages: list[Stage], replica: int, channel: StatsChannel | None, recorder: Recorder | None,
              checkpoint_group, norm_channels: dict[int, StatsChannel], stop: StopRequest | None,
              prompt: PromptStop | None) -> Trace:
    stats = StepStats(run.schedule.accumulation, run.eval_batches, run.version_base)
    due = _stats_order(run)  # on rank 0: the step after which each stats message is sent
    next_due = next(due, None)
    base = run.version_base
    next_norm = {s: run.start_step + 1 for s in norm_channels}  # on rank 0: the step of each rank's next norm

    def record_until(step: float) -> None:
        nonlocal next_due
        if recorder is None:
            return
        for s, norms in norm_channels.items():  # sent at each rank's U, which comes before stage 0's next U
            while next_norm[s] <= min(step, run.schedule.num_steps):
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
            written.append(save_stage(run, stage))
        if stage is not stages[-1]:  # the executor drains a rank's stages in order, at one point
            return
        record_until(stage.version - base)
        entries = mesh.gather_objects(list(written), checkpoint_group)
        written.clear()
        if entries is not None:
            finish_checkpoint(run, stage.version, [e for part in entries[:run.num_ranks] for e in part])
        if stop is not None:  # a stop asked of any rank (they get the signal at slightly different times)
            if mesh.any_rank(stop.requested, checkpoint_group, stage.device):
                raise Stopped(stage.version)

    def listener(stage: Stage, action: Action) -> None:
        if stage.is_last:
            for event in stats(stage, action):
                if channel is not None:  # replica 0's last stage reports (its losses are the replicas' mean)
                    channel.send(event)
        if action.op is Op.U and run.clip_grad_norm:
            if recorder is not None:
                recorder.add_norm(stage.version - base, stage.index, stage.grad_norm)
            elif stage.index in norm_channels and replica == 0:
                norm_channels[stage.index].send((stage.version - base, stage.grad_norm, 0.0, 0.0, 0.0, 0.0))
        if action.op is Op.U:  # when stage 0 finishes step v, the last rank has long sent everything of step v-1
            record_until(stage.version - base - 1)

    checkpointing = run.checkpoints and run.run_dir is not None
    trace = run_on_rank(stages, run.schedule, stages[0].device, run.timeout_s, offset=replica * run.num_ranks,
                        start_step=run.start_step, listener=listener,
                        is_drain=run.is_drain if checkpointing else None, on_drain=on_drain if checkpointing else None,
                        reschedule=prompt)
    if channel is not None and stages[-1].is_last:
        channel.flush()
    for stage in stages:
        if stage.index in norm_channels:
            norm_channels[stage.index].flush()
    record_until(math.inf)
    return trace


def _stats_order(run: Run) -> Iterator[int]:
    """The last rank's stats messages in send order, each as the step after which it is sent (from
    the start of this run, which a resume puts after its checkpoint's step and evaluation round)."""
    rounds = set(run.eval_rounds)
    if not run.start_step and 0 in rounds:
        yield 0  # validation before training
    for step in range(run.start_step + 1, run.schedule.num_steps + 1):
        yield step
        if step in rounds:
            yield step


def _as_event(values: tuple[float, ...]) -> tuple[int, int, float, int, float, float]:
    return int(values[0]), int(values[1]), values[2], int(values[3]), values[4], values[5]


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _gather(run: Run, stages: list[Stage], trace: Trace, recorder: Recorder | None, group=None) -> Record | None:
    """Collect every rank's trace, memory and skipped updates on rank 0 (each rank checked its own
    versions as it ran); write the trace files and summary."""
    mine = (_peak_memory(stages[0].device), {stage.index: stage.skipped for stage in stages})
    gathered = gather_trace(trace, [stage.index for stage in stages], mine, group)
    if gathered is None:
        return None
    trace, extras = gathered
    skipped = {index: steps for _, per_stage in extras for index, steps in per_stage.items()}
    report = run_report(run, trace, [memory for memory, _ in extras])
    recorder.append_final(report)
    return write_summary(run, recorder, {**report, "skipped_updates": [skipped[s] for s in range(run.num_stages)]})


def run_report(run: Run, trace: Trace, peak_memory: list[int]) -> Record:
    """Measured utilisation and bubble, the simulator's prediction from the measured op means, files."""
    metrics = trace.metrics()
    predicted = simulate(from_step(run.schedule, run.start_step), CostModel.from_trace(trace))
    if run.trace and run.run_dir is not None:
        write_chrome_trace([trace, predicted.trace], run.run_dir / "trace.json")
    if run.plots and run.run_dir is not None:
        shown = 8 * run.num_stages * run.schedule.accumulation  # the first few steps, readable
        render_png(trace, run.run_dir / "timeline.png", title=f"{run.schedule.name}: measured", max_actions=shown)
        render_png(predicted.trace, run.run_dir / "timeline_predicted.png", max_actions=shown,
                   title=f"{run.schedule.name}: predicted from the measured op times")
    makespan = metrics.makespan
    return {"bubble_fraction": metrics.bubble_fraction,
            "per_stage_utilization": [round(s.busy / makespan, 4) for s in metrics.per_stage],
            "tokens_per_s": run.schedule.num_microbatches * run.tokens_per_microbatch() / makespan,
            "measured_makespan_s": makespan, "predicted_makespan_s": predicted.metrics.makespan,
            "makespan_ratio": makespan / predicted.metrics.makespan,
            "peak_memory_bytes": peak_memory, "wait_s": [float(sum(c.wait)) for c in trace.stages]}
