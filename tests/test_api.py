"""paci.Pipeline: a user's model, loss and optimizer through every schedule, with the exact semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import paci
import paci.api
import paci.optim
from paci.ir import WeightPolicy
from paci.runtime.stage import OptimizerSpec, Stage
from paci.runtime.launch import spawn
from paci.schedules import REGISTRY, build
from dist_helpers import deep_units, fit_pipeline, mlp_units, regression_data, structured_units

STEPS, M = 3, 4


def _units(seed: int = 0) -> list[nn.Module]:
    return mlp_units(seed)


def _data(steps: int = STEPS, rows: int = 8):
    return regression_data(steps, rows)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _reference(units, make_optimizer, accumulation: int = M, steps: int = STEPS) -> tuple[nn.Module, list[float]]:
    """The unsplit model, plain accumulation over the same micro-batches."""
    model = nn.Sequential(*units)
    optimizer = make_optimizer(list(model.parameters()))
    losses = []
    for x, y in _data(steps):
        total = 0.0
        for xs, ys in zip(x.split(len(x) // M), y.split(len(y) // M)):
            loss = nn.functional.mse_loss(model(xs), ys)
            (loss / accumulation).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / M)
    return model, losses


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "zb-h1"])
@pytest.mark.parametrize("make_optimizer", [_sgd, lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)],
                         ids=["sgd-momentum", "adamw-foreach"])
def test_flush_schedules_equal_the_unsplit_model_with_the_users_optimizer(schedule, make_optimizer):
    units = _units()
    reference, expected = _reference(copy.deepcopy(units), make_optimizer)
    pipe = paci.Pipeline(units, nn.functional.mse_loss, make_optimizer, schedule=schedule, stages=3, microbatches=M)
    losses = pipe.fit(_data(), steps=STEPS)
    assert losses == pytest.approx(expected, rel=1e-6)
    trained = [p for module in pipe.stage_modules for p in module.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(trained, reference.parameters())) <= 1e-6
    assert all(a is b for a, b in zip(trained, nn.Sequential(*units).parameters()))  # trained in place


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "paci"])
def test_several_tensors_between_stages(schedule):
    """Units that pass a dict and tuples (an integer gate with no gradient, a float skip path across
    two stage boundaries): the flush schedules equal the unsplit model, and PACI's live weights
    hold with them too (every gradient reaches its weights: the skip path's through two stages)."""
    units = structured_units()
    reference, expected = _reference(copy.deepcopy(units), _sgd)
    pipe = paci.Pipeline(units, nn.functional.mse_loss, _sgd, schedule=schedule, stages=4, microbatches=M)
    losses = pipe.fit(_data(), steps=STEPS)
    trained = [p for module in pipe.stage_modules for p in module.parameters()]
    if schedule == "paci":  # not the unsplit model's numbers, but every weight moved
        assert all(not torch.equal(a, b) for a, b in zip(trained, nn.Sequential(*structured_units()).parameters()))
        return
    assert losses == pytest.approx(expected, rel=1e-6)
    for a, b in zip(trained, reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_structured_inputs_and_a_profiled_split():
    """Mini-batches whose inputs are a dict of tensors (features and an integer mask) are cut
    tensor by tensor; the partitioner profiles units that pass several tensors; and 1F1B over
    the profiled split equals the unsplit model."""
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 16)

        def forward(self, batch):
            return self.lin(batch["x"]) * batch["keep"], batch["keep"]

    class Gated(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.lin = nn.Linear(16, width)

        def forward(self, parts):
            h, keep = parts
            return (torch.tanh(self.lin(h)) * keep, keep) if self.lin.out_features > 1 else self.lin(h)

    def data(steps: int = STEPS):
        for x, y in _data(steps):
            yield {"x": x, "keep": (x[:, 1:2] > -1).long()}, y

    torch.manual_seed(0)
    units = [Masked(), Gated(16), Gated(16), Gated(1)]
    reference = nn.Sequential(*copy.deepcopy(units))
    optimizer = _sgd(list(reference.parameters()))
    expected = []
    for batch, y in data():
        total = 0.0
        for k in range(M):
            loss = nn.functional.mse_loss(reference({key: t.chunk(M)[k] for key, t in batch.items()}), y.chunk(M)[k])
            (loss / M).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected.append(total / M)
    pipe = paci.Pipeline(units, nn.functional.mse_loss, _sgd, schedule="1f1b", stages=2, microbatches=M,
                         split="profile")
    losses = pipe.fit(data(), steps=STEPS)
    assert len(pipe.split) == 2 and pipe.split[0][0] == 0 and pipe.split[-1][1] == len(units)
    assert losses == pytest.approx(expected, rel=1e-6)
    for a, b in zip([p for m in pipe.stage_modules for p in m.parameters()], reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("returned, message", [
    (lambda h: (h, 3), "every element must be a tensor"),
    (lambda h: {1: h}, "keys are not all strings"),
    (lambda h: (h > 0).long(), "no floating-point tensor"),
])
def test_what_cannot_travel_between_stages_gets_one_clear_error(returned, message):
    class Odd(nn.Module):
        def forward(self, h):
            return returned(h)

    units = [nn.Linear(6, 4), Odd(), nn.Linear(4, 1)]  # the last never runs
    pipe = paci.Pipeline(units, nn.functional.mse_loss, _sgd, schedule="1f1b", stages=2, microbatches=M,
                         split=[(0, 2), (2, 3)])
    with pytest.raises(paci.api.StageFailure, match=message):
        pipe.fit(_data(), steps=1)


@pytest.mark.parametrize("schedule", REGISTRY)
def test_every_schedule_trains(schedule):
    """One loss per optimizer step (K = m, or 1 for pipedream and async-1f1b); PACI's falls."""
    units = deep_units() if REGISTRY[schedule].chunked else _units()  # interleaved: 4 stages with weights
    pipe = paci.Pipeline(units, nn.functional.mse_loss, _sgd, schedule=schedule, stages=2, microbatches=M)
    losses = pipe.fit(_data(12), steps=12)
    assert len(losses) == build(schedule, 2, M, 12).num_steps
    assert all(torch.isfinite(torch.tensor(losses)))
    if schedule == "paci":
        assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize("make, by_hand", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda w, g, x: w - 0.1 * (g.T @ x)),
    (lambda ps: torch.optim.Adafactor(ps, lr=0.05, foreach=False), None),
    (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5), None),
    (lambda ps: paci.optim.MuonAdamW(ps, {p.data_ptr() for p in ps if p.dim() == 2}, lr=0.05), None),
], ids=["sgd-momentum", "adafactor", "rmsprop-momentum", "muon"])
def test_a_users_optimizer_keeps_the_live_weights_semantics(make, by_hand):
    """A Linear stage, one update between F(0) and its backward: the update lands in the parameters'
    own storage and is what it should be (SGD by hand: its first momentum buffer is the gradient, so
    w - lr g; Adafactor's factored second moment and RMSprop: the optimizer's own step on a copy,
    given the gradient of the micro-batch that ran), and the delayed backward's input gradient
    uses the updated weights."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    storage = linear.weight.data_ptr()
    reference = copy.deepcopy(linear)

    def feed(mb):
        raise AssertionError("a middle stage reads no data")

    stage = Stage(1, 3, [linear], policy=WeightPolicy.LIVE, optim=OptimizerSpec(), loss_scale=1.0,
                  train_batch=feed, val_batch=feed, make_optimizer=lambda ps: (make(ps), None))
    x0, x1 = torch.randn(2, 4), torch.randn(2, 4)
    g0, g1 = torch.randn(2, 3), torch.randn(2, 3)
    w_old = linear.weight.detach().clone()
    stage.forward(0, x0.clone())
    stage.forward(1, x1.clone())
    stage.backward(1, g1)
    stage.step()
    if by_hand is not None:
        w_new = by_hand(w_old, g1, x1)
    else:
        optimizer = make(list(reference.parameters()))
        reference(x1).backward(g1)
        optimizer.step()
        w_new = reference.weight.detach()
    assert not torch.equal(w_new, w_old)
    torch.testing.assert_close(linear.weight.detach(), w_new)
    assert linear.weight.data_ptr() == storage
    torch.testing.assert_close(stage.backward(0, g0), g0 @ w_new)


# torch.optim's optimizers that cannot step a pipeline stage, and why; every other one is tested below
NOT_FOR_STAGES = {"LBFGS": "needs a closure that re-runs the whole model",
                  "SparseAdam": "needs sparse gradients",
                  "Muon": "takes 2-D matrices only (paci.optim.MuonAdamW pairs it with AdamW)"}
STAGE_OPTIMIZERS = sorted(n for n, c in vars(torch.optim).items() if isinstance(c, type)
                          and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
                          and n not in NOT_FOR_STAGES)


@pytest.mark.parametrize("name", STAGE_OPTIMIZERS)
def test_every_torch_optimizer_updates_in_place(name):
    """Each of torch.optim's optimizers (as this torch has them) keeps PACI's semantics exactly: a stage
    stepped with it equals the optimizer's own step on a copy given the same gradient, in the
    parameters' own storage, and a delayed backward reads the updated weights."""
    assert len(STAGE_OPTIMIZERS) >= 11  # a torch that lost optimizers would otherwise pass vacuously
    make = lambda ps: getattr(torch.optim, name)(ps, lr=0.05)  # noqa: E731
    test_a_users_optimizer_keeps_the_live_weights_semantics(make, None)


