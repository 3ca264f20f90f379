"""The profiler and the memory-aware partitioner: exactness, memory model, measured bytes, CLI."""

import dataclasses
import itertools
import json
import logging
import random

import pytest
import torch

from paci.cli import main
from paci.model import PRESETS, GPT, build_unit, lm_loss, num_units
from paci.checks import parse_bytes
from paci.partition import (UnitCosts, parse_split, partition, predicted_efficiency, stage_memory_model,
                            uniform_split)
from paci.profiler import choose_split, profile_units, saved_activation_bytes, static_bytes

TINY = PRESETS["tiny"]
B, T = 2, 32  # the micro-batch the byte tests profile


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Profiles go to a per-test cache, never to ~/.cache/paci."""
    monkeypatch.setenv("PACI_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_profiles():
    return profile_units(TINY, B, T, "cpu", repeats=1, warmup=1, cache=False)


# ----------------------------------------------------------------------------------------------
# The DP against brute force


def _brute_force(costs: UnitCosts, num_stages, inflight, copies, budget):
    """Every contiguous split, ranked by (max overshoot, max time, Σ time², boundaries), from plain sums."""
    L = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, L), num_stages - 1):
        bounds = (0, *cuts, L)
        ranges = list(zip(bounds[:-1], bounds[1:]))
        times = [sum(costs.time[a:b]) for a, b in ranges]
        mem = [sum(costs.static[a:b]) + inflight[j] * sum(costs.activation[a:b]) + copies[j] * sum(costs.weight[a:b])
               for j, (a, b) in enumerate(ranges)]
        over = 0 if budget is None else max(max(0, m - budget) for m in mem)
        key = (over, max(times), sum(t * t for t in times), bounds)
        best = key if best is None or key < best else best
    return best


def _random_instance(rng: random.Random, integer: bool = True):
    L = rng.randint(1, 12)
    P = rng.randint(1, min(4, L))
    draw = (lambda hi: float(rng.randint(0, hi))) if integer else (lambda hi: rng.uniform(0, hi))
    costs = UnitCosts(*(tuple(draw(hi) for _ in range(L)) for hi in (9, 20, 20, 5)))
    inflight = [rng.randint(0, 6) for _ in range(P)]
    copies = [rng.randint(0, 3) for _ in range(P)]
    return costs, P, inflight, copies


def _boundaries(split):
    return (0, *(b for _, b in split.ranges))


def _squares(split):
    return sum(t * t for t in split.stage_time)


def test_partition_equals_brute_force_time_objective():
    """With no budget or a budget some split meets, the DP returns brute force's fastest, then most even split."""
    rng = random.Random(0)
    constrained = 0
    for _ in range(400):
        costs, P, inflight, copies = _random_instance(rng)
        free = _brute_force(costs, P, inflight, copies, None)
        budget = rng.choice([None, float(rng.randint(1, 150))])
        over, max_time, squares, bounds = _brute_force(costs, P, inflight, copies, budget)
        if over > 0:
            continue
        constrained += budget is not None and max_time > free[1]
        split = partition(costs, P, inflight, copies, budget)
        assert split.feasible and (split.max_time, _squares(split), _boundaries(split)) == (max_time, squares, bounds)
    assert constrained >= 10  # the budget really did bind in a good share of the instances


def test_partition_equals_brute_force_infeasible_fallback():
    """When no split fits, the DP returns brute force's split minimising (max overshoot, max time, Σ time²)."""
    rng = random.Random(1)
    checked = 0
    for _ in range(400):
        costs, P, inflight, copies = _random_instance(rng)
        budget = float(rng.randint(1, 40))
        over, max_time, squares, bounds = _brute_force(costs, P, inflight, copies, budget)
        if over == 0:
            continue
        split = partition(costs, P, inflight, copies, budget)
        checked += 1
        assert not split.feasible
        assert (max(split.overshoot), split.max_time, _squares(split), _boundaries(split)) == \
            (over, max_time, squares, bounds)
    assert checked >= 50


def test_partition_objective_equals_brute_force_on_real_valued_costs():
    """With real-valued costs (no exact ties), the DP's (overshoot, time) equals brute force's optimum."""
    rng = random.Random(2)
    for _ in range(200):
        costs, P, inflight, copies = _random_instance(rng, integer=False)
        budget = rng.choice([None, rng.uniform(5, 120)])
        over, max_time, _, _ = _brute_force(costs, P, inflight, copies, budget)
        split = partition(costs, P, inflight, copies, budget)
        assert max(split.overshoot) == pytest.approx(over, abs=1e-9)
        assert split.max_time == pytest.approx(max_time, rel=1e-12)


