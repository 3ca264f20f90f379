"""paci.Pipeline for a long run: validation, metrics, checkpoints and a resume equal bit for bit to never stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import paci
from paci.checkpoint import CheckpointError
from dist_helpers import descendants, kill_tree, mlp_units, regression_data

STEPS, M, ROWS = 12, 4, 8


def _samples(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


TRAIN, VAL = _samples(40, 1), _samples(16, 2)  # 40 samples: fit()'s mini-batches of 8 cross epochs


def _pipe(lr: float = 1e-2, microbatches: int = M, scheduler: bool = True) -> paci.Pipeline:
    return paci.Pipeline(mlp_units(0), nn.functional.mse_loss, lambda ps: torch.optim.AdamW(ps, lr=lr),
                         lr_scheduler=(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, STEPS)) if scheduler
                         else None, schedule="paci", stages=3, microbatches=microbatches)


def _data(kind: str):
    """The same training data each call, in the three forms fit() takes."""
    if kind == "dataset":
        return TRAIN
    if kind == "stateful":
        return StatefulDataLoader(_samples(STEPS * ROWS, 1), batch_size=ROWS, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(3))
    return regression_data(STEPS, ROWS)


def _fit(pipe: paci.Pipeline, kind: str, out, **kwargs) -> paci.History:
    return pipe.fit(_data(kind), steps=STEPS, batch_size=ROWS, val_data=VAL, eval_every=4, out=out,
                    checkpoint_every=4, **kwargs)


def _records(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which differ between any two runs."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tok_per_s")} for r in rows]


def test_a_fit_with_a_run_directory_evaluates_records_and_checkpoints(tmp_path):
    reference = nn.Sequential(*mlp_units(0))
    with torch.no_grad():
        before = nn.functional.mse_loss(reference(VAL.tensors[0]), VAL.tensors[1]).item()
    history = _fit(_pipe(), "dataset", tmp_path / "run")
    assert len(history) == STEPS and sorted(history.val_loss) == [0, 4, 8, 12]
    # the held-out set's mean loss: 16 samples in micro-batches of 2, each the mean over its rows
    assert history.val_loss[0] == pytest.approx(before, rel=1e-6)
    records = _records(tmp_path / "run")
    assert [r["loss"] for r in records if "loss" in r] == list(history)
    assert {r["step"]: r["val_loss"] for r in records if "val_loss" in r} == history.val_loss
    assert all(r["lr"] is not None for r in records if "loss" in r)  # stage 0's rate at each step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_val_loss"] == history.val_loss[12] == history.summary["final_val_loss"]
    assert summary["steps"] == STEPS and summary["max_drift"] == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000008", "step-000012"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0  # plots=True, as paci train
    _fit(_pipe(), "dataset", tmp_path / "quiet", plots=False)
    assert not (tmp_path / "quiet" / "loss.png").exists()
    with pytest.raises(ValueError, match="already exists and is not empty"):
        _fit(_pipe(), "dataset", tmp_path / "run")


class _StopAt:
    """on_step that interrupts the run at a step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, step: int, loss: float) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kind", ["dataset", "stateful", "iterable"])
