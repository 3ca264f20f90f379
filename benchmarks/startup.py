"""Start-up time of `paci train`: seconds from the command to its first optimizer step, and to its end.

Runs `python -m paci train --preset tiny --steps 2` (a run whose training takes a fraction of a
second, so the rest is start-up and finishing) in one process and with --nproc 2 and 4, a few
times each, and reads the moment the first step's line lands in metrics.jsonl. Beside it, the
floor: one Python process that imports torch and builds an AdamW (torch.optim pulls in
torch._dynamo), which every process of every run pays at least once.

`--against DIR` runs the same commands from another checkout of paci as well (e.g. a git worktree
of an older commit), side by side in the same run, for a before/after table.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--against /tmp/before]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
FLOOR = "import torch; torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"


def first_step(repo: Path, nproc: int, out: Path) -> tuple[float, float]:
    """(seconds to the first step's record in metrics.jsonl, seconds to the command's exit)."""
    argv = [sys.executable, "-m", "paci", "train", "--preset", "tiny", "--steps", "2", "--out", str(out), "--json"]
    argv += ["--nproc", str(nproc)] if nproc > 1 else ["--stages", "2"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and _has_step(out / "metrics.jsonl"):
            first = time.perf_counter() - start
        time.sleep(0.005)
    end = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr.read()}")
    return first if first is not None else end, end


def _has_step(path: Path) -> bool:
    try:
        return any("loss" in json.loads(line) for line in path.read_text().splitlines() if line.endswith("}"))
    except (OSError, json.JSONDecodeError):
        return False


def floor() -> tuple[float, float]:
    """(seconds until a process has imported torch and built an AdamW, seconds to its exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR + "; print('ready', flush=True)"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    ready = time.perf_counter() - start
    proc.wait()
    return ready, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another paci checkout to time side by side (the 'before')")
    args = parser.parse_args()
    repos = {"this checkout": ROOT, **({f"{args.against}": args.against.resolve()} if args.against else {})}
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    floors: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so that drift in the machine's load hits every row alike
            floors.append(floor())
            for name, repo in repos.items():
                for nproc in (1, 2, 4):
                    out = Path(tmp) / f"{len(times)}-{r}-{nproc}-{name.replace('/', '_')}"
                    times.setdefault((name, nproc), []).append(first_step(repo, nproc, out))
    print(f"machine: {machine()}")
    print(f"median of {args.repeats}\n")
    print("| paci | processes | to first step (s) | to exit (s) |")
    print("|---|---|---|---|")
    print(f"| floor: one process imports torch, builds an AdamW | 1 | {statistics.median(f for f, _ in floors):.2f} | "
          f"{statistics.median(e for _, e in floors):.2f} |")
    for (name, nproc), runs in times.items():
        print(f"| {name} | {nproc} | {statistics.median(f for f, _ in runs):.2f} | "
              f"{statistics.median(e for _, e in runs):.2f} |")


if __name__ == "__main__":
    main()
