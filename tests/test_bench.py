"""`paci bench runtime --synthetic`: sleeping stages take per-stage costs, and a cost model feeds them.

Start here when a synthetic run sleeps the wrong time: `SyntheticCosts.at` is what every rank sleeps.
"""

import json
import subprocess
import sys

import pytest

from dist_helpers import bench_rank

from paci.bench import RuntimeBench, synthetic_costs
from paci.runtime.launch import spawn
from paci.runtime.synthetic import SyntheticCosts, StageTimes
from paci.schedules import build
from paci.sim import CostModel, simulate


def test_synthetic_costs_scalar_times_split_the_backward_in_halves():
    """One number per op applies to every stage; without W a split backward is I = W = B/2 (the old behaviour)."""
    costs = SyntheticCosts(0.02, 0.04, 0.001)
    assert costs.num_stages is None
    assert costs.at(0) == costs.at(7) == StageTimes(0.02, 0.04, 0.02, 0.02, 0.001)


def test_synthetic_costs_per_stage_times_with_weight_grad():
    """Per-stage tuples are picked by stage; I = B - W."""
    costs = SyntheticCosts((0.01, 0.02), (0.03, 0.05), 0.0, (4,), weight_s=(0.01, 0.02))
    assert costs.num_stages == 2
    assert costs.at(1) == StageTimes(0.02, 0.05, pytest.approx(0.03), 0.02, 0.0)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"forward_s": -1.0, "backward_s": 1.0}, ">= 0"),
    ({"forward_s": (1.0, 1.0), "backward_s": (1.0, 1.0, 1.0)}, "one per stage"),
    ({"forward_s": 1.0, "backward_s": 1.0, "weight_s": 2.0}, "must not exceed"),
])
def test_synthetic_costs_reject_bad_times(kwargs, fragment):
    """Negative times, ragged per-stage tuples and W > B are errors that say what is wrong."""
    with pytest.raises(ValueError, match=fragment):
        SyntheticCosts(**kwargs)


def test_bench_from_cost_model_sleeps_its_times_and_checks_depth():
    """A cost model's F, B, W, U become the stages' sleeps; a bench of another depth fails before spawning."""
    model = CostModel.per_stage(3, [0.001, 0.002, 0.003], 0.004, weight=0.001, update=0.0005)
    bench = RuntimeBench.from_cost_model("zb-h1", 4, 2, None, model, (2, 3))
    assert bench.num_stages == 3 and bench.planned == model
    assert bench.costs.at(2) == StageTimes(0.003, 0.004, pytest.approx(0.003), 0.001, 0.0005)
    assert synthetic_costs(model, (2, 3)).activation_shape == (2, 3)
    with pytest.raises(ValueError, match="costs are for 3 stages"):
        RuntimeBench("paci", 4, 4, 2, None, bench.costs).build()


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_bench_cli_with_costs_reports_the_cost_models_prediction(tmp_path):
    """A 2-rank run from a cost-model file reports measured and planned makespans; the run takes at least the plan."""
    model = CostModel.per_stage(2, [0.002, 0.003], 0.004, weight=0.001)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(model.as_dict()))
    done = subprocess.run([sys.executable, "-m", "paci", "bench", "runtime", "--synthetic", "--stages", "2",
                           "--microbatches", "4", "--steps", "2", "--schedule", "zb-h1", "--costs", str(path),
                           "--activation-mib", "0.01", "--json"], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["num_stages"] == 2 and result["schedule"] == "zb-h1"
    assert result["planned_makespan_s"] == pytest.approx(simulate(build("zb-h1", 2, 4, 2), model).metrics.makespan)
    assert result["planned_ratio"] >= 0.99  # sleeps never end early


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_interleaved_bench_runs_two_stages_per_rank_as_planned(tmp_path):
    """Interleaved 1F1B on 2 ranks x 2 sleeping stages (the messages loop from the last rank back to
    the first): the run takes what the cost model plans, to the sleeps' and the link's overhead."""
    model = CostModel.per_stage(4, 0.004, 0.008)
    bench = RuntimeBench.from_cost_model("interleaved-1f1b", 4, 3, None, model, (2, 3), chunks=2)
    assert bench.num_stages == 2 and bench.build().num_stages == 4
    out = tmp_path / "result.json"
    assert spawn(bench_rank, (bench, str(out)), 2, threads=1) == 0
    result = json.loads(out.read_text())
    planned = simulate(build("interleaved-1f1b", 2, 4, 3, chunks=2), model).metrics.makespan
    assert result["num_stages"] == 4 and result["planned_makespan_s"] == pytest.approx(planned)
    assert 0.99 <= result["planned_ratio"] < 1.5
