"""`paci plan` / `paci.plan`: the fastest pipeline configuration that fits, found with the simulator.

For a GPT preset on P ranks, a global batch of G sequences per optimizer step and a memory budget
per device, every registered schedule × m (the divisors of G, so a micro-batch is G/m sequences)
× chunks (interleaved-1f1b: 2..4 stages per rank) × recompute (off, on) is a candidate. Each gets
the partitioner's best split for its own memory model (`partition.stage_memory_model`), and is
then simulated exactly with the profiled per-unit costs: its time per step (the steady state, from
two runs of different length), bubble, peak bytes per rank, weight copies and every Δ. K, the
backwards an asynchronous schedule sums per update, is m: one update per global batch, the recipe
the user asked for (a K below m would change the batch an update sees).

Asynchronous schedules pay for their speed in quality. The `risk` column is the rule measured on
this project's study (docs/experiments.md, docs/results.md §1b: the `deep` GPT at P = 8 over 400
steps), keyed by the largest share of a stage's gradient that arrives one update late. It is one
scale's measurement, not a law; the output says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paci import schedules
from paci.checks import format_bytes
from paci.model import PRESETS, GPTConfig, num_units
from paci.partition import UnitCosts, partition, split_spec, stage_memory_model
from paci.profiler import UnitProfile, profile_units, stage_costs
from paci.runtime import payload
from paci.sim import CostModel, simulate

EVIDENCE = "docs/experiments.md#what-to-use"
MAX_CHUNKS = 4
MAX_MICROBATCHES = 512  # m beyond this is not searched (a micro-batch of G/512 sequences and more)
MAX_GLOBAL_BATCH = 10**6
# (largest late share up to, risk, what was measured there: P = 8, the deep GPT, 400 steps, 3 seeds)
RISK_RULE = ((0.0, "none", "synchronous: every backward sees its forward's weights and version"),
             (0.25, "low", "Muon: within seed noise of flush (K = 32, share 7/32); AdamW: +0.13 nats"),
             (0.5, "medium", "Muon: +0.04 nats (K = 16, share 7/16); AdamW: +0.33"),
             (1.0, "high", "Muon: +0.12 nats (K = 8, share 7/8); AdamW: +0.56 (+0.20 with predict-window)"))
BEYOND = ("very high", "a gradient more than one update late: Muon +0.29 nats and more (K = 4), AdamW +0.77")
RISKS = [risk for _, risk, _ in RISK_RULE] + [BEYOND[0]]  # from none to very high
PROFILED_HERE = "per-unit costs profiled on this machine (one rank per device like it)"


def note(source: str = PROFILED_HERE) -> str:
    return (f"times are the simulator's, from {source}; the quality risk is the rule measured at one scale (the "
            f"deep GPT, P = 8, 400 steps: {EVIDENCE}), not a law")


@dataclass(frozen=True)
class Candidate:
    schedule: str
    microbatches: int  # m; K = m for the asynchronous schedules that take a K
    batch_size: int  # sequences per micro-batch, G / m
    chunks: int | None  # stages per rank (interleaved-1f1b)
    recompute: bool
    split: str  # unit ranges, one per stage
    step_s: float  # time per optimizer step (one global batch) in the steady state
    tokens_per_s: float
    bubble: float  # steady-state idle share of the ranks
    peak_bytes: tuple[float, ...]  # per rank, as the simulator counts them (between actions)
    fits: bool
    weight_copies: int  # the most stashed weight copies any stage holds
    max_drift: int  # the largest Δ of any backward
    mean_drift: float  # mean Δ over every backward of every stage
    late_share: float  # the largest share, over stages, of backwards whose gradient is an update late

    @property
    def synchronous(self) -> bool:
        return self.max_drift == 0

    @property
    def risk(self) -> str:
        return _risk(self)[0]

    @property
    def risk_evidence(self) -> str:
        return _risk(self)[1]

    def command(self, preset: str, num_ranks: int, seq_len: int, vocab_size: int | None = None,
                memory: str | None = None, optimizer: str = "muon") -> str:
        """The `paci train` line that runs this candidate, one process per rank."""
        parts = ["paci train", f"--preset {preset}", f"--schedule {self.schedule}", f"--nproc {num_ranks}",
                 f"--microbatches {self.microbatches}", f"--batch-size {self.batch_size}", f"--seq-len {seq_len}"]
        parts += [f"--optimizer {optimizer}"] if optimizer != "muon" else []
        parts += [f"--chunks {self.chunks}"] if self.chunks else []
        parts += ["--recompute"] if self.recompute else []
        parts += [f"--vocab-size {vocab_size}"] if vocab_size else []
        parts += [f"--memory-per-stage {memory}"] if memory else []
        return " ".join(parts + [f"--split {self.split}"])

    def pipeline_call(self, num_ranks: int) -> str:
        """The `paci.Pipeline(...)` call that runs this candidate on a model's units."""
        chunks = f", chunks={self.chunks}" if self.chunks else ""
        return (f'paci.Pipeline(units, loss_fn, optimizer, schedule="{self.schedule}", stages={num_ranks}, '
                f'microbatches={self.microbatches}, split="{self.split}"{chunks})  # micro-batches of '
                f'{self.batch_size}')

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": list(self.peak_bytes), "risk": self.risk,
                "risk_evidence": self.risk_evidence}