def test_an_interrupted_fit_resumed_equals_the_one_that_never_stopped(tmp_path, kind):
    whole = _pipe()
    expected = _fit(whole, kind, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _fit(_pipe(), kind, tmp_path / "part", on_step=_StopAt(6))  # the newest checkpoint: after step 4
    resumed = _pipe()
    rest = _fit(resumed, kind, tmp_path / "part", resume=True)
    assert list(rest) == list(expected)[4:]  # the steps this fit ran
    assert _records(tmp_path / "part") == _records(tmp_path / "whole")
    for a, b in zip(nn.Sequential(*whole.units).parameters(), nn.Sequential(*resumed.units).parameters()):
        assert torch.equal(a, b)


def test_a_resume_refuses_another_runs_checkpoint_naming_the_field(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit(_pipe(scheduler=False), "dataset", tmp_path / "run", on_step=_StopAt(6))
    with pytest.raises(CheckpointError, match="eval_batches = 8, this run has eval_batches = 4"):  # 16 / M samples
        _fit(_pipe(microbatches=2, scheduler=False), "dataset", tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match=r"param_groups\.0\.lr = 0\.01, this run has .* 0\.02"):
        _fit(_pipe(lr=2e-2, scheduler=False), "dataset", tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match='data = "Dataset of 40 samples.*this run has data = "iterable"'):
        _fit(_pipe(scheduler=False), "iterable", tmp_path / "run", resume=True)


def test_a_fit_with_extra_drain_points_checkpoints_there_and_refuses_steps_outside_the_run(tmp_path):
    """drains= (a prompt stop's points, given to a run that never stopped) adds a checkpoint after
    each, recorded in its manifest; steps outside the run, or without out=, are refused."""
    drained = _fit(_pipe(), "dataset", tmp_path / "run", drains=[5])
    plain = _fit(_pipe(), "dataset", tmp_path / "plain")
    assert drained[:5] == plain[:5] and drained[6:] != plain[6:]  # PACI computes differently after a drain
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step-000008", "step-000012"]  # the newest two are kept
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-000012" / "manifest.json").read_text())["drains"] == [5]
    for bad in ([0], [STEPS], [2.5], [True]):
        with pytest.raises(ValueError, match="drains must be optimizer steps between 1 and 11"):
            _fit(_pipe(), "dataset", tmp_path / f"bad-{len(str(bad))}", drains=bad)
    with pytest.raises(ValueError, match="drains= adds checkpoints: pass out= as well"):
        _pipe().fit(TRAIN, steps=STEPS, batch_size=ROWS, drains=[3])


def test_a_fit_shows_its_progress_unless_asked_not_to(caplog):
    """A log line every ~10% of the run (here every step of 12) with the loss and the newest
    validation loss (a tqdm bar instead where stderr is a terminal); none with progress=False."""
    with caplog.at_level("INFO", logger="paci"):
        history = _pipe().fit(TRAIN, steps=STEPS, batch_size=ROWS, val_data=VAL, eval_every=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == STEPS and lines[-1].startswith(f"step {STEPS} | loss {history[-1]:.3f} | "
                                                        f"val loss {history.val_loss[STEPS]:.3f} | ")
    assert f"val loss {history.val_loss[4]:.3f} (step 4)" in lines[4]
    caplog.clear()
    with caplog.at_level("INFO", logger="paci"):
        _pipe().fit(TRAIN, steps=STEPS, batch_size=ROWS, progress=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_resume_in_a_new_directory_starts_afresh(tmp_path):
    history = _fit(_pipe(), "dataset", tmp_path / "new", resume=True)
    assert len(history) == STEPS and (tmp_path / "new" / "summary.json").is_file()


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "long_run.py"
EXAMPLE_FLAGS = ["--steps", "24", "--width", "32", "--layers", "2", "--seq-len", "32", "--batch-size", "16",
                 "--eval-every", "8", "--checkpoint-every", "4"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail("the run ended before " + str(path) + ":\n" + proc.communicate()[1][-3000:])
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _assert_same_example_run(a: Path, b: Path, stages: int) -> None:
    """Same records (but the clock's, and a launched run's final line of measured times), validation
    losses and trained weights."""
    assert [r for r in _records(a) if not r.get("final")] == [r for r in _records(b) if not r.get("final")]
    for s in range(stages):
        x, y = (torch.load(run / f"stage-{s}.pt", weights_only=True) for run in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_example_stopped_by_sigterm_and_run_again_equals_the_run_that_never_stopped(tmp_path):
    """examples/long_run.py (a user's transformer, not paci's GPT) given SIGTERM mid-run drains
    after the step it is in, saves there and exits 130; the same command run again continues from
    there, and the two halves together equal one uninterrupted run with a drain point at that step
    (`--drains`): every record, validation loss and weight."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    command = [sys.executable, str(EXAMPLE), *EXAMPLE_FLAGS, "--out", str(run)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(run / "checkpoints" / "step-000008" / "manifest.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    manifest = paci.checkpoint.latest(run)
    stopped_at = manifest["step"]
    assert 8 <= stopped_at <= 12 and not (run / "stage-0.pt").exists()  # not the end, within a step or two
    drains = manifest.get("drains", [])
    assert drains == ([] if stopped_at % 4 == 0 else [stopped_at])
    again = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"paci: resuming {run} after step {stopped_at}" in again.stderr
    whole = subprocess.run([sys.executable, str(EXAMPLE), *EXAMPLE_FLAGS, "--out", str(tmp_path / "whole"),
                            *(["--drains", ",".join(map(str, drains))] if drains else [])],
                           capture_output=True, text=True, timeout=200, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    _assert_same_example_run(run, tmp_path / "whole", stages=4)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(400)
def test_the_example_under_torchrun_restarts_a_killed_rank_and_equals_the_run_that_never_stopped(tmp_path):
    """The same script under `torchrun --max-restarts 1`: one rank killed (SIGKILL) mid-run, torchrun
    restarts both, the script resumes from the newest checkpoint and ends equal to an uninterrupted
    torchrun run bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    script = [str(EXAMPLE), "--stages", "2", *EXAMPLE_FLAGS]
    run = tmp_path / "run"
    proc = subprocess.Popen([*torchrun, "--max-restarts", "1", *script, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(run / "checkpoints" / "step-000008" / "manifest.json", proc)
        workers = [pid for pid in descendants(proc.pid)
                   if b"long_run.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=250)
    finally:  # a failing test leaves no torchrun behind
        kill_tree(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"paci: resuming {run} after step" in stderr
    whole = subprocess.run([*torchrun, *script, "--out", str(tmp_path / "whole")], capture_output=True, text=True,
                           timeout=250, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    _assert_same_example_run(run, tmp_path / "whole", stages=2)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(400)
def test_the_example_under_torchrun_given_sigterm_drains_saves_and_resumes_exactly(tmp_path):
    """SIGTERM to torchrun (which passes it to its workers) running the script: the ranks drain after
    the current step, save and exit, well within torchrun's own 30 s before it kills them; run again,
    the script resumes, and ends equal to an uninterrupted run with a drain point at that step (in
    one process: a launched run equals it bit for bit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [str(EXAMPLE), "--stages", "2", *EXAMPLE_FLAGS]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    run = tmp_path / "run"
    proc = subprocess.Popen([*torchrun, *script, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        _wait_for(run / "checkpoints" / "step-000008" / "manifest.json", proc)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:  # a failing test leaves no torchrun behind
        kill_tree(proc.pid)
    assert took < 20, f"{took:.1f} s from SIGTERM to exit"
    manifest = paci.checkpoint.latest(run)
    stopped_at = manifest["step"]
    assert 8 <= stopped_at <= 12, stderr[-3000:]
    drains = manifest.get("drains", [])
    assert drains == ([] if stopped_at % 4 == 0 else [stopped_at])
    again = subprocess.run([*torchrun, *script, "--out", str(run)], capture_output=True, text=True, timeout=250,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"paci: resuming {run} after step {stopped_at}" in again.stderr
    assert all((run / name).stat().st_size > 0 for name in ("trace.json", "timeline.png", "loss.png"))
    whole = subprocess.run([sys.executable, *script, "--out", str(tmp_path / "whole"),
                            *(["--drains", ",".join(map(str, drains))] if drains else [])],
                           capture_output=True, text=True, timeout=250, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    _assert_same_example_run(run, tmp_path / "whole", stages=2)
