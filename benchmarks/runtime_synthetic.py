"""The runtime against the simulator and the bubble model, at P = 8 on any machine (sleeping stages).

Runs `paci bench runtime --synthetic` for PACI and 1F1B-flush side by side (P = 8, m = K = 8,
F = 20 ms, B = 40 ms, 0.25 MiB messages, 32 mini-batches) and checks the targets of issue 4:
measured makespan within 5% of the prediction for both, and PACI/1F1B throughput at least 95% of
the ideal (m+P-1)/m = 1.875.

    .venv/bin/python benchmarks/runtime_synthetic.py
"""

import json
import subprocess
import sys

from common import machine

P, M, STEPS = 8, 8, 32


def run(schedule: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "paci", "bench", "runtime", "--synthetic", "--stages", str(P),
                          "--microbatches", str(M), "--steps", str(STEPS), "--schedule", schedule,
                          "--activation-mib", "0.25", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    results = {name: run(name) for name in ("paci", "1f1b")}
    print(f"machine: {machine()}")
    print(f"P={P}, m=K={M}, {STEPS} mini-batches, F=20 ms, B=40 ms (sleeps), 0.25 MiB messages, gloo")
    print("| schedule | measured makespan | predicted | measured/predicted | throughput | bubble | steady bubble |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['measured_makespan_s']:.2f} s | {r['predicted_makespan_s']:.2f} s | "
              f"{r['makespan_ratio']:.3f} | {r['throughput_mb_per_s']:.2f} mb/s | {r['bubble_fraction']:.1%} | "
              f"{r['steady_bubble_fraction']:.1%} |")
    ratio = results["paci"]["throughput_mb_per_s"] / results["1f1b"]["throughput_mb_per_s"]
    ideal = (M + P - 1) / M
    finite = STEPS * (M + P - 1) / (STEPS * M + P - 1)  # with PACI's one fill and drain
    print(f"PACI/1F1B throughput {ratio:.3f} = {ratio / ideal:.1%} of the ideal {ideal:.3f} "
          f"({ratio / finite:.1%} of {finite:.3f}, the ideal for a run of this length)")
    ok = all(abs(r["makespan_ratio"] - 1) <= 0.05 for r in results.values()) and ratio >= 0.95 * ideal
    print("targets met" if ok else "targets NOT met")


if __name__ == "__main__":
    main()
