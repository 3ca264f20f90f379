"""Muon's Newton–Schulz iteration in bf16 (torch.optim.Muon's choice) and in fp32, side by side.

torch runs the iteration in bf16, which pays off where matrix units take bf16; on a CPU without
them (no AVX512-BF16 or AMX) bf16 matmuls are emulated and far slower than fp32. paci chooses the
precision per device (`paci.optim.ns_dtype_for`: fp32 on CPUs); this measures why. Per matrix
shape of the `deep` preset (width 128) and of GPT-2 small (width 768, skipped with --quick), the
median time of one orthogonalisation (5 steps) with one thread, and the ratio bf16 / fp32.

    .venv/bin/python benchmarks/muon_ns.py [--quick] [--repeats 20]

Cost: about 10 s with --quick, about 5 minutes with the GPT-2 shapes (bf16 takes 9-26 s each there).
"""

import argparse
import statistics
import time

import torch
from common import machine

from paci.optim import NS_COEFFICIENTS, orthogonalize

DEEP = [(384, 128), (128, 128), (512, 128), (128, 512)]  # c_attn, attn c_proj, c_fc, mlp c_proj (out x in)
GPT2 = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def median_s(shape: tuple[int, int], dtype: torch.dtype, repeats: int) -> float:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7, dtype)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        orthogonalize(g, NS_COEFFICIENTS, 5, 1e-7, dtype)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the deep preset's shapes only")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {machine()}")
    print("| matrix | bf16 ms | fp32 ms | bf16 / fp32 |\n|---|---|---|---|")
    for shape in DEEP + ([] if args.quick else GPT2):
        repeats = args.repeats if shape[0] * shape[1] < 10**6 else 3
        bf16, fp32 = median_s(shape, torch.bfloat16, repeats), median_s(shape, torch.float32, repeats)
        print(f"| {shape[0]} x {shape[1]} | {1e3 * bf16:.2f} | {1e3 * fp32:.2f} | {bf16 / fp32:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
