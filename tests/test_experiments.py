"""Smoke tests of the experiments' quick modes: the whole pipeline (clock, cached cells, report, plot)
runs end to end on the tiny setting, and a second run reuses every cached cell."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _run(script: str, cache: Path) -> str:
    done = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--quick", "--cache", str(cache)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(480)
def test_time_to_accuracy_drift_and_quality_quick_modes(tmp_path):
    """tta.py --quick writes a clock, the cells and a report with every table; drift.py and quality.py
    --quick add their cells to the same cache (quality.py reusing tta's); rerunning tta.py trains
    nothing new."""
    cache = tmp_path / "tta"
    report = _run("tta.py", cache)
    for heading in ("Calibrated time per step", "learning-rate sweep", "Time to target validation loss",
                    "Headline cells", "Equal wall-clock budget"):
        assert heading in report, report
    assert (cache / "clock.json").is_file() and (cache / "tta.png").is_file()
    cells = sorted(p.name for p in (cache / "cells").glob("*.json"))
    assert "1f1b-m4-lr0.002-s0.json" in cells and "paci-m2-lr0.004-s0.json" in cells
    drift = _run("drift.py", cache)
    assert "| 4 | 1 | [3, 2, 1, 0] | [3, 2, 1, 0] |" in drift, drift  # K = 1: the bound is attained
    assert (cache / "drift.png").is_file()
    quality = _run("quality.py", cache)
    assert "paci-m4-lr0.002-s0," not in quality  # tta's cell, reused
    for row in ("| PACI + nesterov", "| 1F1B-flush, NAdamW 0.99 (control)", "| PACI K=2 + pipemare", "4x steps"):
        assert row in quality, quality
    assert (cache / "quality.png").is_file() and (cache / "cells" / "paci-m4-lr0.002-s0-nesterov.json").is_file()
    before = sorted(p.name for p in (cache / "cells").glob("*.json"))
    again = _run("tta.py", cache)
    assert "cells to run" not in again
    assert sorted(p.name for p in (cache / "cells").glob("*.json")) == before


def test_stability_model_matches_its_closed_form():
    """stability.py checks its grid against the closed form for Adam (it asserts), and prints the table."""
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "stability.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| Adam (EMA momentum) | 0.9 | 38.1 | 10.0 | 4.0 | 2.3 | 1.0 |" in done.stdout, done.stdout


@pytest.mark.timeout(480)
def test_optimizer_axis_quick_mode(tmp_path):
    """optimizers.py --quick adds Muon's step to the clock, brackets each optimizer's rates for flush and
    PACI, runs the seeds, the drift and the long cells, and reports every table; run again, it trains
    nothing."""
    cache = tmp_path / "tta"
    report = _run("optimizers.py", cache)
    for heading in ("Optimizer step U per stage", "learning-rate sweep", "Headline cells", "Time to target",
                    "Equal wall-clock budget", "Drift ablation with Muon", "The headline pair with Muon"):
        assert heading in report, report
    clock = json.loads((cache / "clock.json").read_text())
    assert len(clock["optimizers"]["muon"]["update_ratio"]) == 4 and "paci-muon-m4" in clock["step_end_s"]
    cells = {p.stem for p in (cache / "cells").glob("*.json")}
    assert {"1f1b-m4-lr0.032-s0-muon0.9", "paci-m4-lr0.016-s0-adamw0.98", "paci-m2-lr0.032-s0-muon0.9"} <= cells
    assert (cache / "optimizers.png").is_file()
    again = _run("optimizers.py", cache)
    assert "cells to run" not in again
    assert {p.stem for p in (cache / "cells").glob("*.json")} == cells