def test_an_optimizer_that_rebinds_the_weights_is_refused():
    class Rebinding(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data = p.data - group["lr"] * p.grad

    pipe = paci.Pipeline(_units(), nn.functional.mse_loss, lambda ps: Rebinding(ps, lr=0.1), schedule="paci",
                         stages=2, microbatches=M)
    with pytest.raises(RuntimeError, match="in place"):
        pipe.fit(_data(), steps=STEPS)


def test_fit_continues_where_it_stopped():
    """Two fits of 2 and 1 steps equal one fit of 3 on a flush schedule (state carries over)."""
    units = _units()
    one = paci.Pipeline(copy.deepcopy(units), nn.functional.mse_loss, _sgd, schedule="1f1b", stages=2, microbatches=M)
    whole = one.fit(_data(), steps=3)
    two = paci.Pipeline(units, nn.functional.mse_loss, _sgd, schedule="1f1b", stages=2, microbatches=M)
    data = _data()
    parts = two.fit(data, steps=2) + two.fit(data, steps=1)
    assert parts == whole
    assert all(torch.equal(a, b) for a, b in zip(nn.Sequential(*units).parameters(),
                                                 [p for m in one.stage_modules for p in m.parameters()]))


@pytest.mark.parametrize("data, message", [
    (lambda: _data(2), "ran out after 2 mini-batches"),
    (lambda: _data(3, rows=6), "divisible into 4 micro-batches"),
    (lambda: iter([(torch.zeros(8, 6), [0.0] * 8)] * 3), "pair of tensors"),
])
def test_bad_data_gets_one_clear_error(data, message):
    pipe = paci.Pipeline(_units(), nn.functional.mse_loss, _sgd, schedule="paci", stages=2, microbatches=M)
    with pytest.raises(paci.api.DataError, match=message):
        pipe.fit(data(), steps=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "nope"}, "unknown schedule"),
    ({"stages": 9}, "stage"),
    ({"split": "0:1,1:9"}, "split"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ({"dp": 0}, "dp"),
    ({"schedule": "interleaved-1f1b", "stages": 2, "clip_grad_norm": 1.0}, "without clipping"),
    ({"schedule": "paci", "chunks": 2}, "one stage per rank"),
])
def test_bad_settings_get_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paci.Pipeline(_units(), nn.functional.mse_loss, _sgd, **kwargs)


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("options", [{"schedule": "paci", "stages": 3},
                                     {"schedule": "1f1b", "stages": 2, "clip_grad_norm": 0.05},
                                     {"schedule": "zb-h1", "stages": 3, "units": "structured"},
                                     {"schedule": "interleaved-1f1b", "stages": 2, "chunks": 2, "units": "deep",
                                      "split": "0:2,2:4,4:6,6:7"}],
                         ids=["paci-3", "1f1b-clip-2", "zb-h1-several-tensors-3", "interleaved-2x2"])
