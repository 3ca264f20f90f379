"""Shared pieces for the runtime tests: a tiny GPT, a deterministic feed, stages, and the reference."""

from __future__ import annotations

import torch

from paci.ir import Schedule, stage_delay, updates_ahead
from paci.model import GPT, GPTConfig, build_units, lm_loss, num_units
from paci.runtime.stage import OptimizerSpec, Stage
from paci.partition import uniform_split

TINY = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
BATCH = 2
SEED = 3


def feed(mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `mb`: a pure function of mb, like TokenData.batch."""
    gen = torch.Generator().manual_seed(1000 + mb)
    tokens = torch.randint(0, TINY.vocab_size, (BATCH, TINY.block_size + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def optimizer_spec(schedule: Schedule, lr: float = 1e-2) -> OptimizerSpec:
    return OptimizerSpec(lr=lr, warmup_steps=1, total_steps=schedule.num_steps)


def make_stages(schedule: Schedule, config: GPTConfig = TINY, seed: int = SEED,
                spec: OptimizerSpec | None = None, recompute: bool = False, precision: str = "fp32") -> list[Stage]:
    spec = spec or optimizer_spec(schedule)
    return [Stage(s, schedule.num_stages, build_units(config, seed, start, stop), policy=schedule.weight_policy,
                  optim=spec.for_stage(stage_delay(schedule, s)), loss_scale=1.0 / schedule.accumulation, train_batch=feed, val_batch=feed,
                  recompute=recompute, updates_ahead=updates_ahead(schedule, s), precision=precision)
            for s, (start, stop) in enumerate(uniform_split(num_units(config), schedule.num_stages))]


def reference_training(schedule: Schedule, config: GPTConfig = TINY, seed: int = SEED,
                       spec: OptimizerSpec | None = None, before_step=None) -> GPT:
    """The unsplit model trained with plain gradient accumulation over the same micro-batches;
    `before_step(model)` runs before each optimizer step (e.g. clipping)."""
    model = GPT(config, seed)
    spec = spec or optimizer_spec(schedule)
    opt, sched = spec.build(list(model.parameters()))
    k = schedule.accumulation
    for step in range(schedule.num_steps):
        for mb in range(step * k, (step + 1) * k):
            x, y = feed(mb)
            (lm_loss(model(x), y) * (1.0 / k)).backward()
        if before_step is not None:
            before_step(model)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model


def stage_parameters(stages: list[Stage]) -> list[torch.Tensor]:
    return [p for stage in stages for p in stage.module.parameters()]
