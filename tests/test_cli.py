"""The command line: outputs users read and files written (bad input: tests/test_bad_input.py).

Commands run through `paci.cli.main` in-process (fast); one smoke test runs the real entry point.
"""

import json
import subprocess
import sys

import pytest

from cli_helpers import paci
from paci.cli import main
from paci.schedules import REGISTRY


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_schedules_lists_every_registered_schedule(capsys):
    """`paci schedules` prints one line per registered schedule."""
    code, out, _ = run(capsys, "schedules")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == list(REGISTRY)


def test_simulate_json_has_the_documented_keys(capsys):
    """`paci simulate --json` is one object with the headline metrics and per-stage details."""
    code, out, _ = run(capsys, "simulate", "--schedule", "paci", "--stages", "4", "--microbatches", "4",
                       "--steps", "3", "--json")
    result = json.loads(out)
    assert code == 0
    for key in ("makespan", "bubble_fraction", "steady_bubble_fraction", "throughput", "max_drift", "per_stage"):
        assert key in result
    assert result["max_drift"] == 1 and result["steady_bubble_fraction"] == 0.0
    for key in ("busy", "idle", "max_drift", "drift_histogram", "peak_inflight", "peak_bytes", "weight_copies"):
        assert key in result["per_stage"][0]
    assert [s["max_drift"] for s in result["per_stage"]] == [1, 1, 1, 0]


def test_simulate_times_a_synchronous_start(capsys):
    """`paci simulate --sync-steps N` times the schedule paci train runs with it: between plain PACI
    and 1F1B-flush, with the same drift bound."""
    makespan = {}
    for label, extra in (("paci", []), ("started", ["--sync-steps", "2"]), ("1f1b", None)):
        args = ["simulate", "--schedule", "1f1b" if extra is None else "paci", "--stages", "4", "--microbatches", "4",
                "--steps", "4", "--json", *(extra or [])]
        code, out, _ = run(capsys, *args)
        assert code == 0
        makespan[label] = json.loads(out)["makespan"]
        if label == "started":
            assert json.loads(out)["max_drift"] == 1
    assert makespan["paci"] < makespan["started"] < makespan["1f1b"], makespan


def test_simulate_compare_covers_every_schedule(capsys):
    """`--compare` gives one row per schedule, throughput and memory relative to 1F1B-flush."""
    code, out, _ = run(capsys, "simulate", "--compare", "--stages", "4", "--microbatches", "8", "--json")
    rows = {row["schedule"]: row for row in json.loads(out)["schedules"]}
    assert code == 0 and set(rows) == set(REGISTRY)
    assert rows["1f1b"]["throughput_vs_1f1b"] == 1.0
    assert rows["paci"]["peak_bytes_vs_1f1b"] == 1.0 and rows["paci"]["extra_weight_copies"] == 0
    assert rows["pipedream"]["extra_weight_copies"] == 3 and rows["paci"]["throughput_vs_1f1b"] > 1.0
    code, out, _ = run(capsys, "simulate", "--compare", "--stages", "4", "--microbatches", "8")
    assert code == 0 and all(name in out for name in REGISTRY)


def test_simulate_compare_with_accum_keeps_the_1f1b_reference(capsys):
    """--compare --accum K: the schedules that cannot take K say why, the rest stay relative to 1F1B-flush."""
    code, out, _ = run(capsys, "simulate", "--compare", "--stages", "3", "--microbatches", "4", "--accum", "2",
                       "--json")
    rows = {row["schedule"]: row for row in json.loads(out)["schedules"]}
    assert code == 0 and "drop --accum" in rows["1f1b"]["note"] and "K = 1" in rows["pipedream"]["note"]
    assert rows["paci"]["throughput_vs_1f1b"] > 1.0 and rows["paci"]["note"] == ""


