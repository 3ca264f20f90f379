"""Multi-process runtime over gloo: bit-identical to the single-process path, and failures end the run.

These spawn real ranks (spawn start method, free port). Select them with `-m dist`.
"""

import json
import time

import pytest
import torch
from dist_helpers import train_each

from paci.config import load_config
from paci.runtime.launch import spawn
from paci.schedules import REGISTRY
from paci.train import train

pytestmark = pytest.mark.dist


def _config(name: str, stages: int, out, nproc: int):
    return load_config(None, {
        "model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
        "pipeline": {"schedule": name, "stages": stages, "microbatches": 4, "nproc": nproc, "timeout_s": 30.0},
        "optim": {"lr": 1e-2}, "train": {"steps": 3, "eval_every": 2, "eval_batches": 2, "out": str(out),
                                         "threads": 1}})


def _losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in lines if not r.get("final")]


def _weights(run_dir, stages: int) -> list[dict]:
    return [torch.load(run_dir / "checkpoints" / f"stage-{s}.pt", weights_only=False)["module"] for s in range(stages)]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stages", [2, 3])
def test_multiprocess_is_bit_identical_to_single_process(tmp_path, stages):
    """For every schedule: per-step losses and final parameters of the gloo run equal the local run's bit for bit,
    and every rank's recorded (v_f, v_b) equal the simulator's (checked inside the run)."""
    names = list(REGISTRY)
    distributed = [_config(name, stages, tmp_path / f"dist-{name}", stages) for name in names]
    start = time.monotonic()
    assert spawn(train_each, distributed, stages, threads=1) == 0
    elapsed = time.monotonic() - start
    for name in names:
        local_dir, dist_dir = tmp_path / f"local-{name}", tmp_path / f"dist-{name}"
        train(_config(name, stages, local_dir, 1))
        assert _losses(dist_dir) == _losses(local_dir), name
        for local, remote in zip(_weights(local_dir, stages), _weights(dist_dir, stages)):
            assert local.keys() == remote.keys()
            assert all(torch.equal(local[k], remote[k]) for k in local), name
        summary = json.loads((dist_dir / "summary.json").read_text())
        assert summary["versions_verified"] and summary["tokens"] == 3 * 4 * 2 * 16  # steps x M x B x T
    assert elapsed < 120
