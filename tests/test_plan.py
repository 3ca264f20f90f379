"""`paci plan` / `paci.plan`: every candidate simulated, ranked, its memory checked against the budget,
its quality risk from the measured rule, and a winning line that `paci train` runs."""

import json
import math
import shlex
from pathlib import Path

import pytest

import paci
from paci.cli import main
from paci.model import PRESETS, num_units
from paci.planner import plan
from paci.profiler import UnitProfile
from paci.schedules import REGISTRY

TINY = PRESETS["tiny"]
F, B = 1e-3, 2e-3  # seconds per unit and sequence: every unit costs the same, so every split is balanced


def _profiles(b: int) -> list[UnitProfile]:
    """Synthetic unit profiles, linear in the micro-batch's b sequences."""
    return [UnitProfile(f"u{i}", F * b, B * b, static_bytes=100_000, activation_bytes=20_000 * b, param_bytes=25_000,
                        input_backward_s=B * b / 2) for i in range(num_units(TINY))]


@pytest.fixture(scope="module")
def tiny_plan():
    return plan("tiny", 2, 8, profiles=_profiles)


def test_every_schedule_and_m_is_a_candidate_and_the_times_are_the_closed_forms(tiny_plan):
    """m runs over the divisors of the global batch; on balanced stages with free links, 1F1B-flush
    and GPipe take (m + P - 1) micro-batch times per step and PACI m, its bubble gone."""
    found = {(c.schedule, c.microbatches, c.chunks, c.recompute) for c in tiny_plan.candidates}
    assert {c[0] for c in found} == set(REGISTRY) - {"interleaved-1f1b"} | {"interleaved-1f1b"}
    assert {c[1] for c in found if c[0] == "1f1b"} == {1, 2, 4, 8}
    P, units_per_stage = 2, num_units(TINY) // 2
    for c in tiny_plan.candidates:
        per_microbatch = units_per_stage * (F + B + F * c.recompute) * c.batch_size
        if c.schedule in ("1f1b", "gpipe") and c.chunks is None:
            assert c.step_s == pytest.approx((c.microbatches + P - 1) * per_microbatch, rel=1e-9), c
        if c.schedule == "paci":
            assert c.step_s == pytest.approx(c.microbatches * per_microbatch, rel=1e-9), c
            assert c.late_share == pytest.approx((P - 1) / c.microbatches)  # K = m: stage 0's share
            assert c.tokens_per_s == pytest.approx(8 * TINY.block_size / c.step_s)
    steps = [c.step_s for c in tiny_plan.candidates]
    assert steps == sorted(steps)  # no budget: every candidate fits, ranked by time alone


def test_the_risk_follows_the_late_share(tiny_plan):
    by = {(c.schedule, c.microbatches, c.recompute): c for c in tiny_plan.candidates if c.chunks is None}
    assert by[("1f1b", 4, False)].risk == "none" and by[("1f1b", 4, False)].synchronous
    assert by[("paci", 8, False)].risk == "low"  # 1/8 of stage 0's gradient late
    assert by[("paci", 2, False)].risk == "medium"  # 1/2
    assert by[("async-1f1b", 1, False)].risk == "high"  # every backward one update late, none two
    assert plan("tiny", 3, 8, profiles=_profiles, schedule_names=["paci"]).candidates[-1].risk == "very high"


def test_a_budget_ranks_what_fits_first_and_recompute_fits_where_storing_does_not(tiny_plan):
    """Peak bytes are the simulator's; with a budget between two candidates' peaks, everything that
    fits ranks before everything that does not, and recomputation (inputs only in flight) fits
    where storing the activations does not."""
    gpipe = next(c for c in tiny_plan.candidates if c.schedule == "gpipe" and c.microbatches == 8 and not c.recompute)
    recomputed = next(c for c in tiny_plan.candidates if c.schedule == "gpipe" and c.microbatches == 8 and c.recompute)
    assert max(recomputed.peak_bytes) < max(gpipe.peak_bytes)
    budget = (max(recomputed.peak_bytes) + max(gpipe.peak_bytes)) / 2
    ranked = plan("tiny", 2, 8, profiles=_profiles, budget=budget).candidates
    fits = [c.fits for c in ranked]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    assert all(c.fits == (max(c.peak_bytes) <= budget) for c in ranked)
    by = {(c.schedule, c.microbatches, c.recompute, c.chunks): c for c in ranked}
    assert not by[("gpipe", 8, False, None)].fits and by[("gpipe", 8, True, None)].fits


