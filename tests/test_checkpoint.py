"""Checkpoints at drain points: a run stopped and resumed equals, bit for bit, the run that never stopped."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_helpers import train_drained
from paci import schedules
from paci.checkpoint import CheckpointError, latest, load_stage
from paci.config import load_config, load_run_config
from paci.ir import Op, after_step, stage_versions, validate, with_drains
from paci.driver import claim_run_dir
from paci.runtime.launch import StopRequest, Stopped, spawn
from paci.train import make_plan, to_run, train


def _segments(name: str, stages: int, m: int, steps: int, every: int):
    return with_drains(lambda n: schedules.build(name, stages, m, n), steps, every)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "interleaved-1f1b"])
def test_a_flush_schedule_is_unchanged_by_drain_points(name):
    """A flush schedule drains after every step: segmenting it changes no action."""
    assert _segments(name, 3, 4, 7, 3).rows() == schedules.build(name, 3, 4, 7).rows()


@pytest.mark.parametrize("name", ["paci", "2bw", "pipedream", "async-1f1b"])
def test_drain_points_empty_an_asynchronous_pipeline(name):
    """Segments of 2 steps (and a last one of 1): valid, every micro-batch's forward and backward in
    the same segment, so nothing is in flight at a drain point; between them the stream is unchanged."""
    stages, m, steps, every = 3, 4, 5, 2
    schedule = _segments(name, stages, m, steps, every)
    validate(schedule)
    assert schedule.num_microbatches == m * steps
    span = every * m
    for s in range(stages):
        for mb, v_f, v_b in stage_versions(schedule, s):
            segment_start_version = (mb // span) * span // schedule.accumulation
            assert v_f >= segment_start_version and v_b <= segment_start_version + span // schedule.accumulation
        whole = schedules.build(name, stages, m, every).rows()[s]
        assert schedule.rows()[s][:len(whole)] == whole


def test_after_step_skips_the_step_and_its_evaluation_round():
    actions = list(after_step(schedules.build("1f1b", 2, 2, 3).actions(0), 2))
    assert actions == list(schedules.build("1f1b", 2, 2, 3).actions(0))[-5:]
    assert actions[0].op is Op.F and actions[0].microbatch == 4


@pytest.mark.parametrize("stages, m, k", [(8, 8, 8), (8, 4, 2), (16, 8, 4)])
def test_default_interval_keeps_the_drains_under_one_percent(stages, m, k):
    """The default interval against the simulator: one fill and drain per interval costs < 1% of the
    time of the run without drains (F = 1, B = 2), and where the interval is set by that rule
    (more than 100 steps), half of it would cost more."""
    from paci.sim import CostModel, simulate

    every = schedules.drain_interval(schedules.build("paci", stages, m, 1, k), m)
    steps = 4 * every * k // m
    costs = CostModel.per_stage(stages, forward=1.0, backward=2.0)
    plain = simulate(schedules.build("paci", stages, m, steps, k), costs).metrics.makespan
    drained = simulate(schedules.build("paci", stages, m, steps, k, every), costs).metrics.makespan
    assert 0 < drained / plain - 1 < 0.01
    if every > 100:
        per = m // math.gcd(m, k)  # optimizer steps per whole mini-batch
        half = schedules.build("paci", stages, m, steps, k, every // 2 // per * per)
        assert simulate(half, costs).metrics.makespan / plain - 1 >= 0.01


def _config(tmp_path, name: str, schedule: str = "paci", steps: int = 7, every: int = 3, optimizer: str = "adamw",
            **train):
    return load_config(None, {
        "model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
        "pipeline": {"schedule": schedule, "stages": 2, "microbatches": 4, "split": "uniform"},
        "optim": {"lr": 1e-2, "optimizer": optimizer},
        "train": {"steps": steps, "eval_every": 2, "eval_batches": 2, "out": str(tmp_path / name), "threads": 1,
                  "checkpoint_every": every, **train}})


def _records(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "tok_per_s")} for r in lines if not r.get("final")]


def _state(run_dir) -> list[dict]:
    manifest = latest(run_dir)
    return [load_stage(manifest, s, torch.device("cpu")) for s in range(len(manifest["stages"]))]


def _same(x, y) -> bool:
    """Equal bit for bit, tensors inside dicts, lists and tuples included."""
    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


def _assert_same_run(a, b) -> None:
    assert _records(a) == _records(b)
    for x, y in zip(_state(a), _state(b)):
        assert x["version"] == y["version"]
        assert _same(x["module"], y["module"])
        assert _same(x["optimizer"], y["optimizer"])


class _Stop(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("schedule, optimizer", [("paci", "adamw"), ("1f1b", "adamw"), ("interleaved-1f1b", "adamw"),
                                                ("paci", "muon")])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, schedule, optimizer):
    """Stopped by Ctrl-C in the middle of a segment, then resumed from the checkpoint before: the
    per-step losses, validation losses, weights and optimizer state (AdamW's moments, Muon's
    momentum) equal the uninterrupted run's."""
    whole = _config(tmp_path, "whole", schedule, optimizer=optimizer)
    train(whole)

    def stop_at_step_5(record):
        if record.get("step") == 5:
            raise _Stop

    stopped = _config(tmp_path, "stopped", schedule, optimizer=optimizer)
    with pytest.raises(_Stop):
        train(stopped, on_record=stop_at_step_5)
    assert latest(tmp_path / "stopped")["step"] == 3
    summary, _ = train(load_run_config(tmp_path / "stopped"), resume=True)
    assert summary["steps"] == 7 and summary["versions_verified"]
    _assert_same_run(tmp_path / "whole", tmp_path / "stopped")
    if schedule != "paci":  # a flush schedule drains every step: checkpoints change nothing
        train(_config(tmp_path, "never", schedule, every=0))
        _assert_same_run(tmp_path / "whole", tmp_path / "never")