def test_partition_prefers_the_most_even_of_equally_fast_splits():
    """When the bottleneck is fixed (one heavy unit), the other stages are balanced, not packed up to it."""
    costs = UnitCosts(time=(1.0, 1.0, 1.0, 1.0, 4.0), static=(0.0,) * 5, activation=(0.0,) * 5, weight=(0.0,) * 5)
    split = partition(costs, 3, [3, 2, 1], [0, 0, 0])
    assert split.max_time == 4.0 and split.ranges == ((0, 2), (2, 4), (4, 5))


def test_partition_budget_forces_a_different_split():
    """A budget the fastest split exceeds moves units off the stage with the most in-flight micro-batches."""
    costs = UnitCosts(time=(1.0, 1.0, 1.0, 3.0), static=(0.0,) * 4, activation=(10.0, 10.0, 10.0, 0.0),
                      weight=(0.0,) * 4)
    inflight, copies = [2, 1], [0, 0]
    free = partition(costs, 2, inflight, copies)
    tight = partition(costs, 2, inflight, copies, budget=45.0)
    assert free.ranges == ((0, 3), (3, 4)) and free.stage_bytes[0] == 60.0
    assert tight.ranges == ((0, 2), (2, 4)) and tight.feasible and tight.max_time == 4.0


def test_partition_infeasible_budget_warns_with_stage_and_overshoot(caplog):
    """A budget no split meets is a warning naming the worst stage and the budget that would fit."""
    costs = UnitCosts(time=(1.0, 1.0), static=(100.0, 10.0), activation=(0.0, 0.0), weight=(0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="paci.partition"):
        split = partition(costs, 2, [2, 1], [0, 0], budget=50.0)
    assert not split.feasible and split.overshoot_stage == 0 and max(split.overshoot) == 50.0
    assert "stage 0" in caplog.text and "overshoots by 50 B" in caplog.text and "needs 100 B" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"num_stages": 7}, "only 6 units"),
    ({"num_stages": 0}, "--stages must be >= 1"),
    ({"budget": 0.0}, "positive number of bytes"),
    ({"budget": -1.0}, "positive number of bytes"),
    ({"inflight": [1]}, "one in-flight count"),
])
def test_partition_rejects_bad_input(kwargs, message):
    """More stages than units, a non-positive budget or a wrong-length memory model is a ValueError."""
    costs = UnitCosts(*((1.0,) * 6,) * 4)
    args = {"num_stages": 2, "inflight": [2, 1], "copies": [0, 0], "budget": None, **kwargs}
    if args["num_stages"] != 2 and "inflight" not in kwargs:
        args["inflight"] = args["copies"] = [1] * max(args["num_stages"], 0)
    with pytest.raises(ValueError, match=message):
        partition(costs, **args)


# ----------------------------------------------------------------------------------------------
# The memory model comes from the simulator


@pytest.mark.parametrize("P", [2, 3, 4, 5])
def test_stage_memory_model_matches_closed_forms(P):
    """1F1B/PACI hold P−j (1F1B: at most m), GPipe m, PipeDream P−1−j copies, 2BW at most one."""
    closed = [P - j for j in range(P)]
    for m in (P, 2 * P):
        assert stage_memory_model("paci", P, m) == (closed, [0] * P)
        assert stage_memory_model("async-1f1b", P, m) == (closed, [0] * P)
        assert stage_memory_model("1f1b", P, m) == (closed, [0] * P)
        assert stage_memory_model("gpipe", P, m) == ([m] * P, [0] * P)
        assert stage_memory_model("pipedream", P, m) == (closed, [c - 1 for c in closed])
        inflight, copies = stage_memory_model("2bw", P, m)
        assert inflight == closed and max(copies) == 1 and copies[-1] == 0
    assert stage_memory_model("1f1b", P, 1)[0] == [1] * P  # one micro-batch per flush: never more


def test_predicted_efficiency_is_one_when_balanced_and_lower_when_not():
    """A balanced PACI pipe has no bubble; doubling one stage's cost leaves the others idle a third of the time."""
    assert predicted_efficiency([1.0, 1.0], [2.0, 2.0], "paci", 8) == pytest.approx(1.0)
    assert predicted_efficiency([1.0, 2.0], [2.0, 4.0], "paci", 8) == pytest.approx(0.75, abs=0.02)