def test_one_rank_per_stage_is_bit_identical_to_one_process(tmp_path, options):
    """The same script under a launcher (RANK, WORLD_SIZE set: torchrun's contract) runs one stage
    per rank (or, interleaved, two stages on each rank: messages loop back from the last rank to
    the first) over gloo and gives the single-process losses and parameters bit for bit."""
    options = {**options, "microbatches": M}
    assert spawn(fit_pipeline, (options, 6, str(tmp_path)), options["stages"], threads=1) == 0
    units = {"mlp": _units, "structured": structured_units, "deep": deep_units}[options.pop("units", "mlp")]()
    pipe = paci.Pipeline(units, nn.functional.mse_loss, _sgd, **options)
    losses = pipe.fit(_data(6), steps=6)
    for rank in range(options["stages"]):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        held = pipe.stage_modules[rank::options["stages"]]
        assert saved["losses"] == losses
        assert all(torch.equal(a, b) for a, b in zip(saved["params"], (p for m in held for p in m.parameters())))
        assert len(saved["params"]) == sum(1 for m in held for _ in m.parameters())


def test_interleaved_computes_what_1f1b_computes():
    """Interleaved 1F1B over 2 ranks x 2 stages is a flush schedule: the same losses and weights as
    1F1B over the same four stages, bit for bit (in one process)."""
    results = []
    for options in ({"schedule": "interleaved-1f1b", "stages": 2, "chunks": 2}, {"schedule": "1f1b", "stages": 4}):
        pipe = paci.Pipeline(deep_units(), nn.functional.mse_loss, _sgd, microbatches=M, split="0:2,2:4,4:6,6:7",
                             **options)
        results.append((pipe.fit(_data(6), steps=6), [p.detach().clone() for p in pipe.stage_modules[3].parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule", ["1f1b", "paci"])
def test_two_replicas_equal_one_pipeline_on_the_whole_micro_batch(tmp_path, schedule):
    """dp=2 x 2 stages on 4 ranks (a (dp, pp) mesh): each replica takes half of every micro-batch's
    rows and the two copies of a stage average their gradients at its step, and nowhere else. The
    losses and weights equal one pipeline given whole micro-batches, to float rounding (the mean of
    two half-batch means is the whole batch's mean, added in another order: rel 1e-5); the replicas
    of a stage hold the very same weights."""
    options = {"schedule": schedule, "stages": 2, "microbatches": M}
    assert spawn(fit_pipeline, ({**options, "dp": 2}, 6, str(tmp_path)), 4, threads=1) == 0
    pipe = paci.Pipeline(_units(), nn.functional.mse_loss, _sgd, **options)
    losses = pipe.fit(_data(6), steps=6)
    saved = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(4)]
    for rank, result in enumerate(saved):
        assert result["losses"] == pytest.approx(losses, rel=1e-5)
        for a, b in zip(result["params"], pipe.stage_modules[rank % 2].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):  # replica 0's stage and replica 1's copy of it
        assert all(torch.equal(a, b) for a, b in zip(saved[rank]["params"], saved[rank + 2]["params"]))
    assert saved[0]["losses"] == saved[3]["losses"]


def test_data_parallel_needs_a_launcher():
    pipe = paci.Pipeline(_units(), nn.functional.mse_loss, _sgd, schedule="paci", stages=2, microbatches=M, dp=2)
    with pytest.raises(ValueError, match="launch 4 ranks"):
        pipe.fit(_data(), steps=1)


def test_the_built_in_gpt_through_the_api_equals_paci_train(tmp_path):
    """examples/gpt_api.py's pipeline: the losses of `paci train --schedule paci --compensate none`
    with the same settings, bit for bit (the API and the command line run the same machinery)."""
    import importlib.util
    import json
    from pathlib import Path

    from paci.config import load_config
    from paci.train import train

    spec = importlib.util.spec_from_file_location("gpt_api", Path(__file__).parents[1] / "examples" / "gpt_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    steps, seq_len = 4, 16
    train(load_config(None, {
        "model": {"preset": "tiny"}, "data": {"batch_size": example.SEQUENCES, "seq_len": seq_len},
        "pipeline": {"schedule": "paci", "stages": example.STAGES, "microbatches": example.MICROBATCHES,
                     "split": "uniform"},
        "optim": {"compensate": "none"},
        "train": {"steps": steps, "eval_every": steps, "eval_batches": 1, "out": str(tmp_path)}}))
    recorded = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    pipe = example.gpt_pipeline("tiny", steps, seq_len)
    losses = pipe.fit(example.corpus_batches(steps, seq_len), steps=steps)
    assert losses == [r["loss"] for r in recorded if "loss" in r and not r.get("final")]


def test_a_profiled_split_goes_by_the_units_costs_and_changes_nothing_else():
    """split="profile" times every unit (on copies) on the first micro-batch and runs paci's
    partitioner: the wide layers at the end get a stage of their own; and the run equals one given
    that split by hand, bit for bit (profiling touched neither the weights nor the data)."""
    def wide() -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 512), nn.Linear(512, 512),
                nn.Linear(512, 1)]

    profiled = paci.Pipeline(wide(), nn.functional.mse_loss, _sgd, schedule="1f1b", stages=2, microbatches=M,
                             split="profile")
    with pytest.raises(RuntimeError, match="first fit"):
        profiled.stage_modules
    losses = profiled.fit(regression_data(3, rows=32), steps=3)
    assert profiled.split[1][0] >= 4
    by_hand = paci.Pipeline(wide(), nn.functional.mse_loss, _sgd, schedule="1f1b", stages=2, microbatches=M,
                            split=profiled.split)
    assert by_hand.fit(regression_data(3, rows=32), steps=3) == losses
    assert all(torch.equal(a, b) for a, b in zip(nn.Sequential(*profiled.units).parameters(),
                                                 nn.Sequential(*by_hand.units).parameters()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_hugging_face_example_runs_where_transformers_is_installed(family):
    """examples/hf_causal_lm.py (the `hf` extra): GPT-2 or Llama from a config, split into its decoder
    layers (Llama's pass hidden states, cos and sin), equal to the model's own logits (the example
    asserts it) and trained two steps on two stages."""
    pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e '.[hf]')")
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "hf_causal_lm.py"
    done = subprocess.run([sys.executable, str(example), "--family", family, "--steps", "2", "--stages", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 stages" in done.stdout
