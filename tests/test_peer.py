"""experiments/peer.py: our 1F1B computes what torch.distributed.pipelining's Schedule1F1B computes, and the
experiment runs, caches its cells and resumes. Both spawn two gloo ranks; select them with `-m dist`."""

import json
import sys
from pathlib import Path

import pytest
import torch

from paci.model import PRESETS, num_units
from paci.partition import uniform_split
from paci.runtime.launch import spawn

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import peer  # noqa: E402  (experiments/ is not a package)

pytestmark = pytest.mark.dist


@pytest.mark.timeout(120)
def test_peer_one_flush_step_matches_torch_schedule_1f1b(tmp_path):
    """Tiny GPT, P = 2, m = 4: one step of our 1F1B and one Schedule1F1B.step() from the same weights and
    micro-batches give the same per-micro-batch losses and the same gradient for every parameter, to 1e-5."""
    model = PRESETS["tiny"]
    work = peer.make_work("tiny", tuple(uniform_split(num_units(model), 2)), steps=1, warmup=0,
                          batch_size=2, seq_len=16)
    assert spawn(peer.gradient_rank, (work, 4, str(tmp_path)), 2, threads=1) == 0
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        ours, theirs = result["ours"], result["torch"]
        assert ours["grads"].keys() == theirs["grads"].keys() and ours["grads"]
        for name, grad in ours["grads"].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grad, theirs["grads"][name], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(ours["losses"], theirs["losses"], atol=1e-5, rtol=0)
    assert len(torch.load(tmp_path / "rank1.pt")["ours"]["losses"]) == 4  # the last rank holds the losses


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_peer_quick_run_caches_and_resumes(tmp_path, capsys):
    """`peer.py --quick` measures 5 cells and writes the table and the plot; run again, it measures nothing."""
    assert peer.main(["--quick", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    cells = sorted(tmp_path.glob("m4-*.json"))
    assert len(cells) == 5 and "0 of 5 cells cached" in first
    assert all(json.loads(path.read_text())["tokens_per_s"] > 0 for path in cells)
    assert (tmp_path / "peer.png").stat().st_size > 0 and "torch Schedule1F1B" in (tmp_path / "results.md").read_text()
    assert peer.main(["--quick", "--out", str(tmp_path)]) == 0
    second = capsys.readouterr().out
    assert "5 of 5 cells cached" in second and "measured 0 cells" in second
