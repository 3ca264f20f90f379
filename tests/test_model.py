"""The GPT as a list of partitionable units: shapes, split invariance, init, causality."""

import dataclasses
import math

import pytest
import torch

from paci.model import (
    GPT,
    PRESETS,
    AttentionHalf,
    Embedding,
    GPTConfig,
    Head,
    MLPHalf,
    build_unit,
    build_units,
    lm_loss,
    num_units,
    unit_names,
)

TINY = PRESETS["tiny"]
TINY4 = dataclasses.replace(TINY, n_layer=4, vocab_size=97)  # 10 units, small head


def _tokens(config: GPTConfig, B: int = 3, T: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (B, T or config.block_size), generator=g)


def test_num_units_is_two_per_block_plus_two():
    """A model with L blocks has 2L + 2 units: embed, (attn, mlp) per block, head."""
    for n_layer in (1, 2, 5):
        config = dataclasses.replace(TINY, n_layer=n_layer)
        assert num_units(config) == 2 * n_layer + 2
        assert len(unit_names(config)) == num_units(config)
        assert len(build_units(config, seed=0)) == num_units(config)


def test_unit_names_follow_block_order():
    """Names are embed, h0.attn, h0.mlp, h1.attn, ..., head, in unit order."""
    config = dataclasses.replace(TINY, n_layer=2)
    assert unit_names(config) == ["embed", "h0.attn", "h0.mlp", "h1.attn", "h1.mlp", "head"]


def test_build_unit_types_and_shapes():
    """Embed maps (B,T) ids to (B,T,C); each half keeps (B,T,C); head gives (B,T,V)."""
    config = TINY4
    B, T, C, V = 3, 7, config.n_embd, config.vocab_size
    units = build_units(config, seed=1)
    kinds = [Embedding] + [AttentionHalf, MLPHalf] * config.n_layer + [Head]
    assert [type(u) for u in units] == kinds
    x = units[0](_tokens(config, B, T))
    assert x.shape == (B, T, C) and x.dtype == torch.float32
    for unit in units[1:-1]:
        x = unit(x)
        assert x.shape == (B, T, C)
    assert units[-1](x).shape == (B, T, V)


def test_build_units_any_split_equals_full_model():
    """Composing the units of any contiguous split reproduces the full model's logits exactly."""
    config, seed = TINY4, 123
    idx = _tokens(config)
    expected = GPT(config, seed)(idx)
    n = num_units(config)
    splits = [[0, 3, 7, n], [0, 1, n - 1, n], [0, n]]
    splits += [[0, cut, n] for cut in range(1, n)]
    for bounds in splits:
        x = idx
        for start, stop in zip(bounds, bounds[1:]):
            for unit in build_units(config, seed, start, stop):
                x = unit(x)
        assert torch.equal(x, expected), bounds


