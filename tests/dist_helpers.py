"""Entry points for spawned test ranks (module-level, so the spawn start method can import them)."""

from __future__ import annotations

from paci.config import RunConfig


def train_each(configs: list[RunConfig]) -> int:
    """Run several trainings one after another in the same process group."""
    from paci.train import train_rank

    for config in configs:
        train_rank(config)
    return 0


def train_drained(payload) -> int:
    """One training (config, drains) with drain points added after `drains`, as a prompt stop adds them."""
    from paci.train import train_rank

    config, drains = payload
    train_rank(config, drains=drains)
    return 0


def mlp_units(seed: int = 0):
    """A small MLP as a list of units (the public API's tests)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)]


def deep_units(seed: int = 0):
    """A four-layer MLP: enough units for four stages with weights each (interleaved, 2 ranks x 2)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)]


def structured_units(seed: int = 0):
    """Units that pass several tensors: a dict, then tuples, with an integer gate that carries no
    gradient and a float skip connection that carries one across two stage boundaries."""
    import torch
    from torch import nn

    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 16)

        def forward(self, x):
            return {"h": self.proj(x), "gate": (x[:, :1] > 0).long(), "skip": x * 0.5}

    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.skip = nn.Linear(16, 16), nn.Linear(6, 16)

        def forward(self, parts):
            h, gate, skip = (parts["h"], parts["gate"], parts["skip"]) if isinstance(parts, dict) else parts
            return torch.tanh(self.mix(h)) * (1 + gate) + self.skip(skip), gate, skip.sin()

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(16, 1)

        def forward(self, parts):
            h, gate, skip = parts
            return self.out(h) * (1 + gate) + skip.sum(dim=1, keepdim=True)

    torch.manual_seed(seed)
    return [Fork(), Mix(), Mix(), Head()]


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
    options = dict(options)
    kind = options.pop("units", "mlp")
    units = {"mlp": mlp_units, "structured": structured_units, "deep": deep_units}[kind]()
    pipe = paci.Pipeline(units, nn.functional.mse_loss,
                         lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), **options)
    losses = pipe.fit(regression_data(steps), steps=steps)
    rank = int(__import__("os").environ["RANK"])
    held = pipe.stage_modules[rank % pipe.num_ranks::pipe.num_ranks]  # one stage, or a rank's interleaved chunks
    params = [p.detach() for stage in held for p in stage.parameters()]
    torch.save({"losses": list(losses), "params": params}, f"{out}/rank{rank}.pt")
    return 0


def bench_rank(payload) -> int:
    """One rank of a synthetic runtime bench; rank 0 saves the result as JSON."""
    import json

    from paci.bench import run_bench_rank

    bench, out = payload
    result = run_bench_rank(bench)
    if result is not None:
        with open(out, "w") as f:
            json.dump(result, f)
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), from /proc."""
    from pathlib import Path

    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (a test's torchrun, whatever state it is in)."""
    import os
    import signal

    for victim in [*descendants(pid), pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
