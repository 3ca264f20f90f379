"""A long run of your own model: validation, checkpoints, a clean stop and a resume equal bit for bit.

A byte-level transformer language model built from stock torch.nn layers (not paci's GPT), trained
with PACI over 4 stages on the embedded corpus, read as a map-style Dataset of byte windows (paci
draws their order from a seeded sampler, so any step can be resumed). Validation on held-out
windows every --eval-every steps, a checkpoint every --checkpoint-every steps; Ctrl-C or SIGTERM
drains the pipeline after the current step, saves a checkpoint there and exits with 130; the same
command then continues from it. That extra drain point is recorded, and `--drains` adds it to a run
that is never stopped: the two end bit-identical.

    .venv/bin/python examples/long_run.py --out runs/bytes     # stop it any time, then run it again
    .venv/bin/torchrun --nproc-per-node 2 --max-restarts 1 examples/long_run.py --stages 2 --out runs/bytes
"""

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

import paci
from paci.data import corpus_documents

MICROBATCHES = 8


class Bytes(Dataset):
    """Windows of `seq_len` + 1 bytes of a text, one every `seq_len` bytes: (inputs, next bytes)."""

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int):
        window = self.data[i * self.seq_len: (i + 1) * self.seq_len + 1].long()
        return window[:-1], window[1:]


class Embed(nn.Module):
    def __init__(self, width: int, seq_len: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(256, width), nn.Embedding(seq_len, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))


class Block(nn.Module):
    """torch's own pre-norm transformer layer, causal."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.layer(x, src_mask=mask, is_causal=True)


def units(width: int, layers: int, seq_len: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [Embed(width, seq_len), *[Block(width) for _ in range(layers)],
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 256))]


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory: metrics, checkpoints, the "
                                                                 "trained stages (stage-<s>.pt)")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages (under torchrun: the number of ranks)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per mini-batch")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--drains", type=lambda text: [int(step) for step in text.split(",")], default=[],
                        help="extra drain points (with checkpoints) after these steps, e.g. 17,33: a stopped run's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # paci's lines: resuming, stopped

    text = torch.frombuffer(bytearray("\n".join(t for _, t in corpus_documents()).encode()), dtype=torch.uint8)
    cut = int(0.95 * len(text))
    train = Bytes(text[:cut], args.seq_len)
    held_out = torch.utils.data.Subset(Bytes(text[cut:], args.seq_len), range(4 * args.batch_size))
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    pipe = paci.Pipeline(units(args.width, args.layers, args.seq_len), next_byte_loss,
                         optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1),
                         lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                         schedule="paci", stages=args.stages, microbatches=MICROBATCHES)
    def progress(step: int, loss: float) -> None:
        if step % 10 == 0:
            print(f"step {step} | loss {loss:.3f}", flush=True)

    try:
        history = pipe.fit(train, steps=args.steps, batch_size=args.batch_size, val_data=held_out,
                           eval_every=args.eval_every, out=args.out, checkpoint_every=args.checkpoint_every,
                           resume=True, drains=args.drains, on_step=progress)
    except paci.Stopped:
        return 130  # the checkpoint is saved; the same command continues from it
    for s in pipe.local_stages:  # every stage in one process; under torchrun, this rank's
        torch.save(pipe.stage_modules[s].state_dict(), args.out / f"stage-{s}.pt")
    if history.summary:  # rank 0 (under torchrun) or the only process
        print(f"val loss {history.summary['initial_val_loss']:.3f} -> {history.summary['final_val_loss']:.3f} "
              f"(nats per byte) | {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
