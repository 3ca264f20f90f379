"""Non-finite values never reach the weights: the micro-batch is dropped on every stage, or the update skipped."""

import json
import math

import pytest
import torch
from dist_helpers import train_each

from cli_helpers import paci
from paci.checkpoint import latest, load_stage
from paci.config import load_config
from paci.ir import WeightPolicy
from paci.model import PRESETS, build_units
from paci.runtime.launch import spawn
from paci.runtime.stage import OptimizerSpec, Stage
from paci.train import train


def _config(tmp_path, name: str, stages: int, nproc: int = 1, schedule: str = "paci", limit: int = 20):
    return load_config(None, {
        "model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
        "pipeline": {"schedule": schedule, "stages": stages, "microbatches": 4, "nproc": nproc, "timeout_s": 30.0,
                     "split": "uniform"},
        "optim": {"lr": 1e-2},
        "train": {"steps": 4, "eval_every": 2, "eval_batches": 2, "out": str(tmp_path / name), "threads": 1,
                  "nonfinite_limit": limit}})


def _records(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tok_per_s")} for r in lines if not r.get("final")]


def _weights(run_dir) -> list[dict]:
    manifest = latest(run_dir)
    return [load_stage(manifest, s, torch.device("cpu"))["module"] for s in range(len(manifest["stages"]))]


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [2, 4])
def test_a_nan_microbatch_is_dropped_everywhere_and_training_goes_on(tmp_path, monkeypatch, stages):
    """NaN injected into stage 0's output of micro-batch 5 (and the last stage's of 10): the run
    finishes, both appear in metrics.jsonl, no parameter is ever non-finite, the loss still falls,
    and the multi-process run equals the single-process one bit for bit."""
    monkeypatch.setenv("PACI_INJECT_NAN", f"0:5,{stages - 1}:10")
    summary, _ = train(_config(tmp_path, "local", stages))
    assert spawn(train_each, [_config(tmp_path, "dist", stages, nproc=stages)], stages, threads=1) == 0
    records = _records(tmp_path / "local")
    assert [r.get("nonfinite_microbatches") for r in records if "loss" in r] == [None, 1, 1, None]  # mb 5, mb 10
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert summary["nonfinite_microbatches"] == 2 and summary["skipped_updates"] == [[]] * stages
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    for weights in _weights(tmp_path / "local"):
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert _records(tmp_path / "dist") == records
    for local, remote in zip(_weights(tmp_path / "local"), _weights(tmp_path / "dist")):
        assert all(torch.equal(local[k], remote[k]) for k in local)


def test_a_dropped_microbatch_contributes_nothing():
    """A stage that drops micro-batch 1 (NaN gradient from downstream) ends with exactly the weights
    of a stage that never saw it: the other micro-batches' sum, the same 1/K scale."""
    n = PRESETS["tiny"].n_embd
    xs, grads = [torch.randn(2, 8, n) for _ in range(3)], [torch.randn(2, 8, n) for _ in range(3)]
    grads[1] = torch.full((2, 8, n), math.nan)
    dropping, never = _stage(), _stage()
    for mb in range(3):
        dropping.forward(mb, xs[mb].clone())
    for mb in range(3):
        dropping.backward(mb, grads[mb])
    for mb in (0, 2):
        never.forward(mb, xs[mb].clone())
    for mb in (0, 2):
        never.backward(mb, grads[mb])
    dropping.step()
    never.step()
    assert dropping.dropped == [1]
    assert all(torch.equal(a, b) for a, b in zip(dropping.module.parameters(), never.module.parameters()))


def _stage(limit: int = 20) -> Stage:
    units = build_units(PRESETS["tiny"], 0, 1, 2)
    batch = lambda i: (torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))  # noqa: E731
    return Stage(1, 3, units, policy=WeightPolicy.LIVE, optim=OptimizerSpec(lr=1e-2, total_steps=10),
                 loss_scale=1.0, train_batch=batch, val_batch=batch, nonfinite_limit=limit)


def test_a_non_finite_gradient_skips_the_update_but_not_the_version():
    stage = _stage()
    before = {k: v.clone() for k, v in stage.module.state_dict().items()}
    x = torch.randn(2, 8, PRESETS["tiny"].n_embd)
    stage.forward(0, x)
    grad = torch.randn(2, 8, PRESETS["tiny"].n_embd)
    stage.backward(0, grad)
    next(iter(stage.module.parameters())).grad[0] = math.inf  # an overflow inside the stage
    stage.step()
    assert stage.version == 1 and stage.skipped == [1] and stage.scheduler.last_epoch == 1
    assert all(torch.equal(before[k], v) for k, v in stage.module.state_dict().items())
    assert all(p.grad is None for p in stage.module.parameters())


def test_a_nan_gradient_from_downstream_is_dropped_and_passed_on_as_nan():
    stage = _stage()
    x = torch.randn(2, 8, PRESETS["tiny"].n_embd)
    stage.forward(0, x)
    back = stage.backward(0, torch.full((2, 8, PRESETS["tiny"].n_embd), math.nan))
    assert torch.isnan(back).all() and stage.dropped == [0]
    assert all(p.grad is None for p in stage.module.parameters())


def test_too_many_non_finite_values_stop_the_run_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PACI_INJECT_NAN", "0:1,0:2,0:3")
    with pytest.raises(RuntimeError, match=r"dropped 3 micro-batches .* \(limit 2\); lower --lr"):
        train(_config(tmp_path, "run", 2, limit=2))


def test_the_cli_stops_a_run_that_keeps_failing_in_one_line(tmp_path):
    done = paci("train", "--preset", "tiny", "--stages", "2", "--steps", "2", "--split", "uniform",
                "--nonfinite-limit", "1", "--out", str(tmp_path / "run"), env={"PACI_INJECT_NAN": "1:0,1:1"})
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("paci:")]
    assert len(errors) == 1 and "limit 1" in errors[0] and "Traceback" not in done.stderr, done.stderr
