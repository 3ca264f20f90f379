"""Training metrics: the last stage turns losses into stats events; a Recorder turns those into records.

The two halves are apart because in a multi-process run they live on different ranks: the last
stage holds the losses, rank 0 writes metrics.jsonl and draws the progress bar. Events are plain
(kind, index, value, dropped) tuples of numbers, so they travel as one small tensor.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from paci.files import write_text
from paci.ir import Action, Op, Schedule, stage_versions

Record = dict[str, object]
STEP, VALIDATION = 0, 1


def to_json(value: object, **kwargs) -> str:
    """json.dumps, with every non-finite float written as null: bare NaN or Infinity is not JSON."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class StatsEvent(NamedTuple):
    kind: int  # STEP: index = the step just completed (1-based), value = mean train loss
    index: int  # VALIDATION: index = the evaluation round, value = mean validation loss
    value: float
    dropped: int = 0  # STEP: micro-batches of the step whose loss was not finite (left out of the mean and the update)
    at: float = 0.0  # STEP: when the last stage finished it (time.time(), on its own machine)
    lr: float = math.nan  # STEP: the last stage's learning rate at the step (its first param group)


def mean_loss(losses) -> tuple[float, int]:
    """A step's training loss: the mean of its micro-batches' finite losses (NaN if none), and how
    many were left out for not being finite (they were dropped from the update too)."""
    values = [float(loss) for loss in losses]
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(values) - len(finite)


class StepStats:
    """Listens to the last stage; yields a StatsEvent when a step or an evaluation round completes."""

    def __init__(self, accumulation: int, eval_batches: int, base: int = 0) -> None:
        """`base`: the stage's version when the schedule started (steps are counted from it)."""
        self.accumulation, self.eval_batches, self.base = accumulation, eval_batches, base

    def __call__(self, stage, action: Action) -> list[StatsEvent]:
        if not stage.is_last:
            return []
        if action.op is Op.U:
            step, k = stage.version - self.base, self.accumulation
            mean, dropped = mean_loss([stage.losses.pop(mb) for mb in range((step - 1) * k, step * k)])
            return [StatsEvent(STEP, step, mean, dropped, time.time(), stage.step_lr)]
        if action.op is Op.E and (action.microbatch + 1) % self.eval_batches == 0:
            index = action.microbatch // self.eval_batches
            first = index * self.eval_batches
            losses = [stage.eval_losses.pop(i) for i in range(first, first + self.eval_batches)]
            return [StatsEvent(VALIDATION, index, float(np.mean(losses)))]
        return []


