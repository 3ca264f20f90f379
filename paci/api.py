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
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from paci.data import DataError
from paci.ir import Action, Op, steps_together
from paci.metrics import mean_loss
from paci.partition import parse_split, partition, stage_memory_model, uniform_split
from paci.profiler import default_budget, profile_modules
from paci.runtime import payload
from paci.runtime.executor import StageFailure, join_mesh, run_in_process, run_on_rank
from paci.runtime.launch import RankInfo, env_rank, init_distributed, rank_device
from paci.runtime.stage import OptimizerSpec, Stage
from paci.schedules import REGISTRY, build

__all__ = ["DataError", "Pipeline"]

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
        if schedule not in REGISTRY:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(REGISTRY)}")
        if not clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0: off), got {clip_grad_norm}")
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
            raise ValueError(f"dp (data-parallel replicas) must be an integer >= 1, got {dp!r}")
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
        self._stages: list[Stage] | None = None  # every stage in one process; this rank's alone under torchrun

    @property
    def stage_modules(self) -> list[nn.Module]:
        """Each stage's units as one nn.Sequential (the user's own modules, trained in place)."""
        if self.split is None:
            raise RuntimeError('split="profile" is chosen at the first fit(); call it first')
        return [nn.Sequential(*self.units[a:b]) for a, b in self.split]

    def _profile_split(self, feeder: _Feeder, device: torch.device) -> list[tuple[int, int]]:
        """Time every unit on micro-batch 0 (copies of the units), then the partitioner's fastest
        split whose stages fit the device (the memory model of this schedule: in-flight micro-batches
        and weight copies per stage)."""
        inputs, targets = feeder.first()
        profiles = profile_modules(self.units, inputs, targets, self.loss_fn, self.optimizer, device)
        inflight, copies = stage_memory_model(self.schedule, self.num_stages, self.microbatches, self.accumulation)
        split = partition(profiles, self.num_stages, inflight, copies, default_budget(device))
        log.info("profiled split %s (slowest stage %d: %.2f ms forward + backward per micro-batch)", split.spec,
                 split.bottleneck, 1e3 * split.max_time)
        return list(split.ranges)

    def fit(self, data: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
            on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Train on `steps` mini-batches from `data`; returns the mean training loss of each optimizer
        step (and calls `on_step(step, loss)` as each completes). Calling `fit` again continues:
        weights, optimizer and scheduler state carry over; the pipeline fills and drains per call."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        schedule = build(self.schedule, self.num_ranks, self.microbatches, steps, self.accumulation, chunks=self.chunks)
        feeder = _Feeder(iter(data), self.microbatches, steps)
        info = env_rank()
        if info is not None and info.world_size > 1:
            return self._fit_rank(info, schedule, feeder, on_step)
        if self.dp > 1:
            raise ValueError(f"dp={self.dp} runs one process per stage and replica: launch {self.dp * self.num_ranks} "
                             f"ranks (torchrun --nproc-per-node {self.dp * self.num_ranks})")
        if self._stages is None:
            device = self.device or torch.device("cpu")
            if self.split is None:
                with _data_errors():
                    self.split = self._profile_split(feeder, device)
            self._stages = [self._stage(s, schedule.weight_policy, schedule.accumulation, feeder, device)
                            for s in range(self.num_stages)]
        for stage in self._stages:
            stage.train_batch = feeder.view(stage.is_first, stage.is_last)
        losses: list[float] = []
        with _data_errors():
            run_in_process(self._stages, schedule, clip_globally=bool(self.clip_grad_norm) and steps_together(schedule),
                           listener=_listener(schedule, losses, on_step))
        return losses

    def _fit_rank(self, info: RankInfo, schedule, feeder: _Feeder, on_step) -> list[float]:
        """Under torchrun (or any launcher that sets RANK and WORLD_SIZE): this rank runs one stage (or
        its chunks of an interleaved schedule) of one replica (rank = replica x P + p: a (dp, pp)
        device mesh). Every rank is given the same data; each replica's first stage reads its share of
        the inputs, its last its share of the targets. Message layouts come from a first forward of
        micro-batch 0, handed down each pipeline."""
        if info.world_size != self.dp * self.num_ranks:
            raise ValueError(f"the world has {info.world_size} ranks but the pipeline has {self.num_ranks} stages "
                             f"x {self.dp} data-parallel replicas; launch one rank per stage and replica")
        replica, index = divmod(info.rank, self.num_ranks)
        offset = replica * self.num_ranks  # global rank of this replica's first rank
        device = self.device or rank_device(info)
        if not dist.is_initialized():
            init_distributed(device, self.timeout_s)
        if self._stages is None:
            if self.split is None:  # measured once, on rank 0; every rank takes rank 0's
                box = [self._profile_split(feeder, device) if info.rank == 0 else None]
                dist.broadcast_object_list(box, src=0)
                self.split = box[0]
            self._stages = [self._stage(s, schedule.weight_policy, schedule.accumulation, feeder, device)
                            for s in schedule.stages_of(index)]
            join_mesh(self._stages, device, self.dp, self.num_ranks, self.timeout_s,
                      bool(self.clip_grad_norm) and steps_together(schedule))
        for stage in self._stages:
            stage.train_batch = feeder.view(stage.is_first, stage.is_last, replica, self.dp)
        losses: list[float] = []
        with _data_errors():
            run_on_rank(self._stages, schedule, device, self.timeout_s, offset=offset,
                        listener=_listener(schedule, losses, on_step))
        return _losses_everywhere(losses, schedule.num_steps, info.rank, self.num_ranks, self.dp)

    def _stage(self, index: int, policy, accumulation: int, feeder: _Feeder, device: torch.device) -> Stage:
        start, stop = self.split[index]

        def make_optimizer(params: list[nn.Parameter]):
            optimizer = self.optimizer(params)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
            return optimizer, self.lr_scheduler(optimizer) if self.lr_scheduler is not None else None

        return Stage(index, self.num_stages, self.units[start:stop], policy=policy,
                     optim=OptimizerSpec(clip_grad_norm=self.clip_grad_norm), loss_scale=1.0 / accumulation,
                     train_batch=feeder.view(index == 0, index == self.num_stages - 1), val_batch=_no_evaluation,
                     device=device, loss_fn=self.loss_fn, make_optimizer=make_optimizer)


def _listener(schedule, losses: list[float], on_step) -> Callable[[Stage, Action], None]:
    """Per optimizer step of the last stage, the mean loss of its K micro-batches (as metrics.jsonl
    has it: the finite ones), into `losses` and to `on_step`."""
    def listener(stage: Stage, action: Action) -> None:
        if action.op is Op.U and stage.is_last:
            window = sorted(stage.losses)[:schedule.accumulation]
            losses.append(mean_loss([stage.losses.pop(mb) for mb in window])[0])
            if on_step is not None:
                on_step(len(losses), losses[-1])

    return listener


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """A DataError raised inside a stage's action is the data's fault: re-raise it alone."""
    try:
        yield
    except StageFailure as exc:
        if isinstance(exc.__cause__, DataError):
            raise exc.__cause__ from None
        raise


def _losses_everywhere(losses: list[float], steps: int, rank: int, num_stages: int, dp: int) -> list[float]:
    """Every rank gets the per-step losses: each replica's last stage sends its own to replica 0's,
    which averages them (in replica order) and sends the result to every rank; exact with one replica
    (a Python float is a float64). Point to point on purpose: a collective's tensors are released by
    a gloo worker thread that needs the GIL, and a process exiting right after its last collective
    can abort while that thread waits for it."""
    last = num_stages - 1
    lasts = [d * num_stages + last for d in range(dp)]
    box = torch.tensor(losses if rank in lasts else [0.0] * steps, dtype=torch.float64)
    if rank == last:
        total = box.clone()
        for peer in lasts[1:]:
            dist.recv(box, src=peer)
            total += box
        box = total / dp if dp > 1 else total
        for peer in range(dp * num_stages):
            if peer != last:
                dist.send(box, dst=peer)
    elif rank in lasts:
        dist.send(box, dst=last)
        dist.recv(box, src=last)
    else:
        dist.recv(box, src=last)
    return box.tolist()


class _Feeder:
    """Micro-batch mb -> its slice of mini-batch mb // m, pulled from `data` when first asked for;
    a mini-batch is dropped once the first stage (inputs) and the last (targets) are both past it."""

    def __init__(self, data: Iterator, microbatches: int, steps: int) -> None:
        self.data, self.m, self.steps = data, microbatches, steps
        self.loaded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pulled = 0
        self.position = {"inputs": 0, "targets": 0}  # the next mini-batch each end will ask for

    def view(self, inputs: bool, targets: bool, replica: int = 0, replicas: int = 1
             ) -> Callable[[int], tuple[payload.Payload | None, payload.Payload | None]]:
        """Micro-batch mb's inputs and/or targets; with data parallelism, replica's share of its rows."""
        def share(data: payload.Payload) -> payload.Payload:
            if replicas == 1:
                return data
            if any(t.shape[0] % replicas for t in payload.leaves(data)):
                raise DataError(f"a micro-batch of {payload.leaves(data)[0].shape[0]} rows cannot be shared by "
                                f"{replicas} data-parallel replicas; make each a multiple of {replicas}")
            return payload.shard(data, replica, replicas)

        def batch(mb: int):
            x, y = self._get(mb, "inputs" if inputs else "targets")
            return share(x) if inputs else None, share(y) if targets else None
        return batch

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch 0, inputs and targets (for profiling; it stays loaded for the run)."""
        if not self.loaded and self.pulled == 0:
            self.loaded[0] = self._cut(self._next())
            self.pulled = 1
        return self.loaded[0][0]

    def _get(self, mb: int, end: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = mb // self.m
        while self.pulled <= k:
            self.loaded[self.pulled] = self._cut(self._next())
            self.pulled += 1
        self.position[end] = k
        for old in [j for j in self.loaded if j < min(self.position.values())]:
            del self.loaded[old]
        return self.loaded[k][mb % self.m]

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            item = next(self.data)
        except StopIteration:
            raise DataError(f"the data ran out after {self.pulled} mini-batches; fit(steps={self.steps}) needs "
                             f"{self.steps}") from None
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(payload.is_payload(t) for t in item)):
            raise DataError(f"each mini-batch must be an (inputs, targets) pair of tensors (or of tuples, lists or "
                            f"dicts of tensors), got {type(item).__name__}")
        return item[0], item[1]

    def _cut(self, batch: tuple[payload.Payload, payload.Payload]) -> list[tuple[payload.Payload, payload.Payload]]:
        """The mini-batch as m micro-batches: every tensor of the inputs and targets cut along dim 0."""
        inputs, targets = batch
        rows = {t.shape[0] if t.dim() else -1 for t in payload.leaves(inputs) + payload.leaves(targets)}
        if len(rows) != 1 or rows.pop() % self.m:
            raise DataError(f"mini-batch {self.pulled}: every tensor of the inputs and targets must have one number of "
                            f"rows (dim 0), divisible into {self.m} micro-batches")
        return [(self._slice(inputs, k), self._slice(targets, k)) for k in range(self.m)]

    def _slice(self, data: payload.Payload, k: int) -> payload.Payload:
        return payload.apply(data, lambda t: t.chunk(self.m)[k])


def _no_evaluation(index: int):
    raise RuntimeError("Pipeline.fit runs no evaluation rounds")