def _risk(candidate: Candidate) -> tuple[str, str]:
    if candidate.max_drift > 1:
        return BEYOND
    return next((risk, why) for limit, risk, why in RISK_RULE if candidate.late_share <= limit + 1e-12)


@dataclass(frozen=True)
class Plan:
    candidates: tuple[Candidate, ...]  # ranked: those that fit first, then by time per step
    num_ranks: int
    global_batch: int
    seq_len: int
    budget: float | None
    optimizer: str = "muon"  # whose step was timed: the runnable lines name it

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def best_where(self, synchronous: bool, risk: str | None = None) -> Candidate | None:
        """The fastest candidate that fits, of that kind (and, with `risk`, at that quality risk or lower)."""
        worst = len(RISKS) if risk is None else RISKS.index(risk)
        return next((c for c in self.candidates if c.fits and c.synchronous == synchronous
                     and RISKS.index(c.risk) <= worst), None)


def plan(model: str | GPTConfig | Sequence[nn.Module], num_ranks: int, global_batch: int,
         seq_len: int | None = None, *, budget: float | None = None, vocab_size: int | None = None,
         schedule_names: Sequence[str] | None = None, recompute: Sequence[bool] = (False, True),
         latency: float = 0.0, bandwidth: float = math.inf, device: str = "cpu",
         profiles: Callable[[int], Sequence[UnitProfile]] | None = None,
         message_bytes_per_token: float | None = None, optimizer: str | Callable = "muon",
         loss_fn: Callable | None = None, batch: Callable[[int], tuple[Any, Any]] | None = None,
         on_checked: Callable[[], None] | None = None) -> Plan:
    """Every candidate for `model` (a preset name or a GPTConfig; `vocab_size` replaces its
    vocabulary) on `num_ranks` ranks with `global_batch` sequences of `seq_len` tokens (default: the
    context) per optimizer step, ranked. `model` may also be paci.Pipeline's units: then `loss_fn`
    and `batch(b)` (a micro-batch of b samples: inputs, targets) are needed, `optimizer` is the
    Pipeline's factory (default AdamW), the units are profiled on `device` with those, the messages
    are the units' measured outputs, and recomputation (which Pipeline does not do) is left out.
    `profiles(b)` gives the units' profiles for micro-batches of b sequences (default:
    `profiler.profile_units` on `device`, cached on disk); `budget` is bytes per rank (None: no
    limit); m runs over the divisors of `global_batch` up to MAX_MICROBATCHES; a message between
    ranks takes `latency` + bytes / `bandwidth` seconds, a message being `message_bytes_per_token`
    (default: fp32 hidden states) per token.
    Profiled here, each unit's optimizer step is timed with `optimizer` ("muon", `paci train`'s
    default, or "adamw"; a cost file brings its own).
    `on_checked` is called once the arguments are checked, before anything is profiled."""
    if isinstance(model, (list, tuple)):
        return _plan_units(list(model), loss_fn, batch, num_ranks, global_batch, budget, schedule_names, latency,
                           bandwidth, device, None if isinstance(optimizer, str) else optimizer)
    if not isinstance(model, (str, GPTConfig)):
        raise ValueError("model must be a preset name, a GPTConfig or a list of torch.nn.Module units, got "
                         f"{type(model).__name__}")
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown preset {model!r}; choose one of: {', '.join(PRESETS)}")
        model = PRESETS[model]
    config = model if vocab_size is None else dataclasses.replace(model, vocab_size=vocab_size)
    seq_len = config.block_size if seq_len is None else seq_len
    if not 1 <= seq_len <= config.block_size:
        raise ValueError(f"--seq-len must be in 1..{config.block_size} (the model's context), got {seq_len}")
    units = num_units(config)
    names = _checked(schedule_names, num_ranks, units, global_batch, budget)
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"unknown --optimizer {optimizer!r}; choose muon or adamw")
    if on_checked is not None:
        on_checked()
    if profiles is None:
        updates = _update_seconds(config, device) if optimizer == "muon" else None

        def profiles(b: int) -> list[UnitProfile]:
            found = profile_units(config, b, seq_len, device)  # its update_s is AdamW's
            return found if updates is None else [dataclasses.replace(u, update_s=t) for u, t in zip(found, updates)]
    per_token = 4.0 * config.n_embd if message_bytes_per_token is None else message_bytes_per_token

    def sizes(b: int) -> tuple[list[float], float]:  # every unit's output: hidden states; the input: token ids
        return [b * seq_len * per_token] * units, b * seq_len * 8.0

    found = _search(names, num_ranks, units, global_batch, profiles, sizes, seq_len, recompute, budget, latency,
                    bandwidth)
    return Plan(found, num_ranks, global_batch, seq_len, budget, optimizer)