def test_build_unit_same_seed_same_weights_other_seed_differs():
    """A unit's weights depend only on (seed, index): same seed equal, other seed differs."""
    for index in range(num_units(TINY)):
        a = build_unit(TINY, index, seed=5).state_dict()
        b = build_unit(TINY, index, seed=5).state_dict()
        c = build_unit(TINY, index, seed=6).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        weights = [k for k in a if k.endswith("weight") and not torch.all(a[k] == 1)]
        assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_build_unit_independent_of_global_rng_and_leaves_it_unchanged():
    """Building never reads or advances the global RNG."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = GPT(TINY, seed=3).state_dict()
    build_unit(TINY, 1, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    second = GPT(TINY, seed=3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_build_unit_gpt2_init_statistics():
    """c_proj std = 0.02/sqrt(2L), other Linear/Embedding std = 0.02, biases 0, LayerNorm 1/0."""
    config = GPTConfig(vocab_size=4096, block_size=256, n_layer=8, n_head=4, n_embd=256)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # 0.005
    units = [build_unit(config, i, seed=0) for i in (0, 1, 2, num_units(config) - 1)]
    checked = 0
    for unit in units:
        for name, p in unit.named_parameters():
            if ".ln_" in f".{name}":
                fill = 1.0 if name.endswith("weight") else 0.0
                assert torch.all(p == fill), name
            elif name.endswith("bias"):
                assert torch.all(p == 0), name
            else:
                std = residual_std if "c_proj" in name else 0.02
                assert p.std().item() == pytest.approx(std, rel=0.03), name
                assert abs(p.mean().item()) < 0.05 * std, name
                checked += 1
    assert checked == 7  # wte, wpe, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head


def test_gpt_is_causal():
    """Changing token t changes no logits at positions < t (and does change position t)."""
    model = GPT(TINY4, seed=0)
    idx = _tokens(TINY4, B=2)
    t = 11
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % TINY4.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])


def test_gpt_medium_parameter_count_on_meta():
    """gpt2-medium has 406,382,592 parameters: GPT-2 Medium (354.9M at V=50304) + untied head."""
    config = PRESETS["gpt2-medium"]
    with torch.device("meta"):
        model = GPT(config, seed=0)
    assert all(p.device.type == "meta" for p in model.parameters())
    C, V, L, T = config.n_embd, config.vocab_size, config.n_layer, config.block_size
    per_block = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, c_proj (+ biases), ln_1, ln_2
    tied = V * C + T * C + L * per_block + 2 * C
    assert sum(p.numel() for p in model.parameters()) == tied + V * C == 406_382_592
    assert tied == 354_871_296


def test_lm_loss_is_mean_cross_entropy():
    """lm_loss of uniform logits is log V; it averages over every (b, t) position."""
    V = 50
    targets = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(0))
    assert lm_loss(torch.zeros(2, 5, V), targets).item() == pytest.approx(math.log(V))
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(1))
    per_token = [
        torch.nn.functional.cross_entropy(logits[b, t], targets[b, t])
        for b in range(2)
        for t in range(5)
    ]
    assert lm_loss(logits, targets).item() == pytest.approx(torch.stack(per_token).mean().item())


def test_gpt_adamw_reduces_loss_on_fixed_batch():
    """Twenty AdamW steps on one repeated batch cut the loss well below its start (≈ log V)."""
    model = GPT(TINY, seed=0)
    idx = _tokens(TINY, B=4, T=TINY.block_size + 1, seed=1)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(TINY.vocab_size), abs=0.1)
    assert losses[-1] < losses[0] - 2.0


def test_gpt_generate_appends_tokens_within_vocab():
    """generate returns (B, T + n) ids in [0, V), keeping the prompt, also past block_size."""
    model = GPT(TINY, seed=0).eval()
    prompt = _tokens(TINY, B=2, T=TINY.block_size - 2)
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=5, top_k=10)
    assert out.shape == (2, TINY.block_size + 3)
    assert torch.equal(out[:, : prompt.size(1)], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < TINY.vocab_size


def test_embedding_rejects_sequences_longer_than_block_size():
    """An input longer than block_size is an error, not a silent position-table overflow."""
    with pytest.raises(ValueError, match="block_size"):
        build_unit(TINY, 0, seed=0)(_tokens(TINY, B=1, T=TINY.block_size + 1))


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_embd": 30, "n_head": 4},
        {"n_layer": 0},
        {"vocab_size": -1},
        {"block_size": 0},
        {"n_head": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
    ],
)
def test_gptconfig_bad_values_raise(overrides):
    """Invalid sizes, head counts that do not divide n_embd, or dropout outside [0,1) raise."""
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **overrides)


def test_build_units_rejects_bad_ranges():
    """Out-of-range indices and empty or reversed unit ranges raise."""
    with pytest.raises(IndexError):
        build_unit(TINY, num_units(TINY), seed=0)
    with pytest.raises(IndexError):
        build_unit(TINY, -1, seed=0)
    for start, stop in [(3, 3), (4, 2), (0, num_units(TINY) + 1)]:
        with pytest.raises(ValueError):
            build_units(TINY, 0, start, stop)


def test_presets_are_valid_and_named():
    """The presets the CLI relies on exist with their documented shapes."""
    assert {"tiny", "small", "gpt2-medium"} <= set(PRESETS)
    assert PRESETS["small"].vocab_size == 4096 and PRESETS["small"].n_embd == 128
    medium = PRESETS["gpt2-medium"]
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)
    assert (medium.block_size, medium.vocab_size) == (1024, 50304)


def test_build_unit_blocks_get_distinct_weights():
    """Blocks of the same kind draw different weights: the seed depends on the unit index."""
    h0_attn, h1_attn = build_unit(TINY, 1, seed=0), build_unit(TINY, 3, seed=0)
    assert not torch.equal(h0_attn.attn.c_attn.weight, h1_attn.attn.c_attn.weight)


def test_block_halves_are_pre_ln_residuals():
    """Each half is x + f(ln(x)): with its output projection zeroed it is the identity."""
    x = torch.randn(2, 5, TINY.n_embd, generator=torch.Generator().manual_seed(0))
    for index, branch in ((1, "attn"), (2, "mlp")):
        unit = build_unit(TINY, index, seed=0)
        assert not torch.equal(unit(x), x)
        with torch.no_grad():
            getattr(unit, branch).c_proj.weight.zero_()
            getattr(unit, branch).c_proj.bias.fill_(0.5)
        torch.testing.assert_close(unit(x), x + 0.5)


def test_attention_half_matches_explicit_masked_softmax():
    """The SDPA attention equals softmax(q k^T / sqrt(hs) + causal mask) v, head by head."""
    config = TINY
    unit = build_unit(config, 1, seed=0)
    x = torch.randn(2, 6, config.n_embd, generator=torch.Generator().manual_seed(0))
    B, T, C = x.shape
    hs = C // config.n_head
    q, k, v = unit.attn.c_attn(unit.ln_1(x)).split(C, dim=2)
    heads = []
    for h in range(config.n_head):
        cols = slice(h * hs, (h + 1) * hs)
        att = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        heads.append(att @ v[..., cols])  # (B, T, hs)
    expected = x + unit.attn.c_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(unit(x), expected)