@pytest.mark.parametrize("schedule", ["paci", "1f1b"])
def test_a_stop_drains_within_a_step_and_resumes_equal_to_a_run_with_a_drain_there(tmp_path, schedule):
    """A stop requested during step 4 of 12 (checkpoints every 10): stage 0 drains before its next
    step, the checkpoint there records the drain point it added, and the resumed run equals, record
    for record and in every weight and moment, an uninterrupted run with a drain point at that step.
    For 1F1B, which drains every step anyway, that is the run without it."""
    stop = StopRequest(())  # no signal handler: the test asks for the stop itself

    def ask_at_step_4(record):
        if record.get("step") == 4:
            stop.requested = True

    stopped = _config(tmp_path, "stopped", schedule, steps=12, every=10, eval_every=4)
    with pytest.raises(Stopped):
        train(stopped, on_record=ask_at_step_4, stop=stop)
    manifest = latest(tmp_path / "stopped")
    step = manifest["step"]
    assert 4 <= step <= 6 and manifest["drains"] == [step]  # within about a step; 10 would be the scheduled one
    summary, _ = train(load_run_config(tmp_path / "stopped"), resume=True)
    assert summary["steps"] == 12 and summary["versions_verified"]
    train(_config(tmp_path, "drained", schedule, steps=12, every=10, eval_every=4), drains=(step,))
    _assert_same_run(tmp_path / "drained", tmp_path / "stopped")
    if schedule == "1f1b":
        train(_config(tmp_path, "plain", schedule, steps=12, every=10, eval_every=4))
        _assert_same_run(tmp_path / "plain", tmp_path / "stopped")


def test_a_corrupt_stage_file_falls_back_to_the_checkpoint_before(tmp_path, caplog):
    train(_config(tmp_path, "whole"))
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "whole", run)
    newest = run / "checkpoints" / "step-000007" / "stage-1.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    assert latest(run)["step"] == 6
    assert "fails its checksum" in caplog.text
    train(load_run_config(run), resume=True)
    _assert_same_run(tmp_path / "whole", run)