def _checked(schedule_names: Sequence[str] | None, num_ranks: int, units: int, global_batch: int,
             budget: float | None) -> list[str]:
    """The schedules to search, once the search's sizes are checked."""
    names = list(schedules.REGISTRY if schedule_names is None else schedule_names)
    for name in names:
        schedules.lookup(name)
    if not names:
        raise ValueError("--schedules names no schedule")
    if not 1 <= num_ranks <= units:
        raise ValueError(f"--stages must be in 1..{units} (the model has {units} units), got {num_ranks}")
    if not 1 <= global_batch <= MAX_GLOBAL_BATCH:
        raise ValueError(f"--global-batch must be in 1..{MAX_GLOBAL_BATCH:,} sequences, got {global_batch:,}")
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"the memory budget must be a positive number of bytes, got {budget!r}")
    return names


def _plan_units(units: list[nn.Module], loss_fn: Callable | None, batch: Callable[[int], tuple[Any, Any]] | None,
                num_ranks: int, global_batch: int, budget: float | None, schedule_names: Sequence[str] | None,
                latency: float, bandwidth: float, device: str, make_optimizer: Callable | None) -> Plan:
    from paci.profiler import profile_modules

    if not units or not all(isinstance(u, nn.Module) for u in units):
        raise ValueError("model must be a preset name, a GPTConfig or a non-empty list of torch.nn.Module units")
    if loss_fn is None or batch is None:
        raise ValueError("planning a list of units needs loss_fn and batch (b -> a micro-batch of b samples: "
                         "inputs, targets)")
    names = _checked(schedule_names, num_ranks, len(units), global_batch, budget)
    measured: dict[int, tuple[list[UnitProfile], list[float], float]] = {}

    def measure(b: int) -> tuple[list[UnitProfile], list[float], float]:
        if b not in measured:
            inputs, targets = batch(b)
            found = profile_modules(units, inputs, targets, loss_fn, make_optimizer, device)
            outputs, x = [], inputs
            with torch.no_grad():
                for unit in units:
                    x = unit(x)
                    outputs.append(float(_nbytes(x)))
            measured[b] = (found, outputs, float(_nbytes(inputs)))
        return measured[b]

    found = _search(names, num_ranks, len(units), global_batch, lambda b: measure(b)[0], lambda b: measure(b)[1:],
                    1, (False,), budget, latency, bandwidth)
    return Plan(found, num_ranks, global_batch, 1, budget, "the Pipeline's")  # seq_len 1: tokens/s counts samples


def _nbytes(value: Any) -> int:
    """The bytes of what a unit sends on (a payload: a tensor, or a tuple, list or dict of them)."""
    return sum(t.nbytes for t in payload.leaves(value))


