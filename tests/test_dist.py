"""Multi-process runtime over gloo: bit-identical to the single-process path, and failures end the run.

These spawn real ranks (spawn start method, free port). Select them with `-m dist`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import paci
from dist_helpers import descendants, kill_tree, train_each

from paci.checkpoint import latest, load_stage
from paci.config import load_config
from paci.runtime.launch import free_port, rank_pids, spawn
from paci.schedules import REGISTRY
from paci.train import train

pytestmark = pytest.mark.dist


# every schedule, PACI with recompute and compensations, clipping by the global norm (1f1b) and
# by each stage's own (paci, after delay compensation): (label, schedule, options)
RUNS = [(name, name, {}) for name in REGISTRY] + [
    ("paci-recompute-nesterov", "paci", {"recompute": True, "compensate": "nesterov"}),
    ("paci-predict-bf16", "paci", {"compensate": "predict", "precision": "bf16"}),
    ("1f1b-clip", "1f1b", {"clip_grad_norm": 0.05}), ("paci-clip-dc", "paci", {"clip_grad_norm": 0.05, "compensate": "dc"}),
    ("paci-muon", "paci", {"optimizer": "muon"}), ("paci-sync-start", "paci", {"sync_steps": 1})]


def _config(name: str, stages: int, out, nproc: int, options: dict | None = None):
    options = options or {}
    return load_config(None, {
        "model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
        "pipeline": {"schedule": name, "stages": stages, "microbatches": 4, "nproc": nproc, "timeout_s": 30.0,
                     "split": "uniform", "recompute": options.get("recompute", False),
                     "sync_steps": options.get("sync_steps", 0)},
        "optim": {"lr": 1e-2, "compensate": options.get("compensate", "none"), "optimizer": options.get("optimizer", "adamw"),
                  "clip_grad_norm": options.get("clip_grad_norm", 0.0)},
        "train": {"steps": 3, "eval_every": 2, "eval_batches": 2, "out": str(out), "threads": 1,
                  "precision": options.get("precision", "fp32")}})


def _losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in lines if not r.get("final")]


def _weights(run_dir) -> list[dict]:
    """Every stage's weights in the newest checkpoint (an interleaved run has more stages than ranks)."""
    manifest = latest(run_dir)
    return [load_stage(manifest, s, torch.device("cpu"))["module"] for s in range(len(manifest["stages"]))]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [2, 3])
def test_multiprocess_is_bit_identical_to_single_process(tmp_path, stages):
    """For every schedule (and PACI with recompute and compensation): per-step losses and final parameters of the
    gloo run equal the local run's bit for bit, and every rank's recorded (v_f, v_b) equal the simulator's (checked
    inside the run)."""
    distributed = [_config(schedule, stages, tmp_path / f"dist-{name}", stages, options)
                   for name, schedule, options in RUNS]
    start = time.monotonic()
    assert spawn(train_each, distributed, stages, threads=1) == 0
    elapsed = time.monotonic() - start
    for name, schedule, options in RUNS:
        local_dir, dist_dir = tmp_path / f"local-{name}", tmp_path / f"dist-{name}"
        train(_config(schedule, stages, local_dir, 1, options))
        assert _losses(dist_dir) == _losses(local_dir), name
        for local, remote in zip(_weights(local_dir), _weights(dist_dir)):
            assert local.keys() == remote.keys()
            assert all(torch.equal(local[k], remote[k]) for k in local), name
        summary = json.loads((dist_dir / "summary.json").read_text())
        assert summary["versions_verified"] and summary["tokens"] == 3 * 4 * 2 * 16  # steps x M x B x T
    assert elapsed < 120


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_run(tmp_path, layout: tuple[str, ...] = ("--nproc", "3")) -> tuple[subprocess.Popen, list[int]]:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "paci", "train", "--preset", "tiny", *layout, "--steps",
                             "2000", "--timeout", "10", "--out", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and '"loss"' in metrics.read_text():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == (4 if "--dp" in layout else 3)
    return proc, ranks


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault, layout", [(signal.SIGKILL, ("--nproc", "3")), (signal.SIGSTOP, ("--nproc", "3")),
                                           (signal.SIGKILL, ("--stages", "2", "--dp", "2"))],
                         ids=["dies", "hangs", "replica-dies"])
@pytest.mark.slow
def test_failed_rank_stops_every_rank(tmp_path, fault, layout):
    """A rank that dies or hangs mid-run: every rank exits within 60 s (a frozen one is found by its silent
    heartbeat), non-zero, the launcher's last line names the failed rank, no orphan processes left behind.
    With --dp 2 x 2 stages, rank 2 is replica 1's first stage: its death stops every replica."""
    proc, ranks = _start_run(tmp_path, layout)
    victim = ranks[2] if fault == signal.SIGKILL else ranks[1]
    os.kill(victim, fault)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < (60 if fault == signal.SIGKILL else 30)  # a frozen rank: the heartbeat, ~10 s
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert ("rank 2 was killed" if fault == signal.SIGKILL else "rank 1 stopped responding") in last, stderr
    assert not any(_alive(pid) for pid in ranks)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("schedule", ["1f1b", "paci"])