def test_simulate_writes_timeline_and_trace(capsys, tmp_path):
    """--timeline (.txt and .png) and --trace write their files."""
    for name in ("t.txt", "t.png"):
        code, _, _ = run(capsys, "simulate", "--stages", "3", "--microbatches", "3", "--timeline", str(tmp_path / name),
                         "--trace", str(tmp_path / "trace.json"))
        assert code == 0
    assert "stage 2 |" in (tmp_path / "t.txt").read_text()
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_simulate_reads_torch_pipelining_csv(capsys, tmp_path):
    """A GPipe order written by torch.distributed.pipelining simulates exactly like paci's own gpipe."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    rows = visualizer.get_schedule_ops("GPipe", 3, 4)
    path = tmp_path / "gpipe.csv"
    path.write_text("\n".join(",".join(str(a) if a else "" for a in row) for row in rows) + "\n")
    _, theirs, _ = run(capsys, "simulate", "--csv", str(path), "--json")
    _, ours, _ = run(capsys, "simulate", "--schedule", "gpipe", "--stages", "3", "--microbatches", "4", "--steps",
                     "1", "--json")
    assert json.loads(theirs)["makespan"] == json.loads(ours)["makespan"]


@pytest.mark.parametrize("ranks, chunks, microbatches", [(2, 2, 4), (4, 2, 8), (3, 3, 6)])
def test_simulate_reads_torch_interleaved_csv(capsys, tmp_path, ranks, chunks, microbatches):
    """torch's ScheduleInterleaved1F1B, written as its CSV (one line per rank, several stages on each),
    simulates in paci with the makespan and bubble of paci's own interleaved-1f1b."""
    visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    rows = visualizer.get_schedule_ops("Interleaved1F1B", ranks, microbatches, num_stages_per_rank=chunks)
    path = tmp_path / "interleaved.csv"
    path.write_text("\n".join(",".join(str(a) if a else "" for a in row) for row in rows) + "\n")
    _, theirs, _ = run(capsys, "simulate", "--csv", str(path), "--json")
    _, ours, _ = run(capsys, "simulate", "--schedule", "interleaved-1f1b", "--stages", str(ranks), "--chunks",
                     str(chunks), "--microbatches", str(microbatches), "--steps", "1", "--json")
    theirs, ours = json.loads(theirs), json.loads(ours)
    assert (theirs["num_stages"], theirs["num_ranks"]) == (ranks * chunks, ranks)
    assert theirs["makespan"] == ours["makespan"] and theirs["bubble_fraction"] == ours["bubble_fraction"]


# ----------------------------------------------------------------------------------------------
# paci train


def test_train_end_to_end_reduces_the_loss(tmp_path):
    """`python -m paci train` on the tiny preset lowers the validation loss and writes the run directory."""
    out_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "paci", "train", "--preset", "tiny", "--steps", "30", "--stages", "3",
                           "--microbatches", "4", "--batch-size", "4",
                           "--eval-every", "15", "--lr", "3e-3", "--out", str(out_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.3
    assert summary["steps"] == 30 and summary["max_drift"] == 1
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "checkpoints/step-000030/stage-2.pt",
                 "checkpoints/step-000030/manifest.json"):
        assert (out_dir / name).exists(), name
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(31))
    assert all("drift_histogram" in r for r in records[1:])


@pytest.mark.parametrize("nproc", [1, 2])
def test_each_output_has_an_off_switch_that_changes_nothing_else(tmp_path, nproc):
    """--no-eval --no-checkpoint --no-trace --no-plots: the run directory holds only config.json,
    metrics.jsonl and summary.json, no validation record, and the training losses equal, bit for bit,
    those of the same run with every output on (validation and drain points change no weight here)."""
    common = ["train", "--preset", "tiny", "--steps", "3", "--stages", "2", "--microbatches", "2", "--batch-size", "2",
              "--nproc", str(nproc), "--json", "--split", "uniform"]  # a profiled split could differ between the runs
    runs = {}
    for name, switches in (("all", []), ("none", ["--no-eval", "--no-checkpoint", "--no-trace", "--no-plots"])):
        done = paci(*common, *switches, "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]
    written = {p.name for p in (tmp_path / "all").iterdir()}
    assert {"checkpoints", "loss.png"} <= written
    assert ({"trace.json", "timeline.png", "timeline_predicted.png"} <= written) == (nproc > 1)
    assert not any("val_loss" in r for r in runs["none"]) and sum("val_loss" in r for r in runs["all"]) == 2
    assert [r["loss"] for r in runs["none"] if "loss" in r] == [r["loss"] for r in runs["all"] if "loss" in r]
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert summary["final_val_loss"] is None and summary["final_train_loss"] == [r["loss"] for r in runs["none"] if "loss" in r][-1]