def _search(names: Sequence[str], num_ranks: int, units: int, global_batch: int,
            profiles: Callable[[int], Sequence[UnitProfile]], sizes: Callable[[int], tuple[list[float], float]],
            tokens: int, recompute: Sequence[bool], budget: float | None, latency: float,
            bandwidth: float) -> tuple[Candidate, ...]:
    """Every candidate, ranked. `sizes(b)`: the bytes of each unit's output and of the model's input
    for micro-batches of b samples; `tokens` per sample (1 counts samples)."""
    found, memo = [], {}  # memo: memory models and splits that candidates share (1F1B's is PACI's, ...)
    for m in divisors(global_batch, MAX_MICROBATCHES):
        b = global_batch // m
        unit_profiles = list(profiles(b))
        outputs, input_bytes = sizes(b)
        for name in names:
            chunked = schedules.REGISTRY[name].chunked
            for chunks in ([v for v in range(2, MAX_CHUNKS + 1) if v * num_ranks <= units] if chunked else [None]):
                for rc in recompute:
                    candidate = _candidate(name, num_ranks, m, b, chunks, rc, unit_profiles, outputs, input_bytes,
                                           tokens, budget, latency, bandwidth, memo)
                    if candidate is not None:
                        found.append(candidate)
    found.sort(key=lambda c: (not c.fits, c.step_s, c.late_share, c.weight_copies, max(c.peak_bytes), c.recompute,
                              c.schedule, c.microbatches))
    return tuple(found)


COST_FILE_KEYS = {"description", "sources", "assumptions", "preset", "microbatch_size", "seq_len", "units",
                  "latency_s", "bandwidth_Bps", "message_bytes_per_token", "memory_per_device"}


@dataclass(frozen=True)
class CostFile:
    """Per-unit costs for a machine not at hand (a JSON file): each unit's forward, backward, input
    gradient and optimizer-step seconds and its static, activation and weight bytes, for micro-batches
    of `microbatch_size` sequences of `seq_len` tokens; times and activation bytes scale linearly with
    the sequences of a micro-batch (what a GPU at these sizes does, roughly: say so where it does not);
    the link's latency and bandwidth; the bytes per token of a message between ranks."""

    units: tuple[UnitProfile, ...]
    microbatch_size: int
    seq_len: int
    latency_s: float
    bandwidth_Bps: float
    message_bytes_per_token: float
    memory_per_device: str | None

    @classmethod
    def read(cls, path: str, config: GPTConfig) -> CostFile:
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"--costs {path}: cannot read it ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"--costs {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("units"), list):
            raise ValueError(f"--costs {path}: expected an object with a 'units' list (see configs/costs/)")
        unknown = sorted(set(data) - COST_FILE_KEYS)
        if unknown:
            raise ValueError(f"--costs {path}: unknown keys {unknown}; the keys are {sorted(COST_FILE_KEYS)}")
        if len(data["units"]) != num_units(config):
            raise ValueError(f"--costs {path}: {len(data['units'])} units, but the preset has {num_units(config)}; "
                             "give the preset the file describes")
        fields = {f.name for f in dataclasses.fields(UnitProfile)}
        try:
            units = tuple(UnitProfile(**unit) for unit in data["units"])
            values = {k: data[k] for k in ("microbatch_size", "seq_len", "latency_s", "bandwidth_Bps")}
        except (TypeError, KeyError) as exc:
            raise ValueError(f"--costs {path}: each unit needs the keys {sorted(fields)}, and the file "
                             f"microbatch_size, seq_len, latency_s and bandwidth_Bps ({exc})") from None
        numbers = [getattr(u, f) for u in units for f in fields if f != "name"] + list(values.values())
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf for v in numbers):
            raise ValueError(f"--costs {path}: every time, size and count must be a finite number >= 0")
        if values["microbatch_size"] < 1 or values["seq_len"] < 1 or not values["bandwidth_Bps"] > 0:
            raise ValueError(f"--costs {path}: microbatch_size and seq_len must be >= 1 and bandwidth_Bps > 0")
        return cls(units, int(values["microbatch_size"]), int(values["seq_len"]), float(values["latency_s"]),
                   float(values["bandwidth_Bps"]), float(data.get("message_bytes_per_token", 4 * config.n_embd)),
                   data.get("memory_per_device"))

    def profiles(self, b: int) -> list[UnitProfile]:
        """The units for micro-batches of b sequences: times and activations scaled by b / microbatch_size."""
        r = b / self.microbatch_size
        return [dataclasses.replace(u, forward_s=u.forward_s * r, backward_s=u.backward_s * r,
                                    input_backward_s=u.input_backward_s * r,
                                    activation_bytes=round(u.activation_bytes * r)) for u in self.units]


