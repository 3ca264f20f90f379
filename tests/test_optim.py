"""paci.optim: Muon on the hidden matrices, AdamW on the rest, as one optimizer for a pipeline stage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim._muon import _zeropower_via_newtonschulz

import paci
from paci.model import GPTConfig, build_units
from paci.optim import NS_COEFFICIENTS, Muon, MuonAdamW, hidden_matrices, muon, ns_dtype_for, orthogonalize
from paci.runtime.stage import OptimizerSpec
from dist_helpers import mlp_units, regression_data


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
def test_newton_schulz_in_bf16_is_torchs_and_fp32_approximates_it(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7, torch.bfloat16)
    assert torch.equal(ours, _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7))
    fp32 = orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7, torch.float32)
    assert fp32.dtype == torch.float32 and fp32.shape == g.shape
    assert (fp32 - ours.float()).abs().max() < 0.05  # bf16 keeps 8 bits of mantissa
    # what the iteration is for: singular values near 1 (Jordan's coefficients leave them in about [0.7, 1.2])
    assert torch.linalg.svdvals(fp32).min() > 0.6 and torch.linalg.svdvals(fp32).max() < 1.25


def test_muon_with_bf16_steps_as_torch_optim_muon_bit_for_bit():
    w = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))
    theirs = nn.Parameter(w.detach().clone())
    ours = Muon([w], lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon([theirs], lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        g = torch.randn(6, 4, generator=generator)
        w.grad, theirs.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    assert torch.equal(w, theirs)
    assert torch.equal(ours.state[w]["momentum_buffer"], reference.state[theirs]["momentum_buffer"])


def test_newton_schulz_runs_in_fp32_on_a_cpu():
    assert ns_dtype_for("cpu") == torch.float32 and ns_dtype_for("cuda:0") == torch.bfloat16
    assert Muon([nn.Parameter(torch.zeros(3, 3))]).ns_dtype == torch.float32


def test_the_hidden_matrices_of_a_gpt_and_of_its_stages():
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=8)
    units = build_units(config, seed=0)
    hidden = hidden_matrices(units)
    named = {name: p for i, unit in enumerate(units) for name, p in unit.named_parameters(prefix=str(i))}
    muon_names = sorted(name for name, p in named.items() if p.data_ptr() in hidden)
    assert muon_names == sorted(f"{i}.{kind}.{layer}.weight" for i in range(1, 5)
                                for kind, layer in ([("attn", "c_attn"), ("attn", "c_proj")] if i % 2 else
                                                    [("mlp", "c_fc"), ("mlp", "c_proj")]))
    # a stage that does not end the model keeps its last Linear (a c_proj) on Muon; the last stage does not
    assert units[2].mlp.c_proj.weight.data_ptr() in hidden_matrices(units[:3], holds_output=False)
    assert hidden_matrices(units[3:], holds_output=True) == hidden & hidden_matrices(units[3:])
    assert units[-1].lm_head.weight.data_ptr() not in hidden_matrices(units[3:], holds_output=True)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 10))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        model(batch).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def test_one_lr_schedule_for_both_halves_and_a_state_dict_that_resumes_bit_for_bit():
    torch.manual_seed(0)
    model = _model()
    batches = list(torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(3)))
    spec = OptimizerSpec(name="muon", lr=1e-2, warmup_steps=2, total_steps=6)

    def build(m: nn.Module):
        return spec.build(list(m.parameters()), hidden_matrices(list(m)))

    whole = copy.deepcopy(model)
    optimizer, scheduler = build(whole)
    assert isinstance(optimizer, MuonAdamW) and [p.shape for p in optimizer.muon.param_groups[0]["params"]] == [(8, 4)]
    assert optimizer.adamw.param_groups[0]["weight_decay"] == 0.1 and optimizer.adamw.param_groups[1]["weight_decay"] == 0
    _train(whole, optimizer, scheduler, batches)
    assert all(group["lr"] == pytest.approx(spec.lr_at(6)) for part in optimizer._parts for group in part.param_groups)
    assert len(optimizer.state) == 7  # Muon's momentum and AdamW's moments, for every parameter

    stopped = copy.deepcopy(model)
    first, first_scheduler = build(stopped)
    _train(stopped, first, first_scheduler, batches[:3])
    saved = copy.deepcopy((stopped.state_dict(), first.state_dict(), first_scheduler.state_dict()))
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved[0])
    second, second_scheduler = build(resumed)
    second.load_state_dict(saved[1])
    second_scheduler.load_state_dict(saved[2])
    _train(resumed, second, second_scheduler, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), whole.parameters()))


def test_a_state_dict_of_other_parameters_is_refused():
    optimizer = MuonAdamW(list(_model().parameters()), set(), lr=1e-2)  # no hidden matrices: AdamW alone
    other = _model()
    with pytest.raises(ValueError, match="does not match"):
        optimizer.load_state_dict(MuonAdamW(list(other.parameters()), hidden_matrices(list(other))).state_dict())
    with pytest.raises(ValueError, match="Muon takes 2-D"):
        bias = nn.Parameter(torch.zeros(3))
        MuonAdamW([bias], {bias.data_ptr()})


def test_a_flush_pipeline_with_muon_equals_the_unsplit_model():
    """paci.optim.muon for the API: 1F1B over three stages equals the unsplit model with the same
    MuonAdamW (Muon on the hidden Linear layers, AdamW on the output layer and biases)."""
    units = mlp_units(0)
    twin = copy.deepcopy(units)
    model = nn.Sequential(*twin)
    optimizer = muon(twin, lr=1e-2)(list(model.parameters()))
    expected = []
    for x, y in regression_data(3, 8):
        total = 0.0
        for xs, ys in zip(x.split(2), y.split(2)):
            loss = nn.functional.mse_loss(model(xs), ys)
            (loss / 4).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected.append(total / 4)
    pipe = paci.Pipeline(units, nn.functional.mse_loss, muon(units, lr=1e-2), schedule="1f1b", stages=3,
                         microbatches=4)
    assert pipe.fit(regression_data(3, 8), steps=3) == pytest.approx(expected, rel=1e-5)
    trained = [p for module in pipe.stage_modules for p in module.parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(trained, model.parameters())) <= 1e-5
    assert sum(p.dim() == 2 for p in optimizer.muon.param_groups[0]["params"]) == len(hidden_matrices(twin)) > 0
