"""Entry points for spawned test ranks (module-level, so the spawn start method can import them)."""

from __future__ import annotations

from paci.config import RunConfig


def train_each(configs: list[RunConfig]) -> int:
    """Run several trainings one after another in the same process group."""
    from paci.train import train_rank

    for config in configs:
        train_rank(config)
    return 0