class Recorder:
    """Writes one JSON object per step to metrics.jsonl (validation merged into its step's record);
    with no `run_dir`, only hands each to `on_record`."""

    def __init__(self, run_dir: Path | None, schedule: Schedule, *, tokens_per_microbatch: int, eval_rounds: list[int],
                 lr_at: Callable[[int], float] | None, on_record: Callable[[Record], None] | None = None,
                 resume_step: int = 0, norm_stages: int = 0) -> None:
        self.accumulation, self.tokens_per_microbatch = schedule.accumulation, tokens_per_microbatch
        self.eval_rounds, self.lr_at = eval_rounds, lr_at
        # Δ of every (stage, micro-batch) as the schedule fixes it, read lazily as steps complete;
        # the runtime's own records are checked against the same prediction at the end of the run
        self._versions = [stage_versions(schedule, s) for s in range(schedule.num_stages)]
        self._drift: list[dict[int, int]] = [{} for _ in range(schedule.num_stages)]
        self._floor = 0  # micro-batches below this were recorded already
        self.on_record = on_record
        # what the summary needs, and nothing that grows with the run (the records are in the file)
        self._last_step: Record = {}
        self._first_val: Record | None = None
        self._last_val: Record | None = None
        self._nonfinite = 0
        self.start = time.time()  # wall clock: the last stage stamps its steps on its own machine
        self._previous = (0, 0.0)  # (tokens, wall_s) of the last step recorded: tok_per_s is over each step
        self._pending: Record | None = None
        # with clipping, each step's record waits for every stage's gradient norm ("grad_norm")
        self._norm_stages = norm_stages
        self._norms: dict[int, dict[int, float]] = {}
        self._held: deque[Record] = deque()
        self._max_drift = 0
        self._file = None
        if run_dir is None:
            return
        path = run_dir / "metrics.jsonl"
        if resume_step:  # keep the records up to the checkpoint, drop those a crash left after it
            kept = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= resume_step
                    and not r.get("final")]
            write_text(path, "".join(to_json(r) + "\n" for r in kept))
            for record in kept:
                self._remember(record)
            self._max_drift = max((r.get("max_drift", 0) for r in kept), default=0)
            self.start -= max((r.get("wall_s", 0.0) for r in kept), default=0.0)
            last = max((r for r in kept if "loss" in r), key=lambda r: r["step"], default=None)
            self._previous = (last["tokens"], last["wall_s"]) if last else (0, 0.0)
            self._floor = resume_step * self.accumulation
        self._file = open(path, "a")

    def consume(self, event: StatsEvent) -> None:
        if event.kind == STEP:
            self._flush()
            self._pending = self._step_record(event.index, event.value, event.at, event.lr)
            if event.dropped:
                self._pending["nonfinite_microbatches"] = event.dropped
            if event.index not in self.eval_rounds:
                self._flush()
            return
        step, loss = self.eval_rounds[event.index], event.value
        validation = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if step == 0:
            self._emit({"step": 0, "tokens": 0, **validation, "wall_s": 0.0})
        elif self._pending is not None and self._pending["step"] == step:
            self._pending.update(validation)
            self._flush()

    def _step_record(self, step: int, loss: float, at: float = 0.0, lr: float = math.nan) -> Record:
        """Step `step`'s record: `wall_s` when its last stage finished it (`at`; else now),
        `tok_per_s` over this step alone (since the step recorded before it), and the learning
        rate of `lr_at` (the run's schedule), or without one the last stage's (`lr`)."""
        k = self.accumulation
        self._floor = (step - 1) * k
        drift = Counter(self._predicted_drift(stage, mb) for stage in range(len(self._versions))
                        for mb in range((step - 1) * k, step * k))
        self._max_drift = max(self._max_drift, max(drift))
        wall = (at or time.time()) - self.start
        tokens = step * k * self.tokens_per_microbatch
        previous_tokens, previous_wall = self._previous
        self._previous = (tokens, wall)
        return {"step": step, "tokens": tokens, "loss": loss, "lr": self.lr_at(step - 1) if self.lr_at is not None else lr, "wall_s": round(wall, 3),
                "tok_per_s": (tokens - previous_tokens) / max(wall - previous_wall, 1e-9),
                "drift_histogram": dict(sorted(drift.items())), "max_drift": self._max_drift}

    def _predicted_drift(self, stage: int, mb: int) -> int:
        known = self._drift[stage]
        while mb not in known:
            got, v_f, v_b = next(self._versions[stage])
            if got >= self._floor:
                known[got] = v_b - v_f
        return known.pop(mb)

    def _flush(self) -> None:
        if self._pending is not None:
            self._emit(self._pending)
            self._pending = None

    def _remember(self, record: Record) -> None:
        if "loss" in record:
            self._last_step = record
            self._nonfinite += record.get("nonfinite_microbatches", 0)
        if "val_loss" in record:
            self._first_val = self._first_val or record
            self._last_val = record

    def add_norm(self, step: int, stage: int, norm: float | None) -> None:
        """Stage `stage`'s gradient norm before its clipping at step `step` (NaN: not finite, skipped)."""
        self._norms.setdefault(step, {})[stage] = math.nan if norm is None else norm
        self._release()

    def _emit(self, record: Record) -> None:
        self._held.append(record)
        self._release()

    def _release(self, everything: bool = False) -> None:
        """Write the held records, in order, whose norms are all in (every one with `everything`)."""
        while self._held:
            record = self._held[0]
            norms = self._norms.get(record.get("step"), {}) if "loss" in record else None
            if norms is not None and self._norm_stages:
                if len(norms) < self._norm_stages and not everything:
                    return
                record["grad_norm"] = [norms.get(s, math.nan) for s in range(self._norm_stages)]
                del self._norms[record["step"]]
            self._held.popleft()
            self._remember(record)
            if self._file is not None:
                self._file.write(to_json(record) + "\n")
                self._file.flush()
            if self.on_record is not None:
                self.on_record(record)

    def append_final(self, record: Record) -> None:
        """The run's closing line (utilisation, bubble, memory), marked "final": true."""
        self._flush()
        self._release(everything=True)
        if self._file is not None:
            self._file.write(to_json({"final": True, **record}) + "\n")

    def close(self) -> None:
        self._flush()
        self._release(everything=True)
        if self._file is not None:
            self._file.close()

    def summary(self) -> Record:
        last, first_val, last_val = self._last_step, self._first_val or {}, self._last_val or {}
        return {"nonfinite_microbatches": self._nonfinite, "final_train_loss": last.get("loss"),
                "final_val_loss": last_val.get("val_loss"), "final_val_ppl": last_val.get("val_ppl"),
                "initial_val_loss": first_val.get("val_loss"),
                "steps": last.get("step", 0), "tokens": last.get("tokens", 0), "max_drift": self._max_drift,
                "wall_s": round(time.time() - self.start, 3),
                "tokens_per_s": last.get("tokens", 0) / last["wall_s"] if last.get("wall_s") else None}
