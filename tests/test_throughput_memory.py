"""Smoke tests of experiments/throughput.py and experiments/memory.py: `--quick` runs end to end,
prints its table, writes its plot and its cells, and a second run resumes from the cells."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path) -> str:
    done = subprocess.run([sys.executable, f"experiments/{script}", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _cell(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())["value"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_throughput_quick_runs_and_resumes(tmp_path):
    """Every (m, schedule) cell is measured on the real runtime with a prediction beside it; a rerun spawns nothing."""
    first = _run("throughput.py", tmp_path)
    assert "running 8 cells" in first and "| 4 | zb-h1 |" in first
    assert (tmp_path / "throughput.png").stat().st_size > 0
    cell = _cell(tmp_path, "m2-1f1b")
    assert cell["num_stages"] == 4 and cell["planned_throughput_mb_per_s"] > 0 and cell["throughput_mb_per_s"] > 0
    second = _run("throughput.py", tmp_path)
    assert "running" not in second and "| 4 | zb-h1 |" in second


@pytest.mark.timeout(300)
def test_memory_quick_measures_paci_equal_to_1f1b(tmp_path):
    """Measured at P = 2: PACI's per-stage bytes equal 1F1B-flush's; PipeDream's exceed them by its weight
    copy on stage 0 and equal them on the last stage, which needs none; a rerun resumes."""
    first = _run("memory.py", tmp_path)
    assert "Predicted against measured" in first and (tmp_path / "memory.png").stat().st_size > 0
    paci, flush, pipedream = (_cell(tmp_path, f"measured-tiny-p2-{name}") for name in ("paci", "1f1b", "pipedream"))
    assert [s["measured"] for s in paci] == [s["measured"] for s in flush]
    assert pipedream[0]["measured"] > paci[0]["measured"] and pipedream[-1]["measured"] == paci[-1]["measured"]
    assert _run("memory.py", tmp_path).count("measured/predicted") == 1
