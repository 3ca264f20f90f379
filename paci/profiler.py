"""The layer profiler: per partitionable unit, its time, static bytes and activation bytes.

Measured on the device the model will run on, for one micro-batch shape, as the partitioner
(`paci.partition`) needs them (the PACI paper's appendix, arXiv 2606.07881):

* forward_s / backward_s: medians of repeated runs after warm-up, autograd recording, backward
  with a random output gradient; the last unit includes the loss, because the last stage computes it.
* input_backward_s: the input gradient alone (autograd skips the weight-gradient kernels), what
  a split backward's I costs; B - I is the least its W can cost.
* update_s: one AdamW step over the unit's parameters, built as the runtime builds it.
* static_bytes: parameters + buffers + gradients + AdamW state, whose shapes and dtypes are read
  from a real optimizer step rather than assumed.
* activation_bytes: the distinct storages autograd saves during the unit's forward, found with
  `torch.autograd.graph.saved_tensors_hooks`, the unit's own parameters excluded.

Profiles are cached as JSON under <cache dir>/profiles/, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from paci.data import resolve_cache_dir
from paci.files import write_bytes
from paci.model import GPTConfig, autocast, build_unit, lm_loss, num_units, unit_names
from paci.partition import (SPLIT_SPECS, check_budget, check_stage_count, evaluate_split, parse_split, partition,
                            stage_memory_model, uniform_split)
from paci.runtime import payload
from paci.sim import CostModel

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 3  # part of the cache key: bump when what a profile measures changes
NOISE_LIMIT = 0.3  # rounds whose total time spreads more than this (IQR / median) make a profile untrustworthy


@dataclass(frozen=True)
class UnitProfile:
    name: str
    forward_s: float  # median forward time of one micro-batch, autograd recording (the last unit: + loss)
    backward_s: float  # median backward time (input and weight gradients) with a random output gradient
    static_bytes: int  # parameters + buffers + gradients + AdamW state, from a real optimizer step
    activation_bytes: int  # unique storages autograd saves for one micro-batch, parameters excluded
    param_bytes: int  # parameters + buffers: the size of one stashed weight copy
    input_backward_s: float = 0.0  # median time of the input gradient alone (0 for token-id inputs)
    update_s: float = 0.0  # median time of one AdamW step over the unit's parameters

    @property
    def time_s(self) -> float:
        return self.forward_s + self.backward_s


def profile_units(config: GPTConfig, batch_size: int, seq_len: int, device: torch.device | str,
                  precision: str = "fp32", repeats: int = 10, warmup: int = 2,
                  cache: bool = True) -> list[UnitProfile]:
    """Profile every unit of `config` for micro-batches of (batch_size, seq_len) tokens on `device`.

    Unit 0 gets token ids; unit i > 0 gets the activation the first i units produce. Times are
    medians of `repeats` rounds (each times every unit once) after `warmup`; torch's thread count
    is left as the caller set it. All units are resident at once, as in the unsplit model.
    With `cache`, the result is kept in <cache dir>/profiles/<key>.json, keyed by the model
    config, batch shape, device, precision (`model.autocast`), threads and torch version.
    """
    if batch_size < 1 or seq_len < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch_size, seq_len and repeats must be >= 1 and warmup >= 0, got "
                         f"{batch_size}, {seq_len}, {repeats}, {warmup}")
    if seq_len > config.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the model's block_size {config.block_size}; "
                         "use a shorter --seq-len")
    device = torch.device(device)
    check_memory(config, batch_size, seq_len, device)
    key = {"format": PROFILE_FORMAT, "model": dataclasses.asdict(config), "batch_size": batch_size,
           "seq_len": seq_len, "device": _device_label(device), "precision": precision,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats, "warmup": warmup}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = resolve_cache_dir() / "profiles" / f"{digest}.json"
    if cache and path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored["key"] == key and len(stored["units"]) == num_units(config):
                logger.debug("unit profile from cache %s", path)
                return [UnitProfile(**unit) for unit in stored["units"]]
        except (ValueError, KeyError, TypeError):
            pass
        logger.warning("ignoring unreadable profile cache %s; measuring again", path)
    logger.info("profiling %d units on %s (%s, micro-batch %dx%d, %d repeats)", num_units(config),
                _device_label(device), precision, batch_size, seq_len, repeats)
    profiles, spread = _measure(config, batch_size, seq_len, device, precision, repeats, warmup)
    if spread > NOISE_LIMIT:
        logger.warning("unit timings are noisy (round times spread %.0f%% around their median; is another "
                       "process using these cores?): the split may be off and the profile is not cached; "
                       "profile again on a quiet machine", 100 * spread)
    elif cache:
        payload = {"key": key, "units": [dataclasses.asdict(p) for p in profiles]}
        write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())
    return profiles


def _measure(config: GPTConfig, batch_size: int, seq_len: int, device: torch.device, precision: str,
             repeats: int, warmup: int) -> tuple[list[UnitProfile], float]:
    """The profiles, and the spread of the timing rounds (see `_time`)."""
    generator = torch.Generator().manual_seed(0)  # inputs and output gradients; the global RNG is untouched
    x = torch.randint(config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    targets = torch.randint(config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    units = [build_unit(config, index, seed=0).to(device) for index in range(num_units(config))]
    return _profile(units, unit_names(config), x, targets, lm_loss, _adamw, device, precision, repeats, warmup,
                    generator)


def profile_modules(units: Sequence[nn.Module], inputs: torch.Tensor, targets: torch.Tensor,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                    device: torch.device | str = "cpu", repeats: int = 10, warmup: int = 2) -> list[UnitProfile]:
    """Profile any model given as a list of units (paci.Pipeline's), on one micro-batch (`inputs`,
    `targets`), measured as `profile_units` measures the GPT's; the optimizer's state and step are
    `make_optimizer`'s (default AdamW). Copies are profiled: the user's weights stay as they are.
    Noisy timings are logged as a warning, as for the GPT."""
    import copy

    device = torch.device(device)
    copies = [copy.deepcopy(unit).to(device) for unit in units]
    names = [f"{i}:{type(unit).__name__}" for i, unit in enumerate(units)]
    profiles, spread = _profile(copies, names, payload.to(inputs, device), payload.to(targets, device), loss_fn,
                                make_optimizer or _adamw, device, "fp32", repeats, warmup, torch.Generator().manual_seed(0))
    if spread > NOISE_LIMIT:
        logger.warning("unit timings are noisy (round times spread %.0f%% around their median; is another process "
                       "using these cores?): the split may be off", 100 * spread)
    return profiles


def _adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, foreach=False)  # as the runtime builds it


def _profile(units: list[nn.Module], names: Sequence[str], x: torch.Tensor, targets: torch.Tensor, loss_fn,
             make_optimizer, device: torch.device, precision: str, repeats: int, warmup: int,
             generator: torch.Generator) -> tuple[list[UnitProfile], float]:
    """Unit i gets what units 0..i-1 make of `x`; the last unit's run includes the loss."""
    last = len(units) - 1
    inputs = []
    for index, unit in enumerate(units):
        if index > 0:  # a stage's received activation: leaves, the floating-point ones wanting their grad
            x = payload.as_leaf(payload.apply(x, torch.Tensor.detach))
        elif torch.is_tensor(x) and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        inputs.append(x)
        if index < last:
            with torch.no_grad(), autocast(precision, device):
                x = unit(x)
    runs = [_runner(unit, inputs[i], targets if i == last else None, precision, loss_fn, device)
            for i, unit in enumerate(units)]
    activation = [saved_activation_bytes(run, exclude=[*unit.parameters(), *unit.buffers()])
                  for unit, run in zip(units, runs)]
    times, spread = _time(runs, inputs, device, repeats, warmup, generator)
    # the optimizer steps below change the units' weights: they are throwaway units or copies
    static = [static_bytes(unit, run, make_optimizer) for unit, run in zip(units, runs)]
    updates = [update_seconds(unit, device, repeats, warmup, make_optimizer) for unit in units]
    return [UnitProfile(name, forward_s, backward_s, static_total, saved, weights, input_s, update_s)
            for name, (forward_s, backward_s, input_s), (weights, static_total), saved, update_s
            in zip(names, times, static, activation, updates)], spread