def test_data_parallel_equals_one_pipeline_on_twice_the_batch(tmp_path, schedule):
    """`--dp 2 --stages 2` (4 ranks; each replica takes --batch-size 2 of every micro-batch's 4
    sequences, the two copies of a stage average gradients at its step) records the losses,
    validation losses and final weights of `--nproc 2 --batch-size 4`, to float rounding: the mean of
    two half-batch means is added in another order (losses rel 1e-5; weights 1e-4 absolute, 1% of one
    step at lr 1e-2: AdamW divides by the root of the second moment, which magnifies rounding in the
    smallest gradients). Checkpoints hold one file per stage."""
    flags = ["--preset", "tiny", "--stages", "2", "--microbatches", "4", "--seq-len", "16", "--steps", "6",
             "--eval-every", "3", "--split", "uniform", "--threads", "1", "--lr", "1e-2", "--schedule", schedule]
    for name, layout in (("dp", ["--dp", "2", "--batch-size", "2"]), ("one", ["--nproc", "2", "--batch-size", "4"])):
        done = paci("train", *flags, *layout, "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-2000:]
    dp, one = _losses(tmp_path / "dp"), _losses(tmp_path / "one")
    assert [row[0] for row in dp] == [row[0] for row in one]
    for a, b in zip(dp, one):
        for x, y in zip(a[1:3], b[1:3]):  # the training loss and the validation loss, where recorded
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-5)
    files = sorted(p.name for p in Path(latest(tmp_path / "dp")["folder"]).iterdir())
    assert files == ["manifest.json", "stage-0.pt", "stage-1.pt"]
    for mine, theirs in zip(_weights(tmp_path / "dp"), _weights(tmp_path / "one")):
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-4)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_ranks_die_with_their_launcher(tmp_path, how):
    """Killing `paci train --nproc 3` itself leaves no rank running; SIGTERM twice is a clean stop at
    once (exit 130, one line naming the checkpoint to resume from, no traceback)."""
    proc, ranks = _start_run(tmp_path)
    proc.send_signal(how)
    if how == signal.SIGTERM:  # the first asks for a prompt stop (a drain and a save: over a second); the second
        time.sleep(0.1)        # stops at once
        proc.send_signal(how)
    _, stderr = proc.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks)
    if how == signal.SIGTERM:
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        assert "no checkpoint was complete yet" in stderr or "--resume" in stderr, stderr


def _torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), *args]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_one_node_and_two_nodes_match(tmp_path):
    """`python -m paci train` runs unchanged under torchrun, on one node and as two "nodes" on one
    machine (static rendezvous on 127.0.0.1), and both give the same losses. Both run one torch thread per
    rank (torchrun sets OMP_NUM_THREADS=1 only with several ranks per node; a different thread count may
    change the order of float reductions)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "paci", "train", "--preset", "tiny", "--steps", "3", "--microbatches", "4", "--batch-size", "2",
             "--seq-len", "16", "--eval-every", "3", "--split", "uniform"]
    one = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *train, "--out", str(tmp_path / "one")),
                         capture_output=True, text=True, timeout=180, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(free_port())
    nodes = [subprocess.Popen(_torchrun("--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                                        "--rdzv-endpoint", f"127.0.0.1:{port}", *train, "--out", str(tmp_path / "two")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert _losses(tmp_path / "one") == _losses(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["versions_verified"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_restart_resumes_from_the_last_checkpoint(tmp_path):
    """Under `torchrun --max-restarts 1`, a rank killed mid-run makes torchrun restart the workers,
    which resume --out from its newest checkpoint; the result equals an uninterrupted run bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "paci", "train", "--preset", "tiny", "--steps", "150", "--microbatches", "4", "--batch-size", "2",
             "--seq-len", "16", "--eval-every", "200", "--split", "uniform", "--checkpoint-every", "10"]
    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *train,
                                      "--out", str(run)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run / "checkpoints" / "step-000020" / "manifest.json").exists():
            if proc.poll() is not None:
                pytest.fail("the first attempt ended early:\n" + proc.communicate()[1][-4000:])
            time.sleep(0.1)
        workers = [pid for pid in descendants(proc.pid)
                   if b"paci\x00train" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=200)
    finally:  # a failing test leaves no torchrun behind
        kill_tree(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    assert "restarted by torchrun; resuming" in stderr
    whole = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *train, "--out", str(tmp_path / "whole")),
                           capture_output=True, text=True, timeout=200, env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert _losses(run) == _losses(tmp_path / "whole")
    for a, b in zip(_weights(run), _weights(tmp_path / "whole")):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_world_size_must_match_stages(tmp_path):
    """Under torchrun, a --stages that disagrees with the world size: each rank prints one actionable line and
    exits with code 2, no traceback from paci (torchrun then reports the failure and exits 1 itself)."""
    run = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", "-m", "paci", "train", "--preset", "tiny",
                                   "--stages", "3", "--steps", "1", "--out", str(tmp_path / "run")),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("paci:")]
    assert len(ours) == 2 and all("pass --stages 2" in line for line in ours), run.stderr
    assert "exitcode  : 2" in run.stderr
    assert f"{os.sep}paci{os.sep}" not in run.stderr  # no frame of ours in any traceback
    assert not (tmp_path / "run").exists()