def test_the_command_line_plan_and_its_winning_line_runs(tmp_path, monkeypatch, capfd):
    """`paci plan --json` names the best synchronous and asynchronous candidates with the `paci train`
    line for each; the asynchronous one trains (2 steps) with the split and settings it names."""
    monkeypatch.setenv("PACI_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "--preset", "tiny", "--stages", "2", "--global-batch", "4", "--no-recompute",
                 "--threads", "1", "--json"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert {c["schedule"] for c in out["candidates"]} == set(REGISTRY)
    assert out["best_synchronous"]["max_drift"] == 0 and out["best_asynchronous"]["max_drift"] >= 1
    assert out["best_asynchronous_low_risk"]["risk"] == "low"
    assert not any(c["recompute"] for c in out["candidates"]) and "not a law" in out["note"]
    line = out["best_asynchronous"]["command"]
    assert line.startswith("paci train ") and f"--split {out['best_asynchronous']['split']}" in line
    args = shlex.split(line)[1:] + ["--steps", "2", "--threads", "1", "--out", str(tmp_path / "run"),
                                    "--no-plots", "--no-trace", "--no-checkpoint", "--eval-batches", "1"]
    assert main(args) == 0
    capfd.readouterr()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["schedule"] == out["best_asynchronous"]["schedule"] and summary["steps"] == 2
    assert main(["plan", "--preset", "tiny", "--stages", "2", "--global-batch", "4", "--top", "3"]) == 0
    text = capfd.readouterr().out
    assert "best synchronous:" in text and "best asynchronous:" in text and "not a law" in text
    assert "best asynchronous at low risk:" in text


def test_paci_plan_is_the_api():
    assert paci.plan is plan


def test_a_cost_file_plans_a_machine_not_at_hand(tmp_path, capfd):
    """--costs reads per-unit costs and the link from a file (no profiling): its times scale with the
    micro-batch, its link and budget apply, and the shipped GPT-2-medium file on 8 A100s plans."""
    path = tmp_path / "costs.json"
    units = [dict(vars(u)) for u in _profiles(2)]
    path.write_text(json.dumps({"microbatch_size": 2, "seq_len": 32, "units": units, "latency_s": 0.0,
                                "bandwidth_Bps": 1e30, "memory_per_device": "1GiB"}))
    assert main(["plan", "--preset", "tiny", "--stages", "2", "--global-batch", "8", "--costs", str(path),
                 "--json", "--plot", str(tmp_path / "frontier.png")]) == 0
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads(capfd.readouterr().out)
    assert out["budget_bytes"] == 2**30 and "costs.json" in out["note"]
    expected = {(c.schedule, c.microbatches, c.chunks, c.recompute): c.step_s for c in plan("tiny", 2, 8,
                                                                                           profiles=_profiles).candidates}
    for c in out["candidates"]:
        assert c["step_s"] == pytest.approx(expected[(c["schedule"], c["microbatches"], c["chunks"], c["recompute"])])
    shipped = str(Path(__file__).resolve().parents[1] / "configs" / "costs" / "gpt2-medium-8xa100.json")
    assert main(["plan", "--preset", "gpt2-medium", "--vocab-size", "50304", "--stages", "8", "--global-batch", "64",
                 "--costs", shipped, "--no-recompute", "--schedules", "1f1b,paci", "--top", "3"]) == 0
    text = capfd.readouterr().out
    assert "budget 80.00 GiB per device" in text and shipped in text and "best asynchronous:" in text


def test_the_runnable_line_names_a_non_default_optimizer():
    from paci.planner import format_plan

    lines = format_plan(plan("tiny", 2, 8, profiles=_profiles, optimizer="adamw"), 3, "tiny")
    runs = [line for line in lines if line.startswith("  paci train")]
    assert len(runs) == 3 and all("--optimizer adamw" in line for line in runs)
    assert not any("--optimizer" in line for line in format_plan(plan("tiny", 2, 8, profiles=_profiles), 3, "tiny"))


def test_a_users_units_are_planned_and_the_pipeline_call_runs():
    """paci.plan on a Pipeline's units: profiled with the user's loss and optimizer, the messages the
    units' measured outputs, no recompute candidates; the winning split builds a Pipeline that trains."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    units = [nn.Sequential(nn.Linear(16, 64), nn.Tanh()), nn.Sequential(nn.Linear(64, 64), nn.Tanh()),
             nn.Sequential(nn.Linear(64, 8), nn.Tanh()), nn.Linear(8, 1)]

    def batch(b):
        x = torch.randn(b, 16)
        return x, x.sum(dim=1, keepdim=True)

    result = paci.plan(units, 2, 16, loss_fn=nn.functional.mse_loss, batch=batch, schedule_names=["1f1b", "paci"])
    assert {c.schedule for c in result.candidates} == {"1f1b", "paci"} and not any(c.recompute for c in result.candidates)
    assert {c.microbatches for c in result.candidates} == {1, 2, 4, 8, 16}
    best = result.best_where(False)
    call = best.pipeline_call(2)
    assert call.startswith('paci.Pipeline(units, loss_fn, optimizer, schedule="paci", stages=2') and best.split in call
    pipe = paci.Pipeline(units, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.01), schedule="paci",
                         stages=2, microbatches=best.microbatches, split=best.split)
    losses = pipe.fit((batch(16) for _ in range(3)), steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    from paci.planner import format_plan

    assert f"  {call}" in format_plan(result, 3, "units")
    with pytest.raises(ValueError, match="needs loss_fn and batch"):
        paci.plan(units, 2, 16)
