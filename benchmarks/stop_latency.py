"""How soon a signal stops `paci train`: seconds from SIGTERM to the command's exit, with a checkpoint.

Runs `python -m paci train --preset tiny --steps 600` with `--nproc 2` and with `--dp 2` (4 ranks),
default checkpoint interval (100 steps), and a user's script, `examples/long_run.py --stages 2`
(checkpoints every 100 steps), under `torchrun --nproc-per-node 2`, and sends SIGTERM (to paci, or
to torchrun, which passes it on) once metrics.jsonl has recorded step `--at` (mid-segment). Reports the time to exit, the steps recorded at the signal and in the
checkpoint it stopped at, the median step time of the run before the signal, and the budget the
project holds a stop to: max(5 s, two step times). Each run must exit with 130 and leave a complete
checkpoint (its manifest), or the script fails.

`--against DIR` runs the same commands from another checkout (e.g. a git worktree of a commit
before the prompt stop, which waited for the next scheduled checkpoint), side by side.

    .venv/bin/python benchmarks/stop_latency.py [--repeats 3] [--against /tmp/before]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "paci", "train", "--preset", "tiny", "--steps", "600", "--json", "--eval-every", "1000"]
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
EXAMPLE = ["examples/long_run.py", "--stages", "2", "--steps", "2000", "--eval-every", "1000", "--checkpoint-every",
           "100"]
LAYOUTS = {"paci train --nproc 2": [sys.executable, *TRAIN, "--nproc", "2"],
           "paci train --dp 2 (4 ranks)": [sys.executable, *TRAIN, "--stages", "2", "--dp", "2"],
           "torchrun, 2 ranks: examples/long_run.py": [*TORCHRUN, *EXAMPLE]}
LAYOUTS_TORCHRUN = LAYOUTS["torchrun, 2 ranks: examples/long_run.py"]


def _records(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def stop_once(repo: Path, command: list[str], out: Path, at: int) -> dict:
    argv = [*command, "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while max((r["step"] for r in _records(out / "metrics.jsonl") if "loss" in r), default=0) < at:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{' '.join(argv)} ended before step {at}:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    steps = [r for r in _records(out / "metrics.jsonl") if "loss" in r and not r.get("final")]
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    latency = time.perf_counter() - sent
    if proc.returncode != (1 if command is LAYOUTS_TORCHRUN else 130):  # torchrun reports its workers' 130 as 1
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode} after SIGTERM:\n{stderr[-2000:]}")
    saved = sorted(p for p in (out / "checkpoints").iterdir() if (p / "manifest.json").exists())
    walls = [r["wall_s"] for r in steps]
    return {"latency": latency, "signal_step": steps[-1]["step"], "stop_step": int(saved[-1].name.split("-")[1]),
            "step_s": statistics.median(b - a for a, b in zip(walls, walls[1:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at", type=int, default=20, help="send SIGTERM once this step is recorded")
    parser.add_argument("--against", type=Path, help="another paci checkout to time side by side (the 'before')")
    args = parser.parse_args()
    repos = {"this checkout": ROOT, **({f"{args.against}": args.against.resolve()} if args.against else {})}
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so that drift in the machine's load hits every row alike
            for name, repo in repos.items():
                for label, command in LAYOUTS.items():
                    out = Path(tmp) / str(sum(map(len, runs.values())))
                    runs.setdefault((name, label), []).append(stop_once(repo, command, out, args.at))
    print(f"machine: {machine()}")
    print(f"median of {args.repeats}; SIGTERM once step {args.at} is recorded; checkpoints every 100 steps "
          "(torchrun exits 1 for its workers' 130)\n")
    print("| paci | run | signal -> exit (s) | step at signal -> saved | step time (s) | budget max(5 s, 2 steps) |")
    print("|---|---|---|---|---|---|")
    for (name, label), got in runs.items():
        latency = statistics.median(g["latency"] for g in got)
        step_s = statistics.median(g["step_s"] for g in got)
        stops = ", ".join(f"{g['signal_step']} -> {g['stop_step']}" for g in got)
        budget = max(5.0, 2 * step_s)
        print(f"| {name} | {label} | {latency:.2f} | {stops} | {step_s:.3f} | {budget:.1f} s: "
              f"{'within' if latency <= budget else 'over'} |")


if __name__ == "__main__":
    main()