# ----------------------------------------------------------------------------------------------
# What the profiler measures


def _hand_count(index: int) -> int:
    """Bytes autograd saves for one tiny micro-batch (B, T), fp32, by reading the unit's code.

    embed: token ids (B,T) and positions (T), int64. attention half: ln_1 input, mean, rstd;
    c_attn input; the (B,T,3C) qkv buffer SDPA saves as q, k, v; SDPA's output (its (B,T,nh,hs)
    layout makes `transpose(1,2).contiguous()` a no-op, so c_proj's input is the same storage) and
    its logsumexp (B,nh,T). MLP half: ln_2 input, mean, rstd; c_fc input; GELU input (B,T,4C);
    c_proj input (B,T,4C). head + loss: ln_f input, mean, rstd; lm_head input; log-softmax (B·T,V);
    targets (int64) and nll's scalar total weight.
    """
    C, V, nh, BT = TINY.n_embd, TINY.vocab_size, TINY.n_head, B * T
    if index == 0:
        return 8 * BT + 8 * T
    if index == num_units(TINY) - 1:
        return 4 * (2 * BT * C + 2 * BT + BT * V) + 8 * BT + 4
    if index % 2 == 1:
        return 4 * (6 * BT * C + 2 * BT + B * nh * T)
    return 4 * (10 * BT * C + 2 * BT)


def test_profile_activation_bytes_within_10_percent_of_hand_count(tiny_profiles):
    """Each unit's measured a_l is within 10% of the bytes its code saves for backward."""
    for index, profile in enumerate(tiny_profiles):
        assert profile.activation_bytes == pytest.approx(_hand_count(index), rel=0.10), profile.name


def test_profile_activation_bytes_sum_to_whole_model_saved_bytes(tiny_profiles):
    """Σ a_l over units equals the distinct storages the whole model's graph holds (read from grad_fn)."""
    model = GPT(TINY, seed=0)
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(TINY.vocab_size, (B, T), generator=g) for _ in range(2))
    loss = lm_loss(model(idx), targets)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in (a for a in dir(node) if a.startswith("_saved_")):
            value = getattr(node, name)
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in params:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    assert sum(p.activation_bytes for p in tiny_profiles) == pytest.approx(sum(storages.values()), rel=0.01)