def _runner(unit: nn.Module, x: payload.Payload, targets: torch.Tensor | None, precision: str,
            loss_fn=lm_loss, device: torch.device | None = None) -> Callable[[], payload.Payload]:
    """The unit's forward as a stage runs it, under its precision: the last unit also computes the loss."""
    device = device or x.device

    def run() -> payload.Payload:
        with autocast(precision, device):
            output = unit(x)
            return output if targets is None else loss_fn(output, targets)

    return run


def saved_activation_bytes(run: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph.

    A storage saved twice (or through several views) counts once, at its full size (a view keeps
    its whole storage alive); storages of the tensors in `exclude` (the parameters) do not count.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()  # kept alive until counted, so no saved storage is freed and its address reused
    del output
    return sum(storages.values())


def static_bytes(unit: nn.Module, run: Callable[[], torch.Tensor], make_optimizer=_adamw) -> tuple[int, int]:
    """(parameter + buffer bytes, those + gradients + optimizer state), after one real step.

    The optimizer is built as the runtime builds it (AdamW, foreach=False, unless `make_optimizer`
    says otherwise); its state's shapes and dtypes are read back, not assumed. The step changes the
    unit's weights: profile a throwaway unit.
    """
    params = [p for p in unit.parameters() if p.requires_grad]
    weights = sum(t.nbytes for t in (*unit.parameters(), *unit.buffers()))
    if not params:
        return weights, weights
    optimizer = make_optimizer(params)
    output = run()
    payload.backprop(output, _grads_like(output, torch.ones_like))
    optimizer.step()
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return weights, weights + grads + state


def update_seconds(unit: nn.Module, device: torch.device, repeats: int, warmup: int, make_optimizer=_adamw) -> float:
    """Median time of one optimizer step (AdamW, foreach=False, as the runtime builds it, unless
    `make_optimizer` says otherwise) over the unit's parameters, with gradients present; on a
    throwaway unit, since the steps change its weights."""
    params = [p for p in unit.parameters() if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = make_optimizer(params)
    samples = []
    for i in range(max(warmup, 1) + repeats):
        _sync(device)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        if i >= max(warmup, 1):
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _time(runs: Sequence[Callable[[], torch.Tensor]], inputs: Sequence[torch.Tensor], device: torch.device,
          repeats: int, warmup: int, generator: torch.Generator) -> tuple[list[tuple[float, float, float]], float]:
    """Per unit, median forward, backward and input-backward seconds over `repeats` rounds after
    `warmup` (at least one); and the spread of the rounds' total times (forward + backward),
    (q3 - q1) / median, 0 with under 4 rounds.

    A round times every unit once, in model order, so a burst of load from elsewhere on the
    machine lands on all units alike instead of on whichever unit was being timed; and, as in a
    stage, a unit runs with the other units' data in the caches, not its own from the run before.
    """
    grad_outputs: list[torch.Tensor | None] = [None] * len(runs)
    samples: list[tuple[list[float], list[float], list[float]]] = [([], [], []) for _ in runs]
    for i in range(max(warmup, 1) + repeats):
        for index, (run, x) in enumerate(zip(runs, inputs)):
            _sync(device)
            t0 = time.perf_counter()
            output = run()
            _sync(device)
            t1 = time.perf_counter()
            if grad_outputs[index] is None:  # the first (warm-up) round fixes the output's shape
                grad_outputs[index] = _grads_like(output, lambda t: torch.ones_like(t) if t.dim() == 0 else
                                                  torch.randn(t.shape, generator=generator).to(t.device, t.dtype))
            payload.backprop(output, grad_outputs[index])
            _sync(device)
            t2 = time.perf_counter()
            wanting = [leaf for leaf in payload.leaves(x) if leaf.requires_grad]
            for leaf in wanting:
                leaf.grad = None
            input_s = 0.0
            if wanting:  # the input gradient alone, on a fresh graph
                output = run()
                _sync(device)
                t3 = time.perf_counter()
                outs, grads = payload.pairs(output, grad_outputs[index])
                torch.autograd.grad(outs, wanting, grads, allow_unused=True)
                _sync(device)
                input_s = time.perf_counter() - t3
            del output
            if i >= max(warmup, 1):
                samples[index][0].append(t1 - t0)
                samples[index][1].append(t2 - t1)
                samples[index][2].append(input_s)
    rounds = [sum(f[r] + b[r] for f, b, _ in samples) for r in range(repeats)]  # one round's total time
    q1, median, q3 = statistics.quantiles(rounds, n=4) if len(rounds) >= 4 else (0.0, 1.0, 0.0)
    return ([(statistics.median(f), statistics.median(b), statistics.median(i)) for f, b, i in samples],
            max(0.0, (q3 - q1) / median))


def _grads_like(output: payload.Payload, make: Callable[[torch.Tensor], torch.Tensor]) -> payload.Payload:
    """A backward message for `output`: `make(leaf)` for each floating-point leaf."""
    if torch.is_tensor(output):
        return make(output)
    return tuple(make(leaf) for leaf in payload.float_leaves(output))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(getattr(torch, device.type, None), "synchronize"):
        getattr(torch, device.type).synchronize()


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def check_memory(config: GPTConfig, batch_size: int, seq_len: int, device: torch.device | str) -> None:
    """Refuse, before anything is allocated, a model and micro-batch whose fp32 weights and logits
    alone exceed the device's memory (this machine's RAM on CPU). Both are a lower bound of what a
    forward and backward hold, so nothing that fits is refused; a 10**9-token micro-batch is."""
    c = config
    weights = 4 * (c.vocab_size * c.n_embd + c.block_size * c.n_embd + 12 * c.n_layer * c.n_embd ** 2)
    logits = 2 * batch_size * seq_len * c.vocab_size  # at least bf16
    device = torch.device(device)
    total = device_memory(device)
    where = "this machine" if device.type == "cpu" else _device_label(device)
    if total is not None and weights + logits > total:
        raise ValueError(f"a micro-batch of {batch_size:,} x {seq_len:,} tokens needs at least "
                         f"{(weights + logits) / 2**30:,.1f} GiB for the model's weights and logits alone, more than "
                         f"the {total / 2**30:,.1f} GiB of {where}: use fewer sequences per micro-batch or shorter ones")


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or of this machine for the CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else None
    except (ValueError, OSError, AttributeError):
        return None


def default_budget(device: torch.device | str) -> int | None:
    """The paper's default budget: the device's total memory on CUDA; None (no limit) elsewhere."""
    device = torch.device(device)
    return device_memory(device) if device.type == "cuda" else None


def stage_costs(profiles: Sequence[UnitProfile], ranges: Sequence[tuple[int, int]], *,
                message_bytes: Sequence[float] | float = 0.0, latency: float = 0.0,
                bandwidth: float = math.inf) -> CostModel:
    """The simulator's cost model (seconds, bytes) of a split, from the profiles of its units.

    Per stage, the sums over its units: F = forward, B = backward, I = input_backward and so
    W = B - I (a split backward that re-walks nothing; stage 0, with no input gradient, has I = 0
    and W = B), U = update; static, activation and weight
    bytes likewise. `message_bytes[s]` is the size of stage s's output; a message takes
    latency + bytes / bandwidth (measure them on the link the run will use).
    """
    def sums(field: str) -> list[float]:
        return [sum(getattr(p, field) for p in profiles[start:stop]) for start, stop in ranges]

    backward, input_backward = sums("backward_s"), sums("input_backward_s")
    input_backward[0] = 0.0  # stage 0 takes no input gradient: its W is the whole backward (Stage.backward_input)
    costs = CostModel.per_stage(len(ranges), sums("forward_s"), backward,
                                [max(0.0, b - i) for b, i in zip(backward, input_backward)], sums("update_s"),
                                latency=latency, bandwidth=bandwidth, message_bytes=message_bytes,
                                static_bytes=sums("static_bytes"), activation_bytes=sums("activation_bytes"),
                                weight_bytes=sums("param_bytes"))
    return dataclasses.replace(costs, time_unit="s")


def choose_split(spec: str, config: GPTConfig, num_stages: int, schedule_name: str, microbatches: int,
                 accum: int | None, batch_size: int, seq_len: int, device: torch.device | str,
                 budget: float | None = None, precision: str = "fp32", chunks: int | None = None
                 ) -> list[tuple[int, int]]:
    """The split `paci train` uses: "profile" (measure the units here, then `partition`), "uniform",
    or an explicit "0:5,5:9,..." list, of `num_stages` stages (with `chunks`, an interleaved
    schedule's chunks x ranks: the budget of a device is then shared by its chunks). `budget` None
    means the device's total memory on CUDA and no limit elsewhere. Profiling uses torch's current
    thread count: set it first."""
    n = num_units(config)
    if spec not in SPLIT_SPECS:
        return parse_split(spec, n, num_stages)
    if spec == "uniform":
        return uniform_split(n, num_stages)
    check_stage_count(n, num_stages)
    check_budget(budget)
    budget = default_budget(device) if budget is None else budget
    ranks = num_stages // (chunks or 1)
    if chunks and budget is not None:  # a device's memory, shared by its chunks
        budget /= chunks
    inflight, copies = stage_memory_model(schedule_name, ranks, microbatches, accum, chunks)  # checks the schedule
    profiles = profile_units(config, batch_size, seq_len, device, precision)
    split = partition(profiles, num_stages, inflight, copies, budget)
    uniform = evaluate_split(profiles, uniform_split(n, num_stages), inflight, copies, budget)
    logger.info("profiled split %s: slowest stage %d at %.2f ms fwd+bwd per micro-batch (uniform %s: %.2f ms); "
                "it rests on this machine's timings, so pin it for reproducible runs: --split %s, or --split RUN_DIR "
                "to reuse a run's", split.spec, split.bottleneck, 1e3 * split.max_time, uniform.spec,
                1e3 * uniform.max_time, split.spec)
    return list(split.ranges)
