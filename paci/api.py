"""Pipeline your own model: the public Python API.

    import paci, torch
    from torch import nn

    units = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)]
    pipe = paci.Pipeline(units, loss_fn=nn.functional.mse_loss,
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                         schedule="paci", stages=2, microbatches=4)
    losses = pipe.fit(loader, steps=100)   # loader: any iterable of (inputs, targets) mini-batches

The model is an ordered list of modules ("units"), cut into `stages` contiguous stages (evenly by
count, or by `split`); each stage gets its own optimizer from the factory, over the stage's
parameters, and steps it after every K backwards (K = `accumulation`, by default the schedule's:
m for PACI, 2BW and the flush schedules, 1 for PipeDream and naive async). Every schedule of
`paci.schedules` runs with the exact semantics of docs/design.md §2: live weights for PACI, so the
optimizer must update its parameters in place (every torch.optim optimizer does; one that rebinds
`.data` is refused at its first step).

Data: each mini-batch is cut into `microbatches` equal micro-batches along dimension 0; the first
stage reads the inputs, the last the targets. `fit` pulls mini-batches as the schedule needs them
and keeps only those still in flight. The units themselves are trained in place.

A long run (`fit(dataset, steps, val_data=..., out=..., checkpoint_every=..., resume=True)`) gets
what `paci train` gets, from the same loop (paci.driver): validation rounds inside the schedule,
metrics.jsonl and summary.json, checkpoints at drain points with a resume equal bit for bit to the
run that never stopped, and a Ctrl-C / SIGTERM that drains after the current step, saves and
raises `Stopped`.

The same script runs every stage in this process (`python train.py`) or one stage per rank under
`torchrun --nproc-per-node P train.py` (gloo on CPU, NCCL on GPU), with the same numbers bit for
bit; under torchrun give every rank the same data (rank 0 reads the inputs, the last rank the
targets) and `fit` returns the losses on every rank.

Between units, and so between stages, passes a tensor or a tuple, list or dict of tensors (hidden
states with a mask or position ids): a unit gets what the unit before returned as its one
argument, as in `nn.Sequential`. Only floating-point tensors carry a gradient back; message
layouts come from one forward of the first micro-batch, never written by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from paci import checkpoint, driver, schedules
from paci.checks import check_integer, is_integer
from paci.data import DataError
from paci.ir import Schedule, evaluation_rounds, with_evaluation
from paci.progress import Progress
from paci.partition import parse_split, partition, split_spec, stage_memory_model, uniform_split
from paci.profiler import default_budget, profile_modules
from paci.runtime import mesh, payload
from paci.runtime.executor import StageFailure
from paci.runtime.launch import STOPPING, StopRequest, Stopped, stop_signals
from paci.runtime.mesh import env_rank, rank_device
from paci.runtime.stage import OptimizerSpec, Stage
from paci.runtime.transport import fan_out
from paci.schedules import build, lookup

__all__ = ["DataError", "History", "Pipeline", "Stopped"]

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, units: Sequence[nn.Module], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], *, schedule: str = "paci",
                 stages: int = 2, microbatches: int = 4, accumulation: int | None = None,
                 split: str | Sequence[tuple[int, int]] | None = None,
                 lr_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
                 clip_grad_norm: float = 0.0, dp: int = 1, chunks: int | None = None,
                 device: torch.device | str | None = None, timeout_s: float = 45.0) -> None:
        """`loss_fn(output, targets)` -> a scalar, the mean over the micro-batch (paci scales it by 1/K);
        `optimizer(params)` and `lr_scheduler(optimizer)` are called once per stage; `split` is
        "uniform" (the default: as even a count of units per stage as can be), "profile" (time every
        unit on the first micro-batch, then paci's partitioner: the fastest split that fits; on rank 0
        under torchrun), "0:3,3:5"-style text or a list of (start, stop) unit ranges; `clip_grad_norm` as
        `paci train --clip-grad-norm` (the global norm on flush schedules, each stage's own otherwise);
        `dp` replicas of the pipeline share each micro-batch's rows (under a launcher, dp x stages
        ranks; the replicas of a stage average their gradients at its step and meet nowhere else);
        `chunks` (interleaved-1f1b only, default 2) is the stages each of the `stages` ranks holds:
        the units are then cut into chunks x stages stages, rank r holding r, r + stages, ...;
        `device` defaults to the CPU in one process and to this rank's GPU (else CPU) under torchrun;
        `timeout_s` is how long a rank waits for a peer."""
        self.units = list(units)
        if not self.units or not all(isinstance(u, nn.Module) for u in self.units):
            raise ValueError("units must be a non-empty list of torch.nn.Module, in the order the model runs them")
        lookup(schedule)
        if not clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0: off), got {clip_grad_norm}")
        check_integer("dp (data-parallel replicas)", dp)
        # checks stages, microbatches, accumulation and chunks; an interleaved schedule has chunks x stages stages
        num_stages = build(schedule, stages, microbatches, 1, accumulation, chunks=chunks).num_stages
        if num_stages != stages and (split == "profile" or clip_grad_norm):
            raise ValueError("interleaved-1f1b runs with a uniform or given split and without clipping, so far")
        self.split: list[tuple[int, int]] | None = None  # "profile": chosen at the first fit
        if split == "profile":
            uniform_split(len(self.units), num_stages)  # checks there are enough units
        elif split == "uniform":
            self.split = uniform_split(len(self.units), num_stages)
        elif isinstance(split, str):
            self.split = parse_split(split, len(self.units), num_stages)
        else:
            self.split = uniform_split(len(self.units), num_stages) if split is None else [tuple(r) for r in split]
            parse_split(",".join(f"{a}:{b}" for a, b in self.split), len(self.units), num_stages)  # checks it
        self.loss_fn, self.optimizer, self.lr_scheduler = loss_fn, optimizer, lr_scheduler
        self.schedule, self.num_stages, self.num_ranks, self.microbatches = schedule, num_stages, stages, microbatches
        self.chunks = chunks
        self.accumulation, self.clip_grad_norm, self.timeout_s = accumulation, clip_grad_norm, timeout_s
        self.dp = dp
        self.device = None if device is None else torch.device(device)
        self._stages: list[Stage] | None = None  # every stage, in one process
        self._joined: driver.Joined | None = None  # this rank's stages, joined to their mesh, under a launcher
        self._fitted = 0  # optimizer steps taken by earlier fits
        self._data: tuple[_Feeder, list] | None = None  # the current fit's training data and held-out set
        self._replica = 0  # the data-parallel replica of this process's stages

    @property
    def stage_modules(self) -> list[nn.Module]:
        """Each stage's units as one nn.Sequential (the user's own modules, trained in place)."""
        if self.split is None:
            raise RuntimeError('split="profile" is chosen at the first fit(); call it first')
        return [nn.Sequential(*self.units[a:b]) for a, b in self.split]

    @property
    def local_stages(self) -> list[int]:
        """The stages this process trains: all of them in one process, under a launcher this rank's
        (one, or its chunks of an interleaved schedule)."""
        info = env_rank()
        if info is None or info.world_size == 1:
            return list(range(self.num_stages))
        return [s for s in range(self.num_stages) if s % self.num_ranks == info.rank % self.num_ranks]

    def _profile_split(self, feeder: _Feeder, device: torch.device, measures: bool, distributed: bool
                       ) -> list[tuple[int, int]]:
        """Time every unit on the first micro-batch (copies of the units), then the partitioner's
        fastest split whose stages fit the device (the memory model of this schedule: in-flight
        micro-batches and weight copies per stage). Under a launcher rank 0 measures (`measures`)
        and every rank takes its split."""
        split = None
        if measures or not distributed:
            inputs, targets = feeder.first()
            profiles = profile_modules(self.units, inputs, targets, self.loss_fn, self.optimizer, device)
            inflight, copies = stage_memory_model(self.schedule, self.num_stages, self.microbatches, self.accumulation)
            chosen = partition(profiles, self.num_stages, inflight, copies, default_budget(device))
            log.info("profiled split %s (slowest stage %d: %.2f ms forward + backward per micro-batch)", chosen.spec,
                     chosen.bottleneck, 1e3 * chosen.max_time)
            split = list(chosen.ranges)
        return mesh.broadcast(split) if distributed else split

    def fit(self, data: Iterable | Dataset, steps: int, *, val_data: Iterable | Dataset | None = None,
            eval_every: int | None = None, batch_size: int | None = None, seed: int = 0,
            out: str | Path | None = None, checkpoint_every: int | None = None, resume: bool = False,
            on_step: Callable[[int, float], None] | None = None,
            on_record: Callable[[dict], None] | None = None, drains: Iterable[int] = (), trace: bool = True,
            plots: bool = True, progress: bool = True) -> History:
        """Train on `steps` mini-batches; returns the mean training loss of each optimizer step (a
        list, whose `.val_loss` maps each validation round's step to its mean loss and `.summary`
        holds summary.json's numbers), and calls `on_step(step, loss)` as each step completes and
        `on_record(record)` with each metrics.jsonl record (rank 0 only, under a launcher).

        `data`: an iterable of (inputs, targets) mini-batches, or a map-style `Dataset` of
        (inputs, targets) samples that paci batches `batch_size` at a time in a seeded order (`seed`,
        a new permutation each epoch). `val_data` (either kind, a Dataset batched in order): the
        held-out set, evaluated in full before training, every `eval_every` optimizer steps (default:
        a tenth of the run) and at the end; it is held in memory.

        `out`: a run directory (new or empty) for metrics.jsonl, summary.json and checkpoints every
        `checkpoint_every` optimizer steps (default: the fewest whose drains cost under 1%) and at
        the end, taken where the schedule drains. `resume=True` continues the newest complete
        checkpoint in `out`, if it has one (else starts there afresh), bit for bit as if the run had
        never stopped, provided the data can resume: a Dataset, or an iterable with `state_dict()` /
        `load_state_dict()` (torchdata's StatefulDataLoader); a plain iterable is skipped forward, which
        is exact only if it yields the same mini-batches when started again.

        `progress`: a tqdm bar where stderr is a terminal, else a log line ("paci" logger, INFO)
        every ~10% of the run; on rank 0 only. With `out` also, as `paci train` writes them: loss.png (`plots`) and, on a launched run,
        trace.json (`trace`: the measured and predicted timelines, for Perfetto) and timeline PNGs.

        With `out`, Ctrl-C or SIGTERM drains the pipeline at the next step boundary, saves a
        checkpoint there and raises `paci.Stopped` (a second one stops at once). That extra drain
        point changes what an asynchronous schedule computes after it, so the checkpoint records
        it and a resumed run keeps it: stopped and resumed equals an uninterrupted run given
        `drains=[that step]` (extra drain points, each with a checkpoint), bit for bit.

        Without `out`, calling `fit` again continues: weights, optimizer and scheduler state carry
        over; the pipeline fills and drains per call."""
        check_integer("steps", steps)
        info = env_rank()
        distributed = info is not None and info.world_size > 1
        if not distributed and self.dp > 1:
            raise ValueError(f"dp={self.dp} runs one process per stage and replica: launch {self.dp * self.num_ranks} "
                             f"ranks (torchrun --nproc-per-node {self.dp * self.num_ranks})")
        run_dir = Path(out) if out is not None else None
        if resume and run_dir is None:
            raise ValueError("resume=True continues the checkpoints in a run directory: pass out= as well")
        manifest = checkpoint.latest(run_dir) if resume and (run_dir / "checkpoints").is_dir() else None
        if run_dir is not None and manifest is None:
            if self._fitted:
                raise ValueError("out= starts a run with its own checkpoints: give it to the first fit() of a Pipeline")
            driver.check_new_run_dir(run_dir, "out=")
        if manifest is not None and self.split is None:  # a profiled split: the one the checkpoint has
            self.split = parse_split(manifest["identity"]["split"], len(self.units), self.num_stages)
        source = _source(data, batch_size, seed, "data")
        held_out = _held_out(val_data, batch_size, self.microbatches) if val_data is not None else []
        base = build(self.schedule, self.num_ranks, self.microbatches, steps, self.accumulation, chunks=self.chunks)
        every = schedules.drain_interval(base, self.microbatches, checkpoint_every) if run_dir is not None else 0
        eval_every = max(1, base.num_steps // 10) if eval_every is None else eval_every
        if held_out:
            check_integer("eval_every", eval_every, note="optimizer steps")

        def rebuild(drains: tuple[int, ...] = ()) -> Schedule:  # with drain points after `drains` too (driver.Run)
            built = build(self.schedule, self.num_ranks, self.microbatches, steps, self.accumulation, every,
                          self.chunks, drains=drains)
            return with_evaluation(built, eval_every, len(held_out)) if held_out else built

        schedule = rebuild()
        start = manifest["next_microbatch"] // self.microbatches if manifest is not None else 0
        feeder = _Feeder(source, self.microbatches, steps, start)
        device = self.device or (rank_device(info) if distributed else torch.device("cpu"))
        if distributed:
            mesh.join(device, self.timeout_s)
        if self.split is None:
            with _data_errors():
                self.split = self._profile_split(feeder, device, distributed and info.rank == 0, distributed)
        self._data = (feeder, held_out)
        for stage in self._stages or (self._joined.stages if self._joined else []):
            self._attach(stage)
        run = driver.Run(
            schedule, self._make_stage(schedule), self.split,
            self._identity(steps, every, eval_every if held_out else 0, len(held_out), source),
            tokens_per_microbatch=feeder.tokens,
            lr_at=None,
            eval_rounds=evaluation_rounds(schedule.num_steps, eval_every) if held_out else [],
            eval_batches=len(held_out), checkpoint_every=every, checkpoints=run_dir is not None, run_dir=run_dir,
            resume=manifest, dp=self.dp, clip_grad_norm=self.clip_grad_norm, timeout_s=self.timeout_s,
            extra_state=feeder.state_for(distributed), load_extra_state=feeder.load_for(distributed, start),
            version_base=self._fitted, rebuild=rebuild, microbatches=self.microbatches, trace=trace, plots=plots)
        drains = tuple(drains)
        if drains:
            if run_dir is None:
                raise ValueError("drains= adds checkpoints: pass out= as well")
            last = run.schedule.num_steps
            if not all(is_integer(d) and d < last for d in drains):
                raise ValueError(f"drains must be optimizer steps between 1 and {last - 1}, got {list(drains)!r}")
            run.add_drains(*drains)
        if manifest is not None:
            checkpoint.check_identity(manifest["identity"], run.identity)
            if manifest["step"] >= schedule.num_steps:
                raise ValueError(f"resume: {run_dir} finished all {schedule.num_steps} steps; nothing to resume")
            log.info("paci: resuming %s after step %d", run_dir, manifest["step"])
        history = History()
        shown = Progress(schedule.num_steps, bool(held_out), quiet=not progress or (distributed and info.rank != 0))

        def record(item: dict) -> None:
            shown(item)
            if "loss" in item:
                history.append(item["loss"])
                if on_step is not None:
                    on_step(item["step"], item["loss"])
            if "val_loss" in item:
                history.val_loss[item["step"]] = item["val_loss"]
            if on_record is not None:
                on_record(item)

        # Ctrl-C or SIGTERM (torchrun passes both on) drains at the next step, saves and raises Stopped
        stop = StopRequest(stop_signals(), STOPPING if not distributed or info.rank == 0 else None) \
            if run_dir is not None and threading.current_thread() is threading.main_thread() else None
        with _data_errors(), _resume_line(run), contextlib.closing(shown):
            if distributed:
                summary, self._joined = driver.run_rank(run, device, record, stop=stop, joined=self._joined)
                recorded = schedule.num_steps - run.start_step  # rank 0's losses; a Python float is a float64
                box = torch.tensor(list(history) if info.rank == 0 else [0.0] * recorded, dtype=torch.float64,
                                   device=device)
                history[:] = fan_out(box, info.rank, info.world_size).tolist()
            else:
                summary, _, self._stages = driver.run_local(run, device, record, stop=stop, stages=self._stages)
        history.summary = summary or {}
        self._fitted += schedule.num_steps
        return history

    def _make_stage(self, schedule) -> driver.MakeStage:
        """Stage `index` of `replica`: the user's units, optimizer and scheduler; its data come from
        the current fit (`_attach`)."""
        def make(index: int, device: torch.device, replica: int) -> Stage:
            start, stop = self.split[index]

            def make_optimizer(params: list[nn.Parameter]):
                optimizer = self.optimizer(params)
                if not isinstance(optimizer, torch.optim.Optimizer):
                    raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got "
                                    f"{type(optimizer).__name__}")
                return optimizer, self.lr_scheduler(optimizer) if self.lr_scheduler is not None else None

            stage = Stage(index, self.num_stages, self.units[start:stop], policy=schedule.weight_policy,
                          optim=OptimizerSpec(clip_grad_norm=self.clip_grad_norm),
                          loss_scale=1.0 / schedule.accumulation, train_batch=_unattached, val_batch=_unattached,
                          device=device, loss_fn=self.loss_fn, make_optimizer=make_optimizer)
            self._replica = replica  # the same for every stage a rank holds
            self._attach(stage)
            return stage
        return make

    def _attach(self, stage: Stage) -> None:
        """Point the stage at this fit's data: its share (replica) of the training micro-batches and
        of the held-out set, at the ends of the pipeline."""
        feeder, held_out = self._data
        stage.train_batch = feeder.view(stage.is_first, stage.is_last, self._replica, self.dp)
        stage.val_batch = _held_out_view(held_out, self._replica, self.dp)

    def _identity(self, steps: int, every: int, eval_every: int, eval_batches: int, source: _Source) -> dict:
        """What fixes the computation of a fit with checkpoints (the optimizer's class and
        hyper-parameters are checked by each stage file): a resume must agree on all of it."""
        fields = {"schedule": self.schedule, "stages": self.num_stages, "ranks": self.num_ranks,
                  "microbatches": self.microbatches, "accum": self.accumulation, "split": split_spec(self.split),
                  "steps": steps, "checkpoint_every": every, "dp": self.dp, "clip_grad_norm": self.clip_grad_norm,
                  "eval_every": eval_every, "eval_batches": eval_batches, "data": source.identity,
                  "model": {f"{i}.{name}": list(p.shape) for i, unit in enumerate(self.units)
                            for name, p in unit.named_parameters()}}
        return json.loads(json.dumps(fields))


class History(list):
    """What `fit` returns: the mean training loss of each optimizer step (the finite ones of its K
    micro-batches), plus `val_loss` ({step: mean validation loss}, step 0 before training) and
    `summary` (summary.json's numbers; under a launcher, rank 0's)."""

    def __init__(self, losses: Iterable[float] = ()) -> None:
        super().__init__(losses)
        self.val_loss: dict[int, float] = {}
        self.summary: dict = {}


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """A DataError raised inside a stage's action is the data's fault: re-raise it alone."""
    try:
        yield
    except StageFailure as exc:
        if isinstance(exc.__cause__, DataError):
            raise exc.__cause__ from None
        raise


@contextlib.contextmanager
def _resume_line(run: driver.Run) -> Iterator[None]:
    """A stop that saved a checkpoint says how to continue (once, from rank 0)."""
    try:
        yield
    except Stopped as stop:
        info = env_rank()
        if info is None or info.rank == 0:
            log.warning("paci: stopped after step %d, at a checkpoint in %s; fit again with resume=True to continue",
                        stop.step, run.run_dir)
        raise


# ----------------------------------------------------------------------------------------------
# data: mini-batches by index, from a Dataset or an iterable


class _Source:
    """Mini-batch k, asked for in increasing order, and what a checkpoint needs to come back to it."""

    identity: str  # what a resume must agree on

    def get(self, k: int):
        raise NotImplementedError

    def state(self) -> dict | None:
        """The position to save at a drain point (None: the step alone fixes it, or nothing can)."""
        return None

    def restore(self, k: int, state: dict | None) -> None:
        """Continue at mini-batch k (from `state`, where one was saved)."""


class _Indexed(_Source):
    """A map-style Dataset of (inputs, targets) samples, `batch_size` at a time: in a seeded order,
    a new permutation each epoch (`seed` + epoch), or in order (`seed` None). Any mini-batch can be
    built directly, so the step fixes the position."""

    def __init__(self, dataset: Dataset, batch_size: int | None, seed: int | None, name: str) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{name} is a map-style Dataset: give fit() batch_size= (samples per mini-batch), got "
                             f"{batch_size!r}")
        self.dataset, self.batch_size, self.seed, self.size = dataset, batch_size, seed, len(dataset)
        if self.size < 1:
            raise ValueError(f"{name} is an empty Dataset")
        self.identity = f"Dataset of {self.size} samples, {batch_size} per mini-batch, order seed {seed}"
        self._epoch, self._order = -1, None

    def get(self, k: int):
        items = [self.dataset[self._index(p)] for p in range(k * self.batch_size, (k + 1) * self.batch_size)]
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise DataError(f"each sample of the Dataset must be an (inputs, targets) pair, got "
                            f"{type(items[0]).__name__}")
        return tuple(default_collate(items))

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.size)
        if self.seed is None:
            return i
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._order[i])


class _Iterated(_Source):
    """An iterable of (inputs, targets) mini-batches. With `state_dict()` / `load_state_dict()`
    (torchdata's StatefulDataLoader) a checkpoint saves its position; a plain one is skipped
    forward on resume, exact only if it yields the same mini-batches when started again."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable, self._it, self._next = iterable, None, 0
        self.stateful = all(callable(getattr(iterable, name, None)) for name in ("state_dict", "load_state_dict"))
        self.identity = f"iterable{' with state_dict' if self.stateful else ''}"

    def get(self, k: int):
        if self._it is None:
            self._it = iter(self.iterable)
        if k != self._next:
            raise RuntimeError(f"mini-batch {k} asked for out of order (next is {self._next})")
        self._next += 1
        return next(self._it)

    def state(self) -> dict | None:
        return self.iterable.state_dict() if self.stateful else None

    def restore(self, k: int, state: dict | None) -> None:
        if self.stateful and state is not None:
            self.iterable.load_state_dict(state)
            self._it = iter(self.iterable)
        else:
            log.warning("paci: the data have no state_dict(); skipping %d mini-batches to where the checkpoint "
                        "stopped, which is exact only if they come in the same order again", k)
            self._it = iter(self.iterable)
            for skipped in range(k):
                if next(self._it, None) is None:
                    raise DataError(f"the data ran out after {skipped} mini-batches, before the checkpoint's {k}")
        self._next = k


def _source(data, batch_size: int | None, seed: int | None, name: str) -> _Source:
    if isinstance(data, Dataset) and hasattr(data, "__getitem__") and hasattr(data, "__len__") \
            and not isinstance(data, IterableDataset):
        return _Indexed(data, batch_size, seed, name)
    if not isinstance(data, Iterable):
        raise ValueError(f"{name} must be an iterable of (inputs, targets) mini-batches or a map-style Dataset of "
                         f"(inputs, targets) samples, got {type(data).__name__}")
    return _Iterated(data)


def _cut(batch, m: int, what: str) -> list[tuple[payload.Payload, payload.Payload]]:
    """An (inputs, targets) mini-batch as m micro-batches: every tensor cut along dim 0."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(payload.is_payload(t) for t in batch)):
        raise DataError(f"each mini-batch must be an (inputs, targets) pair of tensors (or of tuples, lists or "
                        f"dicts of tensors), got {type(batch).__name__}")
    inputs, targets = batch
    rows = {t.shape[0] if t.dim() else -1 for t in payload.leaves(inputs) + payload.leaves(targets)}
    if len(rows) != 1 or rows.pop() % m:
        raise DataError(f"{what}: every tensor of the inputs and targets must have one number of rows (dim 0), "
                        f"divisible into {m} micro-batches")
    return [(payload.apply(inputs, lambda t: t.chunk(m)[k]), payload.apply(targets, lambda t: t.chunk(m)[k]))
            for k in range(m)]


def _share(data: payload.Payload, replica: int, replicas: int) -> payload.Payload:
    """A data-parallel replica's rows of a micro-batch."""
    if replicas == 1:
        return data
    if any(t.shape[0] % replicas for t in payload.leaves(data)):
        raise DataError(f"a micro-batch of {payload.leaves(data)[0].shape[0]} rows cannot be shared by "
                        f"{replicas} data-parallel replicas; make each a multiple of {replicas}")
    return payload.shard(data, replica, replicas)


def _held_out(val_data, batch_size: int | None, m: int) -> list[tuple[payload.Payload, payload.Payload]]:
    """The held-out set as evaluation micro-batches (mini-batches cut as the training ones are)."""
    source = _source(val_data, batch_size, None, "val_data")
    if isinstance(source, _Indexed):
        count = source.size // source.batch_size
        if count == 0:
            raise ValueError(f"val_data has {source.size} samples, fewer than one mini-batch of {batch_size}")
        batches = [source.get(k) for k in range(count)]
    else:
        batches = list(val_data)
    if not batches:
        raise ValueError("val_data is empty")
    return [part for k, batch in enumerate(batches) for part in _cut(batch, m, f"val_data mini-batch {k}")]


def _held_out_view(held_out: list, replica: int, replicas: int):
    def batch(index: int):
        inputs, targets = held_out[index % len(held_out)]
        return _share(inputs, replica, replicas), _share(targets, replica, replicas)
    return batch


def _unattached(index: int):
    raise RuntimeError("this stage has no data attached")


class _Feeder:
    """Micro-batch mb -> its slice of mini-batch mb // m, pulled from the source when first asked
    for; a mini-batch is dropped once the first stage (inputs) and the last (targets) are both past
    it. A resumed fit starts at mini-batch `start`."""

    def __init__(self, source: _Source, microbatches: int, steps: int, start: int = 0) -> None:
        self.source, self.m, self.steps, self.start = source, microbatches, steps, start
        self.loaded: dict[int, list[tuple[payload.Payload, payload.Payload]]] = {}
        self.pulled = start  # the next mini-batch to pull
        self.position = {"inputs": start, "targets": start}  # the next mini-batch each end will ask for
        self.resumed = False

    def view(self, inputs: bool, targets: bool, replica: int = 0, replicas: int = 1
             ) -> Callable[[int], tuple[payload.Payload | None, payload.Payload | None]]:
        """Micro-batch mb's inputs and/or targets; with data parallelism, replica's share of its rows."""
        def batch(mb: int):
            x, y = self._get(mb, "inputs" if inputs else "targets")
            return _share(x, replica, replicas) if inputs else None, _share(y, replica, replicas) if targets else None
        return batch

    def first(self) -> tuple[payload.Payload, payload.Payload]:
        """The first micro-batch this fit trains on, inputs and targets (it stays loaded for the run)."""
        while self.pulled <= self.start:
            self._pull()
        return self.loaded[self.start][0]

    def tokens(self) -> int:
        """Elements of a micro-batch's targets: a language model's tokens, a classifier's samples."""
        return sum(t.numel() for t in payload.leaves(self.first()[1]))

    def state_for(self, distributed: bool) -> Callable[[Stage], dict]:
        """A stage's checkpoint entry for the data: the source's position, saved by the stage that
        reads it at its drain point (stage 0 in one process, where one feeder serves both ends and
        the last stage's drain comes after stage 0 has read on; each end's own under a launcher)."""
        def extra(stage: Stage) -> dict:
            if not (stage.is_first or (distributed and stage.is_last)):
                return {}
            state = self.source.state()
            return {} if state is None else {"data": state}
        return extra

    def load_for(self, distributed: bool, start: int) -> Callable[[Stage, dict], None]:
        def load(stage: Stage, state: dict) -> None:
            if self.resumed or not (stage.is_first or (distributed and stage.is_last)):
                return
            self.resumed = True
            self.source.restore(start, state.get("data"))
        return load

    def _get(self, mb: int, end: str) -> tuple[payload.Payload, payload.Payload]:
        k = mb // self.m
        while self.pulled <= k:
            self._pull()
        self.position[end] = k
        for old in [j for j in self.loaded if j < min(self.position.values())]:
            del self.loaded[old]
        return self.loaded[k][mb % self.m]

    def _pull(self) -> None:
        try:
            batch = self.source.get(self.pulled)
        except StopIteration:
            raise DataError(f"the data ran out after {self.pulled} mini-batches; fit(steps={self.steps}) needs "
                            f"{self.steps}") from None
        self.loaded[self.pulled] = _cut(batch, self.m, f"mini-batch {self.pulled}")
        self.pulled += 1
