"""The command line: outputs users read, files written, and bad input → one line, exit code 2.

Commands run through `paci.cli.main` in-process (fast); one smoke test runs the real entry point.
"""

import json
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("argv, fragment", [
    (["simulate", "--schedule", "nope"], "choose one of: gpipe"),
    (["simulate", "--stages", "0"], "stages must be an integer >= 1"),
    (["simulate", "--microbatches", "0"], "micro-batches must be an integer >= 1"),
    (["simulate", "--accum", "0"], "K must be >= 1"),
    (["simulate", "--schedule", "1f1b", "--accum", "3"], "drop --accum"),
    (["simulate", "--costs", "1;2"], "--costs expects F,B or F,B,W"),
    (["simulate", "--timeline", "x.svg"], "use a .png or .txt"),
    (["simulate", "--csv", "missing.csv"], "no such file"),
    (["simulate", "--stages", "two"], "invalid int value"),
])
def test_simulate_bad_input_is_one_line_exit_2(capsys, argv, fragment):
    """Every invalid simulate argument: exit code 2 and a single actionable line on stderr."""
    code, _, err = run_exit(capsys, argv)
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_simulate_bad_csv_is_exit_2(capsys, tmp_path):
    """A malformed CSV is reported with its line, exit code 2."""
    path = tmp_path / "bad.csv"
    path.write_text("0F0,0X1\n")
    code, _, err = run_exit(capsys, ["simulate", "--csv", str(path)])
    assert code == 2 and "CSV line 1" in err


def run_exit(capsys, argv) -> tuple[int, str, str]:
    """Like `run`, but argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# paci train


TINY = ["--preset", "tiny", "--steps", "4", "--stages", "2", "--microbatches", "2", "--batch-size", "2",
        "--seq-len", "16", "--eval-every", "2"]


@pytest.mark.parametrize("extra, fragment", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--stages", "9"], "9 stages but the model has only 6 units"),
    (["--schedule", "paci", "--accum", "0"], "accum must be an integer >= 1"),
    (["--data", "does/not/exist"], "does/not/exist"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--compensate", "magic"], "unknown --compensate 'magic'; choose one of: none, pipemare, nesterov, predict"),
    (["--optimizer", "sgd"], "unknown --optimizer 'sgd'; choose one of: adamw, nadamw"),
    (["--schedule", "2bw", "--compensate", "predict"], "--compensate predict moves live weights; 2bw stashes"),
    (["--optimizer", "nadamw", "--compensate", "predict"], "predicts AdamW's steps; use it with --optimizer adamw"),
    (["--beta1", "1"], "--beta1 must be in [0, 1)"),
    (["--precision", "fp16"], "unknown --precision 'fp16'; choose one of: fp32, bf16"),
    (["--warmup=-1"], "warmup_steps must be >= 0"),
    (["--nproc", "3"], "--nproc 3 must equal --stages 2"),
])
def test_train_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, extra, fragment):
    """Bad train input: exit code 2, one actionable line, and no run directory."""
    out_dir = tmp_path / "run"
    code, _, err = run_exit(capsys, ["train", *TINY, *extra, "--out", str(out_dir)])
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


def test_train_rejects_empty_data_and_too_small_corpus(capsys, tmp_path):
    """An empty data folder, and a corpus too small for one batch, are refused before anything is written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n" * 3)
    for data in (empty, small):
        code, _, err = run_exit(capsys, ["train", *TINY, "--data", str(data), "--out", str(tmp_path / "run")])
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_used_run_directory(capsys, tmp_path):
    """--out pointing at a non-empty folder is refused, and the folder is left as it was."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    code, _, err = run_exit(capsys, ["train", *TINY, "--out", str(used)])
    assert code == 2 and "not empty" in err
    assert [p.name for p in used.iterdir()] == ["keep.txt"]


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


def test_train_port_in_use_is_exit_2(capsys, tmp_path):
    """--port naming a port that is taken: one actionable line, exit code 2, nothing written."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_exit(capsys, ["train", *TINY, "--nproc", "2", "--port", str(port), "--out",
                                         str(tmp_path / "run")])
    assert code == 2 and f"port {port} is in use" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
