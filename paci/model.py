"""A GPT (nanoGPT-shaped) written as an ordered list of partitionable units.

The model is the list

    [Embedding, AttentionHalf(0), MLPHalf(0), ..., AttentionHalf(L-1), MLPHalf(L-1), Head]

with 2*n_layer + 2 units. Every unit is an nn.Module whose forward takes one tensor and
returns one tensor, so any contiguous slice of the list is a pipeline stage. Each
transformer block is cut into its two residual halves, as the PACI paper does, which gives
the partitioner a finer grain than whole blocks.

Unit i is initialised from its own torch.Generator seeded by a pure function of
(seed, i), so a stage that builds only its own units gets exactly the weights the full
model would have, whatever the split, and building never touches the global RNG.

References:
1) GPT-2 (Radford et al., 2019): pre-LayerNorm blocks, learned positions, init scheme.
2) karpathy/nanoGPT model.py: the module and parameter names used here.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from paci.checks import check_integer


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab_size: int = 4096
    block_size: int  # context length T
    n_layer: int  # transformer blocks L (each is two units)
    n_head: int
    n_embd: int  # model width C
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers (the LM head never has one)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            check_integer(f"GPTConfig.{name}", value)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"the nearest n_head that works is {_nearest_divisor(self.n_embd, self.n_head)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


def _nearest_divisor(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


# The caller replaces vocab_size with the tokenizer's (dataclasses.replace).
PRESETS: dict[str, GPTConfig] = {
    # unit tests and CI: a training step takes milliseconds
    "tiny": GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
    # the CPU default: `make run` trains it in about two minutes on 2 cores (README)
    "small": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),
    # eight stages of real work on CPU: the P = 8 experiments (with a 1024-token vocabulary the
    # head costs about as much as one block, so the 18 units split evenly into 8 stages)
    "deep": GPTConfig(block_size=64, n_layer=8, n_head=4, n_embd=128),
    # GPU machines; vocab 50304 is GPT-2's 50257 padded up to a multiple of 64
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(
        vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024
    ),
}


# -----------------------------------------------------------------------------
# Layers


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, width
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


# -----------------------------------------------------------------------------
# Units: one tensor in, one tensor out


class Embedding(nn.Module):
    """Unit 0: token ids (B, T) int64 -> residual stream x (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        if T > self.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.block_size}; "
                "crop the input or build the model with a larger block_size"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)


class AttentionHalf(nn.Module):
    """First half of a block: x + attn(ln_1(x)), (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln_1(x))


class MLPHalf(nn.Module):
    """Second half of a block: x + mlp(ln_2(x)), (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_2(x))


class Head(nn.Module):
    """Last unit: ln_f then the LM head, (B, T, C) -> logits (B, T, V).

    lm_head is deliberately NOT tied to the token embedding wte (GPT-2 ties them): the two
    live on different pipeline stages, and tying would need a cross-stage gradient sync.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, V)


# -----------------------------------------------------------------------------
# Building units


def num_units(config: GPTConfig) -> int:
    """Embedding, two halves per block, Head."""
    return 2 * config.n_layer + 2


def unit_names(config: GPTConfig) -> list[str]:
    """["embed", "h0.attn", "h0.mlp", ..., "head"], one name per unit index."""
    blocks = [f"h{i}.{half}" for i in range(config.n_layer) for half in ("attn", "mlp")]
    return ["embed", *blocks, "head"]


def _unit_seed(seed: int, index: int) -> int:
    """The generator seed of unit `index`: a pure function of (seed, index)."""
    return (seed * 1_000_003 + index) % 2**64


def _new_unit(config: GPTConfig, index: int) -> nn.Module:
    if index == 0:
        return Embedding(config)
    if index == num_units(config) - 1:
        return Head(config)
    return AttentionHalf(config) if index % 2 == 1 else MLPHalf(config)


@torch.no_grad()
def _init_gpt2(module: nn.Module, config: GPTConfig, generator: torch.Generator) -> None:
    """GPT-2 init, drawn from `generator` in named_modules order.

    Linear and Embedding weights ~ N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0;
    the projections that write into the residual stream (c_proj) use 0.02/sqrt(2*n_layer),
    since 2*n_layer of them are summed along the stream.
    """
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = residual_std if name.endswith("c_proj") else 0.02
            m.weight.normal_(0.0, std, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()


def build_unit(config: GPTConfig, index: int, seed: int) -> nn.Module:
    """Unit `index` with GPT-2 init from a generator seeded by (seed, index).

    The unit is allocated on the meta device and materialised on the CPU, where it is
    initialised from a CPU generator (so the weights are bit-identical on every machine),
    then moved to the default device. Inside a `torch.device("meta")` context it stays on
    meta, uninitialised: shapes and parameter counts only. The global RNG is never used.
    """
    if not 0 <= index < num_units(config):
        raise IndexError(f"unit index {index} out of range [0, {num_units(config)})")
    target = torch.get_default_device()
    with torch.device("meta"):
        unit = _new_unit(config, index)
    if target.type == "meta":
        return unit
    unit.to_empty(device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(_unit_seed(seed, index))
    _init_gpt2(unit, config, generator)
    return unit.to(target)


def build_units(
    config: GPTConfig, seed: int, start: int = 0, stop: int | None = None
) -> list[nn.Module]:
    """Units [start, stop) of the model, each exactly as the full model builds it."""
    n = num_units(config)
    stop = n if stop is None else stop
    if not 0 <= start < stop <= n:
        raise ValueError(f"need 0 <= start < stop <= {n} for a unit range, got [{start}, {stop})")
    return [build_unit(config, i, seed) for i in range(start, stop)]


# -----------------------------------------------------------------------------
# The whole model, for reference training and sampling


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int):
        super().__init__()
        self.config = config
        self.units = nn.Sequential(*build_units(config, seed))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.units(idx)  # (B, T) -> (B, T, V)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens: (B, T + max_new_tokens).

        Samples from the global RNG; call model.eval() first if dropout is on.
        """
        if temperature <= 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        for _ in range(max_new_tokens):
            # crop the context to the last block_size tokens
            idx_cond = idx[:, -self.config.block_size :]
            logits = self(idx_cond)[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The numerics a forward runs under: fp32, or bf16 autocast over fp32 weights (matmuls in
    bf16 on a bf16 copy of each weight made when the forward first uses it; LayerNorm, softmax and
    the loss in fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over all B*T tokens: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
