"""`paci bench runtime --synthetic`: measure the runtime itself with sleeping stages, against the simulator.

Each rank runs the real Executor and DistTransport over the real schedule; only the compute is a
sleep of the configured length. Rank 0 gathers the traces and compares the measured makespan
with the simulator's prediction from the measured per-op means and link latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from paci import schedules
from paci.runtime.executor import Executor, gather_trace
from paci.runtime.launch import env_rank, init_distributed, rank_device
from paci.runtime.synthetic import SyntheticCosts, SyntheticStage
from paci.runtime.transport import DistTransport
from paci.sim import CostModel, simulate
from paci.trace import Trace


@dataclass(frozen=True)
class RuntimeBench:
    schedule: str
    num_stages: int
    num_microbatches: int
    num_steps: int
    accumulation: int | None
    costs: SyntheticCosts
    timeout_s: float = 60.0

    def build(self):
        return schedules.build(self.schedule, self.num_stages, self.num_microbatches, self.num_steps,
                               self.accumulation)


def run_bench_rank(bench: RuntimeBench) -> dict | None:
    """This rank's part; rank 0 returns the result."""
    info = env_rank()
    device = rank_device(info)
    if not dist.is_initialized():
        init_distributed(device, bench.timeout_s)
    if info.world_size != bench.num_stages:
        raise ValueError(f"{info.world_size} ranks for {bench.num_stages} stages; they must be equal")
    schedule = bench.build()
    stage = SyntheticStage(info.rank, bench.num_stages, bench.costs, device)
    shape = bench.costs.activation_shape
    transport = DistTransport(schedule, info.rank, lambda msg: (shape, torch.float32), device, bench.timeout_s)
    trace = Trace(schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.weight_policy,
                  kind="measured")
    executor = Executor(stage, schedule.actions(info.rank), transport, trace.stages[info.rank])
    dist.barrier()
    while not executor.done:
        executor.run_next()
    transport.flush()
    gathered = gather_trace(trace, info.rank, stage.versions)
    if gathered is None:
        return None
    trace, _ = gathered
    return summarize(schedule, trace)


def summarize(schedule, trace: Trace) -> dict:
    measured = trace.metrics()
    costs = CostModel.from_trace(trace)
    predicted = simulate(schedule, costs).metrics
    return {"schedule": schedule.name, "num_stages": schedule.num_stages,
            "num_microbatches": schedule.num_microbatches, "accumulation": schedule.accumulation,
            "measured_makespan_s": measured.makespan, "predicted_makespan_s": predicted.makespan,
            "makespan_ratio": measured.makespan / predicted.makespan,
            "throughput_mb_per_s": measured.throughput, "bubble_fraction": measured.bubble_fraction,
            "steady_bubble_fraction": measured.steady_bubble_fraction,
            "predicted_bubble_fraction": predicted.bubble_fraction, "link_latency_s": costs.latency,
            "mean_forward_s": sum(costs.forward) / len(costs.forward),
            "mean_backward_s": sum(costs.backward) / len(costs.backward)}