def _update_seconds(config: GPTConfig, device: str, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Each unit's optimizer step with paci.optim.MuonAdamW (Muon on the model's hidden matrices,
    AdamW on the rest), as `paci train --optimizer muon` builds it; measured once, on throwaway units."""
    from paci.model import build_unit
    from paci.optim import MuonAdamW, hidden_matrices
    from paci.profiler import update_seconds

    units = [build_unit(config, i, seed=0).to(device) for i in range(num_units(config))]
    hidden = hidden_matrices(units)
    return [update_seconds(unit, torch.device(device), repeats, warmup, lambda params: MuonAdamW(params, hidden))
            for unit in units]


def divisors(n: int, most: int) -> list[int]:
    """The divisors of n up to `most`, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(d for d in {*small, *(n // d for d in small)} if d <= most)


def _candidate(name: str, num_ranks: int, m: int, b: int, chunks: int | None, recompute: bool,
               profiles: list[UnitProfile], outputs: Sequence[float], input_bytes: float, tokens: int,
               budget: float | None, latency: float, bandwidth: float, memo: dict) -> Candidate | None:
    """One configuration simulated, or None where the schedule does not take it (e.g. interleaving
    with m not a multiple of P)."""
    accum = m if name in ("paci", "2bw") else None
    key = ("memory", name, m, chunks)
    if key not in memo:
        try:
            memo[key] = stage_memory_model(name, num_ranks, m, accum, chunks)
        except ValueError:
            memo[key] = None
    if memo[key] is None:
        return None
    inflight, copies = memo[key]
    v = chunks or 1
    stages = v * num_ranks
    time = [u.forward_s * recompute + u.time_s for u in profiles]  # a recomputing backward re-runs the forward
    activation = [0.0 if recompute else float(u.activation_bytes) for u in profiles]  # inputs only: the simulator
    costs_for_split = UnitCosts(tuple(time), tuple(float(u.static_bytes) for u in profiles), tuple(activation),
                                tuple(float(u.param_bytes) for u in profiles))
    per_stage_budget = None if budget is None else budget / v  # a device's memory, shared by its chunks
    key = ("split", b, recompute, tuple(inflight), tuple(copies), per_stage_budget)
    if key not in memo:
        memo[key] = partition(costs_for_split, stages, inflight, copies, per_stage_budget, warn=False)  # fits: no
    split = memo[key]
    messages = [float(outputs[stop - 1]) for _, stop in split.ranges[:-1]] + [0.0]  # a stage's output (its gradient)
    costs = stage_costs(profiles, split.ranges, message_bytes=messages, latency=latency,
                        bandwidth=bandwidth)
    if recompute:
        costs = costs.recomputed(first_input_bytes=input_bytes)
    step_s, short, run = _steady_step(name, num_ranks, m, accum, chunks, costs)
    # Δ over the steady steps alone: the longer run's backwards less the shorter run's (its first
    # step has no update to be late for)
    drifts = [_minus(a.drift_histogram, b.drift_histogram) for a, b in zip(run.metrics.per_stage,
                                                                           short.metrics.per_stage)]
    backwards = [sum(h.values()) for h in drifts]
    late = [1 - h.get(0, 0) / n if n else 0.0 for h, n in zip(drifts, backwards)]
    mean_drift = sum(d * c for h in drifts for d, c in h.items()) / max(1, sum(backwards))
    bubble = run.metrics.steady_bubble_fraction
    peaks = tuple(float(p) for p in run.peak_bytes)
    return Candidate(name, m, b, chunks, recompute, split_spec(split.ranges), step_s,
                     m * b * tokens / step_s if step_s > 0 else math.inf,
                     run.metrics.bubble_fraction if bubble is None else bubble, peaks,
                     budget is None or max(peaks) <= budget,
                     max((s.weight_copies for s in run.metrics.per_stage), default=0),
                     run.metrics.max_drift, mean_drift, max(late, default=0.0))


def _minus(longer: dict[int, int], shorter: dict[int, int]) -> dict[int, int]:
    return {d: c - shorter.get(d, 0) for d, c in longer.items() if c > shorter.get(d, 0)}


def _steady_step(name: str, num_ranks: int, m: int, accum: int | None, chunks: int | None, costs: CostModel):
    """Seconds per optimizer step in the steady state: the makespans of two runs, n and 2n steps,
    differ by n steady steps (the fill and the drain cancel). Both simulations are returned."""
    n = max(2, math.ceil(4 * num_ranks / m))
    short, long = (simulate(schedules.build(name, num_ranks, m, steps, accum, chunks=chunks), costs)
                   for steps in (n, 2 * n))
    return (long.metrics.makespan - short.metrics.makespan) / n, short, long


def format_plan(result: Plan, top: int, preset: str, vocab_size: int | None = None,
                memory: str | None = None, source: str = PROFILED_HERE) -> list[str]:
    """The ranked table, the best synchronous and asynchronous candidates, and the line that runs the best."""
    from paci.report import format_table

    rows = []
    for rank, c in enumerate(result.candidates[:top], 1):
        rows.append({"rank": rank, "schedule": c.schedule + (f" v={c.chunks}" if c.chunks else ""),
                     "m": c.microbatches, "b": c.batch_size, "re": "yes" if c.recompute else "",
                     "step": 1e3 * c.step_s, "tok": c.tokens_per_s, "bubble": 100 * c.bubble,
                     "peak": format_bytes(max(c.peak_bytes)), "fits": "yes" if c.fits else "NO",
                     "copies": c.weight_copies, "dmax": c.max_drift, "dmean": c.mean_drift,
                     "late": c.late_share, "risk": c.risk})
    columns = [("rank", "#", "d"), ("schedule", "schedule", "s"), ("m", "m", "d"), ("b", "b", "d"),
               ("re", "recompute", "s"), ("step", "step ms", ".2f"), ("tok", "tokens/s", ",.0f"),
               ("bubble", "bubble %", ".1f"), ("peak", "peak/rank", "s"), ("fits", "fits", "s"),
               ("copies", "copies", "d"), ("dmax", "max Δ", "d"), ("dmean", "mean Δ", ".3f"),
               ("late", "late share", ".3f"), ("risk", "quality risk", "s")]
    budget = "no memory limit" if result.budget is None else f"budget {format_bytes(result.budget)} per device"
    lines = [f"{len(result.candidates)} candidates: P = {result.num_ranks}, {result.global_batch} sequences of "
             f"{result.seq_len} tokens per step, {budget}; the {min(top, len(result.candidates))} fastest:", "",
             format_table(rows, columns), ""]
    for label, synchronous, risk in (("synchronous", True, None), ("asynchronous", False, None),
                                     ("asynchronous at low risk", False, "low")):
        c = result.best_where(synchronous, risk)
        if c is None:
            lines.append(f"best {label}: none fits")
            continue
        lines.append(f"best {label}: {c.schedule} m={c.microbatches}{f' v={c.chunks}' if c.chunks else ''}"
                     f"{' recompute' if c.recompute else ''}, {1e3 * c.step_s:.2f} ms per step, quality risk "
                     f"{c.risk} ({c.risk_evidence})")
        runs = (c.command(preset, result.num_ranks, result.seq_len, vocab_size, memory, result.optimizer)
                if result.optimizer in ("muon", "adamw") else c.pipeline_call(result.num_ranks))  # a user's units
        lines.append(f"  {runs}")
    text = note(source)
    lines += ["", text[0].upper() + text[1:] + "."]
    return lines


RISK_COLOURS = {"none": "tab:blue", "low": "tab:green", "medium": "tab:olive", "high": "tab:orange",
                "very high": "tab:red"}


def plot_frontier(result: Plan, path: str) -> None:
    """Time per step against the largest peak bytes of a rank, every candidate a dot coloured by its
    quality risk (hollow where it does not fit the budget), the frontier of those that fit (no
    other is both faster and smaller) drawn as a line; a PNG written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from paci.files import atomic_write

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for risk, colour in RISK_COLOURS.items():
        for fits in (True, False):
            picked = [c for c in result.candidates if c.risk == risk and c.fits == fits]
            if picked:
                ax.scatter([max(c.peak_bytes) / 2**20 for c in picked], [1e3 * c.step_s for c in picked], s=22,
                           facecolors=colour if fits else "none", edgecolors=colour,
                           label=f"risk {risk}" if fits else None)
    frontier, best = [], math.inf
    for c in sorted((c for c in result.candidates if c.fits), key=lambda c: (max(c.peak_bytes), c.step_s)):
        if c.step_s < best:
            frontier.append(c)
            best = c.step_s
    ax.plot([max(c.peak_bytes) / 2**20 for c in frontier], [1e3 * c.step_s for c in frontier], color="black",
            lw=1, drawstyle="steps-post", label="frontier (fits)")
    for c in frontier:
        ax.annotate(f"{c.schedule} m={c.microbatches}" + (" rc" if c.recompute else ""),
                    (max(c.peak_bytes) / 2**20, 1e3 * c.step_s), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if result.budget is not None:
        ax.axvline(result.budget / 2**20, color="grey", ls="--", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak bytes of the fullest rank (MiB)")
    ax.set_ylabel("time per optimizer step (ms)")
    ax.set_title(f"paci plan: P = {result.num_ranks}, {result.global_batch} x {result.seq_len} tokens per step "
                 f"(hollow: over the budget)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
