"""Entry points for spawned test ranks (module-level, so the spawn start method can import them)."""

from __future__ import annotations

from paci.config import RunConfig


def train_each(configs: list[RunConfig]) -> int:
    """Run several trainings one after another in the same process group."""
    from paci.train import train_rank

    for config in configs:
        train_rank(config)
    return 0


def mlp_units(seed: int = 0):
    """A small MLP as a list of units (the public API's tests)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)]


def regression_data(steps: int, rows: int = 8):
    """`steps` mini-batches of a smooth regression, the same on every call."""
    import torch

    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(rows, 6, generator=gen)
        yield x, x.sum(dim=1, keepdim=True).sin()


def fit_pipeline(payload) -> int:
    """One rank of paci.Pipeline.fit under a launcher; saves its losses and its stage's parameters."""
    import torch
    from torch import nn

    import paci

    options, steps, out = payload
    pipe = paci.Pipeline(mlp_units(), nn.functional.mse_loss,
                         lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), **options)
    losses = pipe.fit(regression_data(steps), steps=steps)
    rank = int(__import__("os").environ["RANK"])
    torch.save({"losses": losses, "params": [p.detach() for p in pipe.stage_modules[rank].parameters()]},
               f"{out}/rank{rank}.pt")
    return 0