def test_saved_activation_bytes_counts_a_shared_storage_once():
    """A tensor saved by two ops, or through two views, counts once; excluded tensors not at all."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_activation_bytes(lambda: (x * x.t().t()).sum(), exclude=[w]) == x.nbytes
    assert saved_activation_bytes(lambda: (x @ w).sum(), exclude=[w]) == x.nbytes


def test_static_bytes_exact_for_an_mlp_unit():
    """s_l = weights + grads + exp_avg + exp_avg_sq (fp32 each) + one fp32 step counter per tensor."""
    unit = build_unit(TINY, 2, seed=0)
    x = torch.randn(B, T, TINY.n_embd, requires_grad=True)
    numel = sum(p.numel() for p in unit.parameters())
    tensors = len(list(unit.parameters()))
    weights, static = static_bytes(unit, lambda: unit(x))
    assert weights == 4 * numel
    assert static == 4 * 4 * numel + 4 * tensors


def test_profile_units_cached_by_key(monkeypatch, tmp_path):
    """A second profile with the same key is read back from the cache; a new batch shape is measured."""
    first = profile_units(TINY, B, T, "cpu", repeats=1, warmup=0)
    assert len(list((tmp_path / "cache" / "profiles").glob("*.json"))) == 1

    def fail(*args):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("paci.profiler._measure", fail)
    assert profile_units(TINY, B, T, "cpu", repeats=1, warmup=0) == first
    with pytest.raises(AssertionError, match="measured again"):
        profile_units(TINY, B + 1, T, "cpu", repeats=1, warmup=0)


def test_profile_units_noisy_timings_warn_and_are_not_cached(monkeypatch, tmp_path, tiny_profiles, caplog):
    """Rounds whose times spread widely (a busy machine) give a warning, and the profile is not cached."""
    monkeypatch.setattr("paci.profiler._measure", lambda *args: (tiny_profiles, 0.9))
    with caplog.at_level(logging.WARNING, logger="paci.profiler"):
        assert profile_units(TINY, B, T, "cpu", repeats=1, warmup=0) == tiny_profiles
    assert "noisy" in caplog.text and not (tmp_path / "cache" / "profiles").exists()


# ----------------------------------------------------------------------------------------------
# Splits from text, the train entry point, sizes


def test_uniform_split_sizes_differ_by_at_most_one():
    """Uniform ranges are contiguous, cover all units, and earlier stages take the extra unit."""
    assert uniform_split(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    for n, p in itertools.product(range(1, 13), range(1, 5)):
        if p <= n:
            sizes = [b - a for a, b in uniform_split(n, p)]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("text, message", [
    ("0:3,4:6", "stage 1 starts at unit 4 but must start at 3"),
    ("0:3", "1 ranges for 2 stages"),
    ("0:3,3:5", "ends at unit 5 but the model has 6 units"),
    ("0:3,3:3", "has 3 ranges|is empty"),
    ("0-3,3:6", "not START:STOP"),
    ("0:4,4:2", "is empty"),
])
def test_parse_split_rejects_bad_lists_with_a_fix(text, message):
    """A split that is not contiguous, complete and one-range-per-stage names the problem and an example."""
    with pytest.raises(ValueError, match=message) as info:
        parse_split(text, 6, 2)
    assert "--split 0:3,3:6" in str(info.value)


def test_parse_split_reads_a_valid_list():
    """`0:5,5:9,9:12` reads as [(0, 5), (5, 9), (9, 12)]."""
    assert parse_split(" 0:5, 5:9,9:12", 12, 3) == [(0, 5), (5, 9), (9, 12)]


def test_choose_split_specs(tiny_profiles, monkeypatch):
    """"uniform", an explicit list, and "profile" = the DP on this device's profile and the schedule's memory."""
    args = dict(config=TINY, num_stages=3, schedule_name="gpipe", microbatches=4, accum=None, batch_size=B,
                seq_len=T, device="cpu", budget=3 * 2**20)
    assert choose_split("uniform", **args) == uniform_split(6, 3)
    assert choose_split("0:1,1:5,5:6", **args) == [(0, 1), (1, 5), (5, 6)]
    monkeypatch.setattr("paci.profiler.profile_units", lambda config, b, t, device, dtype: tiny_profiles)
    expected = partition(tiny_profiles, 3, [4, 4, 4], [0, 0, 0], budget=3 * 2**20)
    assert choose_split("profile", **args) == list(expected.ranges)
    with pytest.raises(ValueError, match="not START:STOP"):
        choose_split("balanced", **args)


def test_parse_bytes_units_and_errors():
    """Decimal and binary units parse exactly; zero, negative and malformed sizes are errors."""
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    for text, message in (("0", "positive"), ("-2GiB", "positive"), ("12XB", "cannot read"), ("", "cannot read")):
        with pytest.raises(ValueError, match=message):
            parse_bytes(text)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_partition_json_is_one_valid_object(capsys):
    """`paci partition --preset tiny --stages 2 --json` prints one JSON object with both splits."""
    assert main(["partition", "--preset", "tiny", "--stages", "2", "--microbatch-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_units"] == 6 and len(out["units"]) == 6
    profiled, uniform = out["profiled"], out["uniform"]
    assert len(profiled["ranges"]) == 2 and profiled["ranges"][-1][1] == 6 and uniform["split"] == "0:3,3:6"
    assert profiled["max_stage_time_s"] <= uniform["max_stage_time_s"] and out["speedup_vs_uniform"] >= 1.0
    assert 0 < profiled["predicted_efficiency"] <= 1 and profiled["feasible"]


def test_cli_partition_infeasible_budget_still_reports(capsys):
    """A budget no split meets prints the least-bad split, marked as not fitting (exit 0)."""
    assert main(["partition", "--preset", "tiny", "--stages", "2", "--microbatch-size", "2",
                 "--memory-per-stage", "1MiB"]) == 0
    assert "DOES NOT FIT: stage" in capsys.readouterr().out


def test_unit_costs_from_profiles_use_forward_plus_backward(tiny_profiles):
    """The partitioner's unit time is forward + backward; weight bytes are the parameter bytes."""
    costs = UnitCosts.of(tiny_profiles)
    assert costs.time == tuple(p.forward_s + p.backward_s for p in tiny_profiles)
    assert costs.weight == tuple(float(p.param_bytes) for p in tiny_profiles)
    assert dataclasses.replace(tiny_profiles[0], forward_s=1.0, backward_s=2.0).time_s == 3.0
