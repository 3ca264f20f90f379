"""Shared by the experiment scripts: the machine they ran on, CPU time spent, and a cell cache.

Every cell of an experiment (one measurement) is a JSON file under its run folder, written
atomically when the cell is done, so an interrupted experiment resumes where it stopped. A cell
is reused only if it was made with the same settings; change a setting and it is measured again.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import torch

from paci.files import atomic_write, write_text


def machine() -> str:
    """CPU model, cores, Python and torch versions, in one line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically (complete or absent), and close it."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Cells:
    """JSON cells under `folder`, each tagged with the `settings` that produced it."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from disk

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> dict | None:
        """The cell's value if it was stored with the same settings, else None."""
        try:
            stored = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        return stored.get("value") if stored.get("settings") == self.settings else None

    def put(self, name: str, value: dict) -> dict:
        write_text(self.path(name), json.dumps({"settings": self.settings, "value": value}, indent=1) + "\n")
        return value