def test_only_the_two_newest_complete_checkpoints_are_kept(tmp_path):
    train(_config(tmp_path, "run", steps=9, every=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000008", "step-000009"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    """A stage file whose pickle calls os.system (with a checksum that matches) is not loaded."""
    monkeypatch.chdir(tmp_path)
    train(_config(tmp_path, "run"))
    folder = tmp_path / "run" / "checkpoints" / "step-000007"
    path = folder / "stage-0.pt"
    torch.save({"module": _Exploit()}, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    import hashlib
    manifest["stages"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_stage(latest(tmp_path / "run"), 0, torch.device("cpu"))
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_other_settings_naming_the_field(tmp_path):
    train(_config(tmp_path, "run"))
    with pytest.raises(CheckpointError, match=r"optimizer\.lr = 0\.01, this run has optimizer\.lr = 0\.02"):
        make_plan(load_run_config(tmp_path / "run", {"optim": {"lr": 2e-2}}), resume=True)
    with pytest.raises(CheckpointError, match="precision"):
        make_plan(load_run_config(tmp_path / "run", {"train": {"precision": "bf16"}}), resume=True)


def test_two_runs_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, "x")
    config.train.out = None
    first, second = to_run(make_plan(config)), to_run(make_plan(config))
    assert first.run_dir == second.run_dir  # same name: same schedule, same second
    claim_run_dir(first)
    claim_run_dir(second)
    assert first.run_dir != second.run_dir and second.run_dir.name == first.run_dir.name + "-2"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout, how", [(["--nproc", "1"], signal.SIGINT),
                                         pytest.param(["--nproc", "2"], signal.SIGTERM, marks=pytest.mark.dist),
                                         pytest.param(["--dp", "2"], signal.SIGTERM, marks=pytest.mark.dist)],
                         ids=["ctrl-c", "sigterm-nproc2", "sigterm-dp2"])
@pytest.mark.slow
def test_a_signal_drains_saves_and_stops_within_a_step_and_resume_equals_a_run_with_that_drain(tmp_path, layout, how):
    """`paci train` given Ctrl-C (or SIGTERM) mid-run drains at the next step boundary, saves a
    checkpoint there and stops: exit 130, the resume command, no traceback, within a couple of
    steps of the signal (not at the next scheduled checkpoint, up to 10 steps away), the drain
    point it added recorded in the checkpoint. `--resume` finishes the run, and its losses and
    weights equal, bit for bit, an uninterrupted run with a drain point at that step (the
    single-process run, which a launched one equals; with two data-parallel replicas, 4 ranks, a
    --dp 2 run)."""
    flags = ["--preset", "tiny", "--stages", "2", *layout, "--microbatches", "4", "--batch-size", "2",
             "--seq-len", "16", "--steps", "60", "--checkpoint-every", "10", "--eval-every", "50", "--split",
             "uniform", "--threads", "1", "--lr", "1e-2"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "paci", "train", *flags, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "checkpoints" / "step-000010" / "manifest.json").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    while time.monotonic() < deadline and max(_steps(run)) < 13:  # mid-segment
        time.sleep(0.02)
    recorded = _steps(run)  # steps already done when the signal comes
    proc.send_signal(how)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in stderr and "saving a checkpoint" in stderr, stderr
    assert "Traceback" not in stderr
    manifest = latest(run)
    stopped_at = manifest["step"]
    assert max(recorded) <= stopped_at <= max(recorded) + 3 and stopped_at < 20, (recorded, stopped_at)
    assert manifest.get("drains", []) == ([] if stopped_at % 10 == 0 else [stopped_at])
    assert max(_steps(run)) == stopped_at  # it stopped where it saved
    done = subprocess.run([sys.executable, "-m", "paci", "train", "--resume", str(run), *layout],
                          capture_output=True, text=True, timeout=200)  # rank 0 says where it resumes
    assert done.returncode == 0, done.stderr
    assert f"resuming after step {stopped_at}" in done.stderr
    config = load_config(None, {"model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
                                "pipeline": {"stages": 2, "microbatches": 4, "split": "uniform",
                                             "dp": 2 if "--dp" in layout else 1},
                                "optim": {"lr": 1e-2},
                                "train": {"steps": 60, "checkpoint_every": 10, "eval_every": 50, "threads": 1,
                                          "out": str(tmp_path / "whole")}})
    drains = tuple(manifest.get("drains", []))
    if "--dp" in layout:
        assert spawn(train_drained, (config, drains), 4, threads=1) == 0
    else:
        train(config, drains=drains)
    _assert_same_run(tmp_path / "whole", run)


def _steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    records = [json.loads(line) for line in lines]
    return [0] + [r["step"] for r in records if "loss" in r and not r.get("final")]
