"""`paci bench runtime --synthetic`: measure the runtime itself with sleeping stages, against the simulator.

Each rank runs the real Executor and DistTransport over the real schedule; only the compute is a
sleep of the configured length. Rank 0 gathers the traces and compares the measured makespan
with the simulator's prediction from the measured per-op means and link latency. When the sleeps
come from a cost model (e.g. a real model's profiled per-stage costs, `synthetic_costs`), it also
reports that model's prediction: what the simulator said before anything ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from paci import schedules
from paci.runtime import mesh
from paci.runtime.executor import Executor, gather_trace
from paci.runtime.launch import check_nproc
from paci.runtime.mesh import env_rank, rank_device
from paci.runtime.synthetic import SyntheticCosts, SyntheticStage
from paci.runtime.transport import DistTransport
from paci.sim import CostModel, check_size, simulate
from paci.trace import Trace


def synthetic_costs(costs: CostModel, activation_shape: Sequence[int]) -> SyntheticCosts:
    """Sleeping stages whose F, B, W (so I = B - W) and U take a cost model's per-stage times, read as seconds."""
    return SyntheticCosts(costs.forward, costs.backward, costs.update, tuple(activation_shape), costs.weight)


@dataclass(frozen=True)
class RuntimeBench:
    schedule: str
    num_stages: int
    num_microbatches: int
    num_steps: int
    accumulation: int | None
    costs: SyntheticCosts
    timeout_s: float = 60.0
    planned: CostModel | None = None  # the cost model the sleeps came from: its prediction is reported too
    chunks: int | None = None  # interleaved-1f1b: stages per rank (num_stages counts ranks)

    @classmethod
    def from_cost_model(cls, schedule: str, num_microbatches: int, num_steps: int, accumulation: int | None,
                        costs: CostModel, activation_shape: Sequence[int], timeout_s: float = 60.0,
                        chunks: int | None = None) -> RuntimeBench:
        """A bench at the cost model's depth (its stages over ranks of `chunks` stages each, if given)
        whose stages sleep its per-stage times."""
        return cls(schedule, costs.num_stages // (chunks or 1), num_microbatches, num_steps, accumulation,
                   synthetic_costs(costs, activation_shape), timeout_s, costs, chunks)

    def build(self):
        """The schedule; ValueError for bad sizes or costs for another depth, before any process starts."""
        schedule = schedules.build(self.schedule, self.num_stages, self.num_microbatches, self.num_steps,
                                   self.accumulation, chunks=self.chunks)
        for stages in (self.costs.num_stages, self.planned and self.planned.num_stages):
            if stages not in (None, schedule.num_stages):
                raise ValueError(f"the costs are for {stages} stages, the bench has {schedule.num_stages}; "
                                 "give one time per stage")
        check_nproc(self.num_stages)
        check_size(schedule)  # the trace it records is simulated at the end
        return schedule


def run_bench_rank(bench: RuntimeBench) -> dict | None:
    """This rank's part; rank 0 returns the result."""
    info = env_rank()
    device = rank_device(info)
    mesh.join(device, bench.timeout_s)
    if info.world_size != bench.num_stages:
        raise ValueError(f"{info.world_size} ranks for {bench.num_stages} stages; they must be equal")
    schedule = bench.build()
    stages = [SyntheticStage(s, schedule.num_stages, bench.costs, device)
              for s in schedule.stages_of(info.rank)]
    shape = bench.costs.activation_shape
    transport = DistTransport(schedule, info.rank, lambda msg: (shape, torch.float32), device, bench.timeout_s)
    trace = Trace(schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.weight_policy,
                  kind="measured", num_ranks=schedule.num_ranks)
    executor = Executor(stages, schedule.rank_actions(info.rank), transport, trace)
    mesh.barrier()
    while not executor.done:
        executor.run_next()
    transport.flush()
    gathered = gather_trace(trace, [stage.index for stage in stages])
    if gathered is None:
        return None
    trace, _ = gathered
    return summarize(schedule, trace, bench.planned)


def summarize(schedule, trace: Trace, planned: CostModel | None = None) -> dict:
    """Measured makespan, throughput and bubble beside the simulator's prediction from the
    measured op means (and, with `planned`, from the cost model the run was set up with)."""
    measured = trace.metrics()
    costs = CostModel.from_trace(trace)
    predicted = simulate(schedule, costs).metrics
    result = {"schedule": schedule.name, "num_stages": schedule.num_stages,
            "num_microbatches": schedule.num_microbatches, "accumulation": schedule.accumulation,
            "measured_makespan_s": measured.makespan, "predicted_makespan_s": predicted.makespan,
            "makespan_ratio": measured.makespan / predicted.makespan,
            "throughput_mb_per_s": measured.throughput, "bubble_fraction": measured.bubble_fraction,
            "steady_bubble_fraction": measured.steady_bubble_fraction,
            "predicted_bubble_fraction": predicted.bubble_fraction, "link_latency_s": costs.latency,
            "mean_forward_s": sum(costs.forward) / len(costs.forward),
            "mean_backward_s": sum(costs.backward) / len(costs.backward)}
    if planned is not None:
        plan = simulate(schedule, planned).metrics
        result.update(planned_makespan_s=plan.makespan, planned_throughput_mb_per_s=plan.throughput,
                      planned_ratio=measured.makespan / plan.makespan)
    return result
