"""paci's built-in GPT through the public API: what `paci train` does, written as a user would.

The tiny GPT preset as a list of units (embedding, attention and MLP halves of each block, head),
its language-model loss, Muon on the hidden matrices and AdamW on the rest (`paci.optim.muon`) with
paci's warm-up + cosine schedule and weight decay on matrices only, and mini-batches of the
embedded corpus: the losses equal `paci train --schedule paci
--compensate none` with the same settings, bit for bit (tests/test_api.py checks it).

    .venv/bin/python examples/gpt_api.py [--steps 50]
"""

import argparse

import torch

import paci
from paci.data import load_data
from paci.model import PRESETS, build_units, lm_loss
from paci.runtime.stage import OptimizerSpec

STAGES, MICROBATCHES, SEQUENCES = 4, 8, 2  # P, m, sequences per micro-batch


def gpt_pipeline(preset: str, steps: int, seq_len: int, seed: int = 0, lr: float = 1.6e-2) -> paci.Pipeline:
    units = build_units(PRESETS[preset], seed)
    spec = OptimizerSpec(lr=lr, warmup_steps=max(1, steps // 20), total_steps=steps)  # paci train's schedule
    return paci.Pipeline(units, lm_loss, optimizer=paci.optim.muon(units, lr=lr),
                         lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                             opt, lambda step: spec.lr_at(step) / spec.lr),
                         schedule="paci", stages=STAGES, microbatches=MICROBATCHES)


def corpus_batches(steps: int, seq_len: int, seed: int = 0, vocab_size: int = 4096):
    """Mini-batch k holds the sequences of paci train's micro-batches k*m ... k*m + m - 1."""
    data = load_data(None, vocab_size)
    for k in range(steps):
        yield data.batch(seed, k, MICROBATCHES * SEQUENCES, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args()
    pipe = gpt_pipeline("tiny", args.steps, args.seq_len)
    losses = pipe.fit(corpus_batches(args.steps, args.seq_len), steps=args.steps,
                      on_step=lambda step, loss: print(f"step {step} | loss {loss:.3f}") if step % 10 == 0 else None)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")


if __name__ == "__main__":
    main()
