"""Soak: PACI for 10,000 steps at P = 2 with checkpoints on; does any rank's memory grow?

Runs `paci train --nproc 2` on the tiny preset (checkpoints every 100 steps, evaluation every
1000) and samples each rank's resident set size (/proc/<pid>/status VmRSS) as the run's
metrics.jsonl passes every 100th step. Growth is measured from the end of warm-up (step 1000) to
the last sample of training (step 9900): the target is under 5%. The last step's record appears
only once training is over, when rank 0 gathers every rank's measured trace and writes the run's
report (trace.json, the timelines, the simulator's prediction of the whole run): that sample is
shown apart, as the end-of-run peak. What does grow with the run length by design: the measured
trace, one row per action (about 0.4 KB per step here), which the end-of-run report reads.

    .venv/bin/python benchmarks/soak.py [--steps 10000] [--plot docs/figures/soak.png]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

from paci.runtime.launch import rank_pids

EVERY = 100
NPROC = 2
WARMUP = 1000


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line being written
            continue
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--plot", type=Path, help="PNG of RSS against step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "paci", "train", "--preset", "tiny", "--nproc", str(NPROC), "--microbatches", "4",
               "--batch-size", "4", "--seq-len", "32", "--steps", str(args.steps), "--eval-every", "1000",
               "--eval-batches", "2", "--checkpoint-every", str(EVERY), "--split", "uniform", "--out", str(run)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[int, list[int]]] = []
        ranks: list[int] = []
        next_step = EVERY
        while proc.poll() is None:
            ranks = ranks if len(ranks) == NPROC else rank_pids(proc.pid)  # until both have started
            step = last_step(run / "metrics.jsonl")
            if len(ranks) == NPROC and step >= next_step:
                try:
                    samples.append((step, [rss(pid) for pid in ranks]))
                except (OSError, RuntimeError):  # a rank finished between the two reads
                    break
                next_step = (step // EVERY + 1) * EVERY
            time.sleep(0.02)
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the run failed:\n{stderr[-2000:]}")
        wall = time.perf_counter() - started
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    print(f"machine: {machine()}")
    print(f"paci tiny, P = 2 (--nproc 2), K = m = 4, {args.steps} steps, checkpoint every {EVERY} steps "
          f"(kept: {', '.join(checkpoints)}), {wall:.0f} s wall, {len(samples)} samples\n")
    base = next(((s, r) for s, r in samples if s >= WARMUP), samples[0])
    training = [(s, r) for s, r in samples if s < args.steps]
    end, final = training[-1], samples[-1]
    print("| rank | RSS at step %d (MiB) | RSS at step %d (MiB) | growth | peak in training (MiB) | "
          "at the end, report running (MiB) |" % (base[0], end[0]))
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for rank in range(len(end[1])):
        growth = end[1][rank] / base[1][rank] - 1
        worst = max(worst, growth)
        peak = max(r[rank] for _, r in training)
        print(f"| {rank} | {base[1][rank] / 2**20:.1f} | {end[1][rank] / 2**20:.1f} | {growth:+.2%} | "
              f"{peak / 2**20:.1f} | {final[1][rank] / 2**20:.1f} |")
    print(f"\nlargest growth after warm-up: {worst:+.2%} (target < 5%): {'PASS' if worst < 0.05 else 'FAIL'}")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for rank in range(len(end[1])):
            ax.plot([s for s, _ in samples], [r[rank] / 2**20 for _, r in samples], label=f"rank {rank}")
        ax.axvline(WARMUP, color="grey", ls=":", label="end of warm-up")
        ax.axvline(end[0], color="grey", ls="--", label="end of training (then the report)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("resident set size (MiB)")
        ax.set_title(f"Soak: PACI, P = 2, {args.steps} steps, checkpoints every {EVERY}")
        ax.legend()
        ax.grid(alpha=0.3)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    sys.exit(0 if worst < 0.05 else 1)


if __name__ == "__main__":
    main()
