"""Smoke tests of the experiments' quick modes: the whole pipeline (clock, cached cells, report, plot)
runs end to end on the tiny setting, and a second run reuses every cached cell."""

import contextlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _run(script: str, cache: Path) -> str:
    """`python experiments/SCRIPT --quick --cache CACHE`, run in this process as its own __main__ (a
    fresh interpreter's start, torch and matplotlib imported again, was a third of the smoke test);
    its stdout. Its cells run through `paci.cli.main`, which puts torch's thread count back."""
    argv, out = sys.argv, io.StringIO()
    sys.argv = [str(EXPERIMENTS / script), "--quick", "--cache", str(cache)]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_time_to_accuracy_drift_and_quality_quick_modes(tmp_path):
    """tta.py --quick writes a clock, the cells and a report with every table; drift.py, quality.py and
    optimizers.py --quick add their cells to the same cache (quality.py reusing tta's, optimizers.py
    tta's clock); rerunning tta.py or optimizers.py trains nothing new."""
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
    optimizers = _run("optimizers.py", cache)  # Muon's step added to tta's clock, its cells beside tta's
    for heading in ("Optimizer step U per stage", "learning-rate sweep", "Headline cells", "Time to target",
                    "Equal wall-clock budget", "Drift ablation with Muon", "The headline pair with Muon",
                    "Where the regime changes", "| muon, paper's recipe | 12 |"):
        assert heading in optimizers, optimizers
    clock = json.loads((cache / "clock.json").read_text())
    assert len(clock["optimizers"]["muon"]["update_ratio"]) == 4 and "paci-muon-m4" in clock["step_end_s"]
    assert "paci-muon-predict-m4" in clock["step_end_s"] and "| muon | paci+predict m=4" in optimizers
    assert {"1f1b-m4-lr0.032-s0-muon0.9.json", "paci-m2-lr0.032-s0-muon0.9.json"} <= \
        {p.name for p in (cache / "cells").glob("*.json")}
    assert (cache / "optimizers.png").is_file()
    before = sorted(p.name for p in (cache / "cells").glob("*.json"))
    for script in ("tta.py", "optimizers.py"):
        assert "cells to run" not in _run(script, cache)
    assert sorted(p.name for p in (cache / "cells").glob("*.json")) == before


def test_stability_model_matches_its_closed_form():
    """stability.py checks its grid against the closed form for Adam (it asserts), and prints the table."""
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "stability.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| Adam (EMA momentum) | 0.9 | 38.1 | 10.0 | 4.0 | 2.3 | 1.0 |" in done.stdout, done.stdout



@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_script_runs_on_the_cpu_at_tiny_size(tmp_path):
    """experiments/gpu.py --quick trains the headline pair with both optimizers on the CPU, writes the
    clock and the table, and `report` puts the table into a results file between its markers (again:
    replaced, not repeated); without a GPU the full run is refused in one line."""
    out, docs = tmp_path / "gpu", tmp_path / "results.md"
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in (out / "gpu.md").read_text().splitlines() if line.startswith(("| adamw |", "| muon |"))]
    assert len(rows) == 2 and all("not run" not in row for row in rows), rows
    assert len(list((out / "cells").glob("*.json"))) == 4 and (out / "clock.json").is_file()
    docs.write_text("# Measured results\n")
    for _ in range(2):
        report = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu.py"), "report", str(out), "--docs", str(docs)],
                                capture_output=True, text=True, timeout=60)
        assert report.returncode == 0, report.stderr
    text = docs.read_text()
    assert text.count("experiments/gpu.py: begin") == 1 and rows[1] in text
    import torch

    if not torch.cuda.is_available():
        refused = subprocess.run([sys.executable, str(EXPERIMENTS / "gpu.py"), "--out", str(tmp_path / "x")],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
            "no CUDA device here: run it on a GPU machine, or --quick for the CPU smoke test")


def test_a_long_cell_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A cell of LONG_CELL steps or more checkpoints as it trains and a restarted study resumes it:
    cut back to an earlier checkpoint, it ends with the uninterrupted run's curve, bit for bit."""
    import shutil

    sys.path.insert(0, str(EXPERIMENTS))
    import tta

    run = tmp_path / "runs" / "paci-m2-lr0.004-s0-steps12-muon0.9"
    rmtree = shutil.rmtree
    monkeypatch.setattr(tta, "LONG_CELL", 12)
    monkeypatch.setattr(tta, "LONG_CHECKPOINT", 4)
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: None if Path(path) == run else rmtree(path, *a, **k))
    cell = tta.Cell("paci", 2, 4e-3, steps=12, optimizer="muon")
    assert tmp_path / "runs" / cell.name == run
    whole = tta.run_cell(tta.QUICK, cell, tmp_path, threads=1)
    assert whole["checkpoint_every"] == 4 and (run / "checkpoints" / "step-000008" / "manifest.json").is_file()
    (tmp_path / "cells" / f"{cell.name}.json").unlink()  # as if the study had stopped after step 8's checkpoint
    (run / "checkpoints" / "step-000012" / "manifest.json").unlink()
    (run.parent / f"{run.name}.wall_s").write_text(f"{whole['cpu_wall_s']}\n")  # the first part's cost
    resumed = tta.run_cell(tta.QUICK, cell, tmp_path, threads=1)
    assert resumed["eval"] == whole["eval"] and resumed["train_loss"] == whole["train_loss"]
    assert resumed["final_val_loss"] == whole["final_val_loss"] and resumed["cpu_wall_s"] > whole["cpu_wall_s"]
