"""Bad input, everywhere: one line on stderr, exit code 2, and nothing written.

`CASES` is the one table of bad input: each row is a command line, the files it needs, and the
whole line the user must see ("…" stands for text that depends on the input or the machine).
One test runs every row through `paci.cli.main` in-process, in a fresh working folder, and checks
the exit code, that stderr is that single line (log lines included, no traceback), and that
nothing was left behind: no new or changed file in the folder (so no run directory, no partial
output) and no new entry in the data cache (`$PACI_CACHE`). `docs/bad-input.md` is printed from
the same table by `markdown()`, and a test keeps the two equal; after changing a row, run
`.venv/bin/python tests/test_bad_input.py > docs/bad-input.md`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from paci.cli import main

DOC = Path(__file__).parent.parent / "docs" / "bad-input.md"
# `paci train` rows add these to their own flags ({tiny}): a tiny run that would train in seconds
TINY = ("--preset tiny --steps 2 --stages 2 --microbatches 2 --batch-size 2 --seq-len 16 --eval-every 2 "
        "--data corpus.txt --vocab-size 300 --split uniform")
VOCAB = 300


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, in words
    args: str  # the command line after `paci`; {tiny} is TINY, {port} a port that is in use
    message: str  # the whole stderr line; "…" matches any text
    setup: Setup | None = None  # makes the files the row needs in its working folder

    def argv(self, port: str) -> list[str]:
        return [arg.replace("{port}", port) for arg in shlex.split(self.args.replace("{tiny}", TINY))]

    def matches(self, line: str, port: str) -> bool:
        parts = self.message.replace("{port}", port).split("…")
        return re.fullmatch(".*".join(map(re.escape, parts)), line) is not None


# ----------------------------------------------------------------------------------------------
# What the rows find in their working folder


def corpus_text() -> str:
    """About 60 KB of made-up sentences: a corpus that tokenizes in well under a second."""
    rng = np.random.default_rng(0)
    words = ["the", "pipe", "stage", "sends", "a", "batch", "forward", "and", "back", "to", "every", "step",
             "weights", "move", "slowly", "while", "gradients", "flow", "through", "time"]
    return "".join(" ".join(rng.choice(words, size=8)) + ".\n" for _ in range(1500))


class Shared:
    """Made once per module, outside every row's folder: the corpus (its tokens already cached, so
    a row that reads it adds no cache entry), and on first use a finished tiny run to resume."""

    def __init__(self, root: Path) -> None:
        from paci.data import load_data

        self.root = root
        self.corpus = root / "corpus.txt"
        self.corpus.write_text(corpus_text())
        load_data(self.corpus, VOCAB)

    @functools.cached_property
    def run(self) -> Path:
        from paci.config import load_config
        from paci.train import train

        out = self.root / "run"
        train(load_config(overrides={
            "model": {"preset": "tiny", "vocab_size": VOCAB},
            "data": {"path": str(self.corpus), "batch_size": 2, "seq_len": 16},
            "pipeline": {"stages": 2, "microbatches": 2, "split": "uniform"},
            "train": {"steps": 2, "eval_every": 2, "out": str(out)}}))
        return out


Setup = Callable[[Path, Shared], None]


def write(name: str, content: str | bytes) -> Setup:
    def setup(folder: Path, shared: Shared) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def csv(text: str) -> Setup:
    return write("s.csv", text)


def folder(name: str) -> Setup:
    return lambda where, shared: (where / name).mkdir(parents=True)


def both(*setups: Setup) -> Setup:
    def setup(where: Path, shared: Shared) -> None:
        for one in setups:
            one(where, shared)
    return setup


def copy_run(where: Path, shared: Shared) -> None:
    shutil.copytree(shared.run, where / "run")


def run_without_checkpoint(where: Path, shared: Shared) -> None:
    copy_run(where, shared)
    for manifest in (where / "run" / "checkpoints").rglob("manifest.json"):
        manifest.unlink()


def token_folder(where: Path, shared: Shared) -> None:
    """train.bin and val.bin with ids up to 999, and a meta.json that declares 500."""
    (where / "tokens").mkdir()
    for split in ("train", "val"):
        (np.arange(4000, dtype=np.uint16) % 1000).tofile(where / "tokens" / f"{split}.bin")
    (where / "tokens" / "meta.json").write_text(json.dumps({"vocab_size": 500}))


def costs_json(forward: str) -> Setup:
    return write("costs.json", '{"forward": [%s, 0.01], "backward": [0.02, 0.02]}' % forward)


c = Case
CASES = [
    # ---------- paci schedules
    c("schedules-extra-argument", "an argument it does not take",
      "schedules paci",
      "paci: error: unrecognized arguments: paci (see paci --help)"),
    # ---------- paci simulate: sizes and costs
    c("simulate-unknown-schedule", "an unknown schedule",
      "simulate --schedule nope",
      "paci: error: unknown schedule 'nope'; choose one of: gpipe, 1f1b, zb-h1, interleaved-1f1b, async-1f1b, "
      "pipedream, 2bw, paci"),
    c("simulate-chunks-without-interleaving", "--chunks with a one-stage-per-rank schedule",
      "simulate --schedule paci --chunks 2",
      "paci: error: paci runs one stage per rank; --chunks 2 needs --schedule interleaved-1f1b"),
    c("simulate-chunks-zero", "no stage per rank",
      "simulate --schedule interleaved-1f1b --chunks 0",
      "paci: error: --chunks (stages per rank) must be an integer >= 1, got 0"),
    c("simulate-interleaved-uneven-rounds", "micro-batches that do not fill equal rounds",
      "simulate --schedule interleaved-1f1b --stages 4 --microbatches 9",
      "paci: error: interleaved-1f1b sends micro-batches through the ranks in 2 equal rounds (--microbatches // P): "
      "--microbatches 9 must be a multiple of 2, e.g. 8"),
    c("simulate-stages-zero", "zero stages",
      "simulate --stages 0",
      "paci: error: number of stages must be an integer >= 1, got 0"),
    c("simulate-stages-negative", "negative stages",
      "simulate --stages=-3",
      "paci: error: number of stages must be an integer >= 1, got -3"),
    c("simulate-stages-huge", "10**9 stages",
      "simulate --stages 1000000000",
      "paci: error: 1,000,000,000 stages is more than paci simulates or runs (at most 1,024): use fewer "
      "--stages"),
    c("simulate-stages-not-int", "stages that are not a number",
      "simulate --stages two",
      "paci simulate: error: argument --stages: invalid int value: 'two' (see paci simulate --help)"),
    c("simulate-microbatches-zero", "zero micro-batches",
      "simulate --microbatches 0",
      "paci: error: number of micro-batches must be an integer >= 1, got 0"),
    c("simulate-microbatches-huge", "10**9 micro-batches",
      "simulate --microbatches 1000000000",
      "paci: error: 4 stages x 4,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("simulate-steps-nan", "steps that are not an integer",
      "simulate --steps nan",
      "paci simulate: error: argument --steps: invalid int value: 'nan' (see paci simulate --help)"),
    c("simulate-steps-zero", "zero steps",
      "simulate --steps 0",
      "paci: error: number of steps must be an integer >= 1, got 0"),
    c("simulate-steps-huge", "10**12 steps",
      "simulate --steps 1000000000000",
      "paci: error: 4 stages x 8,000,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("simulate-accum-zero", "K = 0",
      "simulate --accum 0",
      "paci: error: paci: accumulation K must be >= 1, got 0"),
    c("simulate-accum-flush", "--accum for a flush schedule",
      "simulate --schedule 1f1b --accum 3",
      "paci: error: 1f1b steps once per 8 micro-batches; drop --accum or set it to --microbatches (8)"),
    c("simulate-checkpoint-every-negative", "--checkpoint-every -1",
      "simulate --checkpoint-every=-1",
      "paci: error: --checkpoint-every must be an integer >= 0 (0: only at the end), got -1"),
    c("simulate-costs-malformed", "costs that are not F,B[,W]",
      "simulate --costs '1;2'",
      "paci: error: --costs expects F,B or F,B,W as positive numbers (e.g. 1,2 or 1,2,1), got '1;2'"),
    c("simulate-costs-nan", "a NaN cost",
      "simulate --costs nan,2",
      "paci: error: --costs expects F,B or F,B,W as positive numbers (e.g. 1,2 or 1,2,1), got 'nan,2'"),
    c("simulate-costs-inf", "an infinite cost",
      "simulate --costs 1,inf",
      "paci: error: --costs expects F,B or F,B,W as positive numbers (e.g. 1,2 or 1,2,1), got '1,inf'"),
    c("simulate-costs-w-over-b", "W larger than B",
      "simulate --costs 1,2,3",
      "paci: error: weight-grad time W must not exceed the full backward B (W=(3.0, 3.0, 3.0, 3.0), B=(2.0, "
      "2.0, 2.0, 2.0))"),
    # ---------- paci simulate: options that do not go together, output files
    c("simulate-compare-stages-zero", "--compare with zero stages",
      "simulate --compare --stages 0",
      "paci: error: number of stages must be an integer >= 1, got 0"),
    c("simulate-compare-steps-huge", "--compare with 10**12 steps",
      "simulate --compare --steps 1000000000000",
      "paci: error: 4 stages x 8,000,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("simulate-compare-csv", "--compare with --csv",
      "simulate --compare --csv s.csv",
      "paci: error: --compare prints one table of the registered schedules; drop --csv",
      csv("0F0,0B0\n")),
    c("simulate-csv-checkpoint-every", "--checkpoint-every with --csv",
      "simulate --csv s.csv --checkpoint-every 2",
      "paci: error: --checkpoint-every needs a registered --schedule, not a --csv",
      csv("0F0,0B0\n")),
    c("simulate-timeline-suffix", "a timeline that is neither .png nor .txt",
      "simulate --timeline x.svg",
      "paci: error: --timeline x.svg: use a .png or .txt file name"),
    c("simulate-timeline-missing-folder", "a timeline in a folder that does not exist",
      "simulate --timeline missing/t.txt",
      "paci: error: --timeline missing/t.txt: the folder missing does not exist; create it first or write "
      "elsewhere"),
    c("simulate-trace-missing-folder", "a trace in a missing folder, after a good --timeline",
      "simulate --timeline t.txt --trace missing/trace.json",
      "paci: error: --trace missing/trace.json: the folder missing does not exist; create it first or write "
      "elsewhere"),
    # ---------- paci simulate --csv: torch.distributed.pipelining schedules
    c("simulate-csv-missing", "a CSV that does not exist",
      "simulate --csv missing.csv",
      "paci: error: missing.csv: no such file"),
    c("simulate-csv-empty", "an empty CSV",
      "simulate --csv s.csv",
      "paci: error: CSV has no actions",
      csv("")),
    c("simulate-csv-bad-cell", "a cell that is not an action (`0F0,hello`)",
      "simulate --csv s.csv",
      "paci: error: CSV line 1: cannot parse action 'hello': expected e.g. 0F3, 1B2, 1I2, 1W2 or 0U",
      csv("0F0,hello\n")),
    c("simulate-csv-unknown-op", "an unknown op letter (`0F0,0X0`)",
      "simulate --csv s.csv",
      "paci: error: CSV line 1: cannot parse action '0X0': expected e.g. 0F3, 1B2, 1I2, 1W2 or 0U",
      csv("0F0,0X0\n")),
    c("simulate-csv-negative", "a negative micro-batch (`0F-1,0B-1`)",
      "simulate --csv s.csv",
      "paci: error: CSV line 1: cannot parse action '0F-1': expected e.g. 0F3, 1B2, 1I2, 1W2 or 0U",
      csv("0F-1,0B-1\n")),
    c("simulate-csv-missing-microbatch", "a micro-batch that is never run (`0F0,0F2,0B0,0B2`)",
      "simulate --csv s.csv",
      "paci: error: stage 0: micro-batch 1 never runs, but micro-batches are numbered 0 to 2: every stage runs "
      "each of them, numbered without gaps (PACI_DEBUG=1 shows the details)",
      csv("0F0,0F2,0B0,0B2\n")),
    c("simulate-csv-duplicate", "the same action twice (`0F0,0F0,0B0`)",
      "simulate --csv s.csv",
      "paci: error: stage 0, position 1 (0F0): F of micro-batch 0 after F; expected after nothing "
      "(PACI_DEBUG=1 shows the details)",
      csv("0F0,0F0,0B0\n")),
    c("simulate-csv-deadlock", "an order that deadlocks (`0F0,0B0,0F1,0B1` / `1F1,1B1,1F0,1B0`)",
      "simulate --csv s.csv",
      "paci: error: deadlock: stage 0 waits at 0B0, stage 1 waits at 1F1 (PACI_DEBUG=1 shows the details)",
      csv("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")),
    c("simulate-csv-stage-row", "an action on another rank's line (`1F0` on the first of two)",
      "simulate --csv s.csv",
      "paci: error: CSV line 1: 1F0 belongs to stage 1, which runs on rank 1 of 2 (one line per rank, stage s on "
      "rank s mod 2), but this line is rank 0",
      csv("1F0\n0F0\n")),
    c("simulate-csv-huge-line", "one 20 MB line",
      "simulate --csv s.csv",
      "paci: error: --csv s.csv has 20,000,001 bytes; paci reads schedule CSVs of at most 16,777,216 (about 4 "
      "M actions)",
      csv("0F0," * 5_000_000 + "\n")),
    c("simulate-csv-huge-field", "one 10 MB cell",
      "simulate --csv s.csv",
      "paci: error: the CSV cannot be read as a schedule (field larger than field limit (131072)); write one "
      "rank's actions per line, e.g. 0F0,0F1,0B0,0B1",
      csv("0F" + "1" * 10_000_000 + "\n")),
    c("simulate-csv-22-digits", "a 22-digit micro-batch index (`0F999…9,0B999…9`)",
      "simulate --csv s.csv",
      "paci: error: stage 0: micro-batch 0 never runs, but micro-batches are numbered 0 to "
      "9999999999999999999999: every stage runs each of them, numbered without gaps (PACI_DEBUG=1 shows the "
      "details)",
      csv("0F" + "9" * 22 + ",0B" + "9" * 22 + "\n")),
    c("simulate-csv-binary", "a binary file",
      "simulate --csv s.csv",
      "paci: error: --csv s.csv is not UTF-8 text (invalid start byte at byte 128): give a "
      "torch.distributed.pipelining CSV",
      write("s.csv", bytes(range(256)) * 4)),
    # ---------- paci train: flags
    c("train-unknown-preset", "an unknown preset",
      "train {tiny} --preset huge",
      "paci: error: unknown preset 'huge'; choose one of: tiny, small, deep, gpt2, gpt2-medium"),
    c("train-stages-over-units", "more stages than the model has units",
      "train {tiny} --stages 9",
      "paci: error: 9 stages but the model has only 6 units; use --stages <= 6 or a preset with more layers"),
    c("train-stages-huge", "10**9 stages",
      "train {tiny} --stages 1000000000",
      "paci: error: 1,000,000,000 stages is more than paci simulates or runs (at most 1,024): use fewer "
      "--stages"),
    c("train-stages-zero", "zero stages",
      "train {tiny} --stages 0",
      "paci: error: [pipeline] stages must be an integer >= 1, got 0"),
    c("train-microbatches-huge", "10**9 micro-batches",
      "train {tiny} --microbatches 1000000000",
      "paci: error: 2 stages x 2,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("train-steps-zero", "zero steps",
      "train {tiny} --steps 0",
      "paci: error: [train] steps must be an integer >= 1, got 0"),
    c("train-steps-negative", "negative steps",
      "train {tiny} --steps=-5",
      "paci: error: [train] steps must be an integer >= 1, got -5"),
    c("train-steps-huge", "10**12 steps",
      "train {tiny} --steps 1000000000000",
      "paci: error: 2 stages x 2,000,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("train-accum-zero", "K = 0",
      "train {tiny} --schedule paci --accum 0",
      "paci: error: [pipeline] accum must be an integer >= 1, got 0"),
    c("train-batch-size-huge", "10**9 sequences per micro-batch",
      "train {tiny} --batch-size 1000000000",
      "paci: error: the train split of corpus.txt has 30,489 tokens but one batch of batch_size=1000000000 x "
      "seq_len=16 needs 16,000,000,001: use more text or a smaller batch_size/seq_len"),
    c("train-seq-len-huge", "10**9 tokens per sequence",
      "train {tiny} --seq-len 1000000000",
      "paci: error: the train split of corpus.txt has 30,489 tokens but one batch of batch_size=2 x "
      "seq_len=1000000000 needs 2,000,000,001: use more text or a smaller batch_size/seq_len"),
    c("train-vocab-huge", "a vocabulary too large for uint16",
      "train {tiny} --vocab-size 1000000000",
      "paci: error: --vocab-size must be in [257, 65535] (256 bytes + the end-of-text token; ids are stored as "
      "uint16), got 1000000000"),
    c("train-lr-zero", "a zero learning rate",
      "train {tiny} --lr 0",
      "paci: error: --lr must be > 0, got 0.0"),
    c("train-lr-negative", "a negative learning rate",
      "train {tiny} --lr=-1e-3",
      "paci: error: --lr must be > 0, got -0.001"),
    c("train-lr-inf", "an infinite learning rate",
      "train {tiny} --lr inf",
      "paci: error: [optim] lr must be a finite number, got inf"),
    c("train-lr-nan", "a NaN learning rate",
      "train {tiny} --lr nan",
      "paci: error: [optim] lr must be a finite number, got nan"),
    c("train-beta1-one", "beta1 = 1",
      "train {tiny} --beta1 1",
      "paci: error: --beta1 must be in [0, 1), got 1.0"),
    c("train-clip-negative", "a negative gradient-norm bound",
      "train {tiny} --clip-grad-norm=-1",
      "paci: error: --clip-grad-norm must be >= 0 (0: off), got -1.0"),
    c("train-clip-inf", "an infinite gradient-norm bound",
      "train {tiny} --clip-grad-norm inf",
      "paci: error: [optim] clip_grad_norm must be a finite number, got inf"),
    c("train-warmup-negative", "negative warm-up",
      "train {tiny} --warmup=-1",
      "paci: error: warmup_steps must be >= 0, got -1"),
    c("train-timeout-inf", "an infinite timeout",
      "train {tiny} --timeout inf",
      "paci: error: --timeout must be seconds in (0, 86400], got inf"),
    c("train-timeout-nan", "a NaN timeout",
      "train {tiny} --timeout nan",
      "paci: error: --timeout must be seconds in (0, 86400], got nan"),
    c("train-timeout-zero", "a zero timeout",
      "train {tiny} --timeout 0",
      "paci: error: --timeout must be seconds in (0, 86400], got 0.0"),
    c("train-checkpoint-every-negative", "--checkpoint-every -1",
      "train {tiny} --checkpoint-every=-1",
      "paci: error: --checkpoint-every must be an integer >= 0, got -1"),
    c("train-checkpoint-every-not-multiple", "--checkpoint-every between mini-batches",
      "train {tiny} --microbatches 2 --accum 1 --schedule paci --checkpoint-every 3",
      "paci: error: --checkpoint-every 3 must be a multiple of 2: a drain point falls between whole "
      "mini-batches of 2 micro-batches (K = 1)"),
    c("train-nonfinite-limit-negative", "--nonfinite-limit -1",
      "train {tiny} --nonfinite-limit=-1",
      "paci: error: --nonfinite-limit must be an integer >= 0, got -1"),
    c("train-eval-every-zero", "zero steps between evaluations",
      "train {tiny} --eval-every 0",
      "paci: error: --eval-every must be an integer >= 1 (optimizer steps between validation rounds); --no-eval "
      "turns validation off"),
    c("train-chunks-without-interleaving", "--chunks with a one-stage-per-rank schedule",
      "train {tiny} --schedule paci --chunks 2",
      "paci: error: paci runs one stage per rank; --chunks 2 needs --schedule interleaved-1f1b"),
    c("train-interleaved-clip", "global-norm clipping with interleaved 1F1B",
      "train {tiny} --schedule interleaved-1f1b --stages 2 --clip-grad-norm 1",
      "paci: error: --clip-grad-norm with interleaved-1f1b is not supported yet (a rank steps its stages at "
      "different times, so the global norm has no one point to be exchanged at)"),
    c("train-checkpoint-every-without-checkpoints", "--checkpoint-every with --no-checkpoint",
      "train {tiny} --no-checkpoint --checkpoint-every 2",
      "paci: error: --checkpoint-every 2 asks for checkpoints that --no-checkpoint turns off; drop one of them"),
    c("train-threads-huge", "10**9 threads",
      "train {tiny} --threads 1000000000",
      "paci: error: --threads must be at most 1024, got 1000000000; leave it out to use this machine's cores"),
    c("train-seed-negative", "a negative seed",
      "train {tiny} --seed=-1",
      "paci: error: --seed must be an integer >= 0, got -1"),
    c("train-compensate-unknown", "an unknown --compensate",
      "train {tiny} --compensate magic",
      "paci: error: unknown --compensate 'magic'; choose one of: none, pipemare, nesterov, predict, predict-window, dc"),
    c("train-sync-steps-flush", "a synchronous start of a synchronous schedule",
      "train {tiny} --schedule 1f1b --sync-steps 2",
      "paci: error: --sync-steps starts an asynchronous schedule synchronously; 1f1b is synchronous already"),
    c("train-sync-steps-whole-run", "a synchronous start as long as the run",
      "train {tiny} --sync-steps 2",
      "paci: error: --sync-steps 2 must be below the run's 2 optimizer steps"),
    c("train-predict-gain-zero", "a prediction gain of 0",
      "train {tiny} --predict-gain 0",
      "paci: error: --predict-gain must be > 0, got 0.0"),
    c("train-predict-gain-alone", "a prediction gain without a prediction",
      "train {tiny} --compensate none --predict-gain 2",
      "paci: error: --predict-gain scales a prediction; use it with --compensate predict or predict-window"),
    c("train-dc-lambda-zero", "a delay-compensation scale of 0",
      "train {tiny} --optimizer adamw --compensate dc --dc-lambda 0",
      "paci: error: --dc-lambda must be a number > 0, got 0.0"),
    c("train-dc-lambda-alone", "a delay-compensation scale without delay compensation",
      "train {tiny} --dc-lambda 0.5",
      "paci: error: --dc-lambda scales delay compensation; use it with --compensate dc"),
    c("train-dc-muon", "delay compensation with Muon",
      "train {tiny} --optimizer muon --compensate dc",
      "paci: error: --compensate dc recomputes AdamW's last update from its state; use it with --optimizer adamw"),
    c("train-optimizer-unknown", "an unknown optimizer",
      "train {tiny} --optimizer sgd",
      "paci: error: unknown --optimizer 'sgd'; choose one of: adamw, nadamw, muon"),
    c("train-predict-stashed", "predict with a stashing schedule",
      "train {tiny} --schedule 2bw --compensate predict",
      "paci: error: --compensate predict moves live weights; 2bw stashes them instead"),
    c("train-predict-nadamw", "predict with NAdamW",
      "train {tiny} --optimizer nadamw --compensate predict",
      "paci: error: --compensate predict predicts AdamW's or Muon's steps; use it with --optimizer adamw or muon"),
    c("train-nesterov-muon", "Nesterov compensation with Muon",
      "train {tiny} --optimizer muon --compensate nesterov",
      "paci: error: --compensate nesterov gives delayed stages NAdamW instead of their optimizer; use it with "
      "--optimizer adamw"),
    c("train-precision-unknown", "an unknown precision",
      "train {tiny} --precision fp16",
      "paci: error: unknown --precision 'fp16'; choose one of: fp32, bf16"),
    c("train-memory-garbage", "a memory budget that is not a size",
      "train {tiny} --memory-per-stage lots",
      "paci: error: cannot read 'lots' as a size: write a number with an optional unit (B, KB, MB, GB, TB, "
      "KiB, MiB, GiB, TiB), e.g. 24GiB or 1.5GB"),
    c("train-nproc-not-stages", "--nproc other than --stages",
      "train {tiny} --nproc 3",
      "paci: error: --nproc 3 must equal --stages 2 (one process per stage); drop --nproc or make them agree"),
    c("train-nproc-not-stages-times-dp", "--nproc other than --stages x --dp",
      "train {tiny} --dp 2 --nproc 2",
      "paci: error: --nproc 2 must equal --stages 2 x --dp 2 (one process per stage and replica); drop --nproc or "
      "make them agree"),
    c("train-dp-zero", "no data-parallel replica",
      "train {tiny} --dp 0",
      "paci: error: [pipeline] dp must be an integer >= 1, got 0"),
    c("train-port-in-use", "a port that is in use",
      "train {tiny} --nproc 2 --port {port}",
      "paci: error: port {port} is in use; pick another with --port or leave it out"),
    c("train-port-privileged", "a port below 1024",
      "train {tiny} --nproc 2 --port 80",
      "paci: error: --port must be in 1024..65535, got 80"),
    # ---------- paci train --config
    c("config-missing", "a config file that does not exist",
      "train {tiny} --config none.toml",
      "paci: error: --config none.toml: no such file"),
    c("config-syntax", "a TOML syntax error (`[pipeline` without its `]`)",
      "train {tiny} --config run.toml",
      "paci: error: --config run.toml: not valid TOML (…)",
      write("run.toml", "[pipeline\nstages = 2\n")),
    c("config-unknown-section", "an unknown section (`[modle]`)",
      "train {tiny} --config run.toml",
      "paci: error: run.toml: unknown section [modle]; sections are model, data, pipeline, optim, train",
      write("run.toml", "[modle]\npreset = 'tiny'\n")),
    c("config-unknown-key", "an unknown key (`stagez = 2` in `[pipeline]`)",
      "train {tiny} --config run.toml",
      "paci: error: run.toml: unknown key 'stagez' in [pipeline]; known keys: accum, chunks, dp, memory_per_stage, "
      "microbatches, nproc, port, recompute, schedule, split, stages, sync_steps, timeout_s",
      write("run.toml", "[pipeline]\nstagez = 2\n")),
    c("config-key-outside-section", "a key outside any section (`stages = 2` first)",
      "train {tiny} --config run.toml",
      "paci: error: run.toml: stages = 2 is outside any section; put it under its section ([model], [data], "
      "[pipeline], [optim], [train])",
      write("run.toml", "stages = 2\n")),
    c("config-string-for-int", "a string for an integer (`warmup_steps = '5'`)",
      "train {tiny} --config run.toml",
      "paci: error: [optim] warmup_steps must be an integer, got '5' (a string)",
      write("run.toml", "[optim]\nwarmup_steps = '5'\n")),
    c("config-float-for-int", "a float for an integer (`eval_batches = 2.5`)",
      "train {tiny} --config run.toml",
      "paci: error: [train] eval_batches must be an integer, got 2.5 (a number)",
      write("run.toml", "[train]\neval_batches = 2.5\n")),
    c("config-bool-for-int", "a bool for an integer (`nonfinite_limit = true`)",
      "train {tiny} --config run.toml",
      "paci: error: [train] nonfinite_limit must be an integer, got true (a boolean)",
      write("run.toml", "[train]\nnonfinite_limit = true\n")),
    c("config-list", "a list for a string (`optimizer = ['adamw']`)",
      "train {tiny} --config run.toml",
      "paci: error: [optim] optimizer must be a string, got ['adamw'] (a list)",
      write("run.toml", "[optim]\noptimizer = ['adamw']\n")),
    c("config-int-for-string", "a number for a path (`out = 5`)",
      "train {tiny} --config run.toml",
      "paci: error: [train] out must be a string, got 5 (an integer)",
      write("run.toml", "[train]\nout = 5\n")),
    c("config-string-for-port", "a string for the port (`port = 'any'`)",
      "train {tiny} --config run.toml",
      "paci: error: [pipeline] port must be an integer, got 'any' (a string)",
      write("run.toml", "[pipeline]\nport = 'any'\n")),
    # ---------- paci train --data
    c("data-missing", "a data path that does not exist",
      "train {tiny} --data nowhere",
      "paci: error: data path nowhere does not exist: pass an existing text file or folder, or leave it unset "
      "for the embedded corpus"),
    c("data-folder-without-text", "a folder with no text",
      "train {tiny} --data empty",
      "paci: error: folder empty has no usable data: add *.txt files (searched recursively) or nanoGPT "
      "train.bin + val.bin",
      folder("empty")),
    c("data-empty-file", "an empty file",
      "train {tiny} --data empty.txt",
      "paci: error: empty.txt holds only empty text: add text to it",
      write("empty.txt", "")),
    c("data-binary-file", "a binary file",
      "train {tiny} --data blob.txt",
      "paci: error: blob.txt is not UTF-8 text (invalid start byte at byte 128): convert it to UTF-8 or remove "
      "it",
      write("blob.txt", bytes(range(256)) * 64)),
    c("data-not-utf8", "Latin-1 text",
      "train {tiny} --data latin.txt",
      "paci: error: latin.txt is not UTF-8 text (invalid continuation byte at byte 3): convert it to UTF-8 or "
      "remove it",
      write("latin.txt", "café au lait\n".encode("latin-1") * 100)),
    c("data-no-validation", "a corpus too small to hold out validation text",
      "train {tiny} --data small.txt",
      "paci: error: small.txt is too small to hold out validation text (it needs a line break after the first "
      "90% of its characters): add text or more files",
      write("small.txt", "to be or not to be\n" * 3)),
    c("data-too-small", "a corpus too small for one batch",
      "train {tiny} --data small.txt",
      "paci: error: the validation split of small.txt has 21 tokens but one batch of batch_size=2 x seq_len=16 "
      "needs 33: use more text or a smaller batch_size/seq_len",
      write("small.txt", "to be or not to be\n" * 40)),
    c("data-bin-ids-over-vocab", "token ids beyond the vocabulary meta.json declares",
      "train {tiny} --data tokens",
      "paci: error: tokens: the token files hold id 999, but tokens/meta.json declares vocab_size=500, so the "
      "model's embedding has no row for it: set vocab_size to at least 1000 in meta.json, or fix the .bin files",
      token_folder),
    c("data-bin-odd-size", "a .bin file of an odd number of bytes",
      "train {tiny} --data tokens",
      "paci: error: tokens/train.bin has 3 bytes, not a non-empty array of uint16 tokens: rewrite it with "
      "np.array(ids, dtype=np.uint16).tofile(...)",
      both(write("tokens/train.bin", b"abc"), write("tokens/val.bin", b"ab"))),
    # ---------- paci train: run directories, --resume, --split
    c("out-used", "a run directory that is in use",
      "train {tiny} --out used",
      "paci: error: --out used already exists and is not empty; choose a new run directory",
      write("used/keep.txt", "mine")),
    c("out-under-a-file", "a run directory under a file",
      "train {tiny} --out file.txt/run",
      "paci: error: --out file.txt/run: file.txt is a file, not a folder; choose another path",
      write("file.txt", "not a folder")),
    c("resume-not-a-run", "--resume of a folder that is not a run",
      "train --resume empty",
      "paci: error: --resume empty: no config.json there; give a paci run directory",
      folder("empty")),
    c("resume-no-checkpoint", "--resume of a run with no complete checkpoint",
      "train --resume run",
      "paci: error: run has no complete checkpoint to resume from; start a new run",
      run_without_checkpoint),
    c("resume-with-config", "--resume with --config",
      "train --resume run --config run.toml",
      "paci: error: --resume continues the run in RUN_DIR with its own config.json; drop --config and --out",
      both(copy_run, write("run.toml", ""))),
    c("resume-with-out", "--resume with --out",
      "train --resume run --out other",
      "paci: error: --resume continues the run in RUN_DIR with its own config.json; drop --config and --out",
      copy_run),
    c("resume-changed-setting", "--resume with another seed",
      "train --resume run --seed 1",
      "paci: error: the checkpoint was written with seed = 0, this run has seed = 1; resume with the run's own "
      "settings",
      copy_run),
    c("resume-finished", "--resume of a run that finished",
      "train --resume run",
      "paci: error: --resume run: the run finished all 2 steps; nothing to resume",
      copy_run),
    c("split-malformed", "a malformed --split",
      "train {tiny} --split 0-3,3-6",
      "paci: error: --split '0-3,3-6': '0-3' is not START:STOP; write one range per stage, e.g. --split "
      "0:3,3:6, or use --split profile or --split uniform"),
    c("split-not-a-run", "--split of a folder that is not a run",
      "train {tiny} --split empty",
      "paci: error: --split empty: expected a paci run directory with a config.json that records its split, or "
      "a split like 0:3,3:6",
      folder("empty")),
    # ---------- paci bench runtime --synthetic
    c("bench-interleaved", "a schedule with several stages per rank",
      "bench runtime --synthetic --schedule interleaved-1f1b --stages 2",
      "paci: error: paci bench handles one stage per rank; interleaved-1f1b is not supported there yet (choose one "
      "of: gpipe, 1f1b, zb-h1, async-1f1b, pipedream, 2bw, paci)"),
    c("bench-stages-zero", "zero stages",
      "bench runtime --synthetic --stages 0",
      "paci: error: number of stages must be an integer >= 1, got 0"),
    c("bench-stages-huge", "10**9 stages (one process each)",
      "bench runtime --synthetic --stages 1000000000",
      "paci: error: 1,000,000,000 stages would start 1,000,000,000 processes on this machine; paci starts at "
      "most 64 (one per stage): use fewer --stages"),
    c("bench-steps-huge", "10**12 steps",
      "bench runtime --synthetic --steps 1000000000000",
      "paci: error: 8 stages x 8,000,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("bench-microbatches-zero", "zero micro-batches",
      "bench runtime --synthetic --microbatches 0",
      "paci: error: number of micro-batches must be an integer >= 1, got 0"),
    c("bench-f-ms-negative", "a negative forward time",
      "bench runtime --synthetic --f-ms=-1",
      "paci: error: --f-ms must be a finite number of milliseconds >= 0, got -1.0"),
    c("bench-f-ms-nan", "a NaN forward time",
      "bench runtime --synthetic --f-ms nan",
      "paci: error: --f-ms must be a finite number of milliseconds >= 0, got nan"),
    c("bench-b-ms-inf", "an infinite backward time",
      "bench runtime --synthetic --b-ms inf",
      "paci: error: --b-ms must be a finite number of milliseconds >= 0, got inf"),
    c("bench-activation-zero", "zero-sized messages",
      "bench runtime --synthetic --activation-mib 0",
      "paci: error: --activation-mib must be in (0, 1024] MiB (every rank holds several such messages at "
      "once), got 0.0"),
    c("bench-activation-inf", "infinite messages",
      "bench runtime --synthetic --activation-mib inf",
      "paci: error: --activation-mib must be in (0, 1024] MiB (every rank holds several such messages at "
      "once), got inf"),
    c("bench-activation-nan", "NaN-sized messages",
      "bench runtime --synthetic --activation-mib nan",
      "paci: error: --activation-mib must be in (0, 1024] MiB (every rank holds several such messages at "
      "once), got nan"),
    c("bench-activation-huge", "1 TiB messages",
      "bench runtime --synthetic --activation-mib 1048576",
      "paci: error: --activation-mib must be in (0, 1024] MiB (every rank holds several such messages at "
      "once), got 1048576.0"),
    c("bench-costs-nan", "a cost model with a NaN time",
      "bench runtime --synthetic --costs costs.json --stages 2",
      "paci: error: --costs costs.json: forward: values must be finite and >= 0, got (nan, 0.01)",
      costs_json("NaN")),
    c("bench-costs-inf", "a cost model with an infinite time",
      "bench runtime --synthetic --costs costs.json --stages 2",
      "paci: error: --costs costs.json: forward: values must be finite and >= 0, got (inf, 0.01)",
      costs_json("Infinity")),
    c("bench-costs-with-op-flags", "--costs with --f-ms",
      "bench runtime --synthetic --costs costs.json --f-ms 3 --stages 2",
      "paci: error: --costs gives every op time; leave out --f-ms, --b-ms and --u-ms",
      costs_json("0.01")),
    c("bench-costs-other-depth", "a cost model for another depth",
      "bench runtime --synthetic --costs costs.json",
      "paci: error: costs.json has costs for 2 stages; pass --stages 2",
      costs_json("0.01")),
    c("bench-costs-missing", "a cost model that does not exist",
      "bench runtime --synthetic --costs missing.json --stages 2",
      "paci: error: --costs missing.json: cannot read a JSON cost model ([Errno 2] No such file or directory: "
      "'missing.json')"),
    c("bench-not-synthetic", "without --synthetic",
      "bench runtime",
      "paci bench runtime: error: the following arguments are required: --synthetic (see paci bench runtime "
      "--help)"),
    # ---------- paci partition
    c("partition-stages-over-units", "more stages than units",
      "partition --preset tiny --stages 7",
      "paci: error: 7 stages but the model has only 6 units; use --stages <= 6 or a preset with more layers"),
    c("partition-stages-zero", "zero stages",
      "partition --preset tiny --stages 0",
      "paci: error: --stages must be >= 1, got 0"),
    c("partition-microbatch-size-zero", "an empty micro-batch",
      "partition --preset tiny --microbatch-size 0",
      "paci: error: --microbatch-size and --seq-len must be >= 1, got 0 and 32"),
    c("partition-microbatch-size-huge", "10**9 sequences per micro-batch",
      "partition --preset tiny --microbatch-size 1000000000",
      "paci: error: a micro-batch of 1,000,000,000 x 32 tokens needs at least 244,140.6 GiB for the model's "
      "weights and logits alone, more than the … GiB of this machine: use fewer sequences per micro-batch or "
      "shorter ones"),
    c("partition-seq-len-huge", "10**9 tokens per sequence",
      "partition --preset tiny --seq-len 1000000000",
      "paci: error: a micro-batch of 8 x 1,000,000,000 tokens needs at least 61,154.4 GiB for the model's "
      "weights and logits alone, more than the … GiB of this machine: use fewer sequences per micro-batch or "
      "shorter ones"),
    c("partition-seq-len-zero", "zero tokens per sequence",
      "partition --preset tiny --seq-len 0",
      "paci: error: --microbatch-size and --seq-len must be >= 1, got 8 and 0"),
    c("partition-microbatches-zero", "zero micro-batches",
      "partition --preset tiny --microbatches 0",
      "paci: error: number of micro-batches must be an integer >= 1, got 0"),
    c("partition-microbatches-huge", "10**9 micro-batches",
      "partition --preset tiny --microbatches 1000000000",
      "paci: error: 4 stages x 3,000,000,000 micro-batches is more than paci simulates or records (at most "
      "20,000,000 stage x micro-batch passes, about 2 GB of trace): use fewer --steps or --microbatches"),
    c("partition-accum-zero", "K = 0",
      "partition --preset tiny --accum 0",
      "paci: error: paci: accumulation K must be >= 1, got 0"),
    c("partition-memory-zero", "a zero memory budget",
      "partition --preset tiny --memory-per-stage 0",
      "paci: error: a memory size must be positive (at least one byte), got '0'; e.g. 24GiB"),
    c("partition-memory-negative", "a negative memory budget",
      "partition --preset tiny --memory-per-stage=-1GiB",
      "paci: error: a memory size must be positive (at least one byte), got '-1GiB'; e.g. 24GiB"),
    c("partition-memory-garbage", "a memory budget that is not a size",
      "partition --preset tiny --memory-per-stage lots",
      "paci: error: cannot read 'lots' as a size: write a number with an optional unit (B, KB, MB, GB, TB, "
      "KiB, MiB, GiB, TiB), e.g. 24GiB or 1.5GB"),
    c("partition-memory-inf", "an infinite memory budget",
      "partition --preset tiny --memory-per-stage inf",
      "paci: error: cannot read 'inf' as a size: write a number with an optional unit (B, KB, MB, GB, TB, KiB, "
      "MiB, GiB, TiB), e.g. 24GiB or 1.5GB"),
    c("partition-schedule-unknown", "an unknown schedule",
      "partition --preset tiny --schedule nope",
      "paci: error: unknown schedule 'nope'; choose one of: gpipe, 1f1b, zb-h1, interleaved-1f1b, async-1f1b, "
      "pipedream, 2bw, paci"),
    # ---------- paci plan
    c("plan-preset-unknown", "an unknown preset",
      "plan --preset huge",
      "paci: error: unknown preset 'huge'; choose one of: tiny, small, deep, gpt2, gpt2-medium"),
    c("plan-stages-over-units", "more ranks than units",
      "plan --preset tiny --stages 7",
      "paci: error: --stages must be in 1..6 (the model has 6 units), got 7"),
    c("plan-global-batch-zero", "an empty global batch",
      "plan --preset tiny --global-batch 0",
      "paci: error: --global-batch must be an integer >= 1, got 0"),
    c("plan-global-batch-huge", "10**9 sequences per step",
      "plan --preset tiny --global-batch 1000000000",
      "paci: error: --global-batch must be in 1..1,000,000 sequences, got 1,000,000,000"),
    c("plan-seq-len-over-context", "sequences longer than the model's context",
      "plan --preset tiny --seq-len 99",
      "paci: error: --seq-len must be in 1..32 (the model's context), got 99"),
    c("plan-schedule-unknown", "an unknown schedule in the list",
      "plan --preset tiny --schedules paci,fast",
      "paci: error: unknown schedule 'fast'; choose one of: gpipe, 1f1b, zb-h1, interleaved-1f1b, async-1f1b, "
      "pipedream, 2bw, paci"),
    c("plan-schedules-empty", "an empty schedule list",
      "plan --preset tiny --schedules ,",
      "paci: error: --schedules names no schedule"),
    c("plan-memory-garbage", "a memory budget that is not a size",
      "plan --preset tiny --memory-per-device lots",
      "paci: error: cannot read 'lots' as a size: write a number with an optional unit (B, KB, MB, GB, TB, "
      "KiB, MiB, GiB, TiB), e.g. 24GiB or 1.5GB"),
    c("plan-bandwidth-zero", "a link that carries nothing",
      "plan --preset tiny --bandwidth-gbps 0",
      "paci: error: --bandwidth-gbps must be a finite number > 0, got 0.0"),
    c("plan-latency-negative", "a negative link latency",
      "plan --preset tiny --latency-us=-5",
      "paci: error: --latency-us must be a finite number >= 0, got -5.0"),
    c("plan-threads-huge", "more threads than paci allows",
      "plan --preset tiny --threads 5000",
      "paci: error: --threads must be at most 1024, got 5000"),
    c("plan-costs-missing", "a cost file that is not there",
      "plan --preset tiny --costs nowhere.json",
      "paci: error: --costs nowhere.json: cannot read it (No such file or directory)"),
    c("plan-costs-not-json", "a cost file that is not JSON",
      "plan --preset tiny --costs costs.json",
      "paci: error: --costs costs.json: not valid JSON (Expecting value: line 1 column 1 (char 0))",
      write("costs.json", "F,B\n")),
    c("plan-costs-other-model", "a cost file for another model",
      "plan --preset tiny --costs costs.json",
      "paci: error: --costs costs.json: 1 units, but the preset has 6; give the preset the file describes",
      write("costs.json", '{"units": [{}], "microbatch_size": 1, "seq_len": 8, "latency_s": 0, "bandwidth_Bps": 1}')),
    c("plan-optimizer-unknown", "an optimizer paci does not build",
      "plan --preset tiny --optimizer sgd",
      "paci: error: unknown --optimizer 'sgd'; choose muon or adamw"),
    c("plan-plot-not-png", "a plot file that is not a PNG",
      "plan --preset tiny --plot frontier.jpg",
      "paci: error: --plot frontier.jpg: use a .png file name"),
    c("plan-vocab-tiny", "a vocabulary below the byte alphabet",
      "plan --preset tiny --vocab-size 3",
      "paci: error: --vocab-size must be in [257, 65535] (256 bytes + the end-of-text token; ids are stored as "
      "uint16), got 3"),
    c("partition-interleaved", "a schedule with several stages per rank",
      "partition --preset tiny --schedule interleaved-1f1b",
      "paci: error: paci partition handles one stage per rank; interleaved-1f1b is not supported there yet (choose "
      "one of: gpipe, 1f1b, zb-h1, async-1f1b, pipedream, 2bw, paci)"),
    c("partition-preset-unknown", "an unknown preset",
      "partition --preset tiny --preset huge",
      "paci: error: unknown preset 'huge'; choose one of: tiny, small, deep, gpt2, gpt2-medium"),
]


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    return Shared(tmp_path_factory.mktemp("shared"))


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (with its size and mtime) and folder under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys, shared):
    """Every row: exit code 2, its one line on stderr and no traceback, no file written, no cache entry."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(shared.corpus, tmp_path / "corpus.txt")
    if case.setup is not None:
        case.setup(tmp_path, shared)
    cache = Path(os.environ["PACI_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    before, cached = snapshot(tmp_path), snapshot(cache)
    with socket.socket() as taken:  # the port {port} stands for
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        try:
            code = main(case.argv(port))  # its log lines go to stderr, as in the real CLI
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("paci") and "Traceback" not in err, err
    assert case.matches(lines[0], port), f"\n{lines[0]}\n{case.message}"
    assert snapshot(tmp_path) == before
    assert snapshot(cache) == cached


def test_cases_have_unique_ids():
    """Each row has its own id (the parametrised test and the doc name rows by it)."""
    assert len({case.id for case in CASES}) == len(CASES) >= 45


def markdown() -> str:
    """docs/bad-input.md: the table, one row per case."""
    lines = ["# Bad input", "",
             "Every command refuses bad input the same way: one line on stderr, exit code 2, no traceback, and",
             "nothing written (no run directory, no output file, no data-cache entry). `PACI_DEBUG=1` shows",
             "the traceback instead. These are all the cases `tests/test_bad_input.py` checks; this page is",
             "printed from its table (`.venv/bin/python tests/test_bad_input.py > docs/bad-input.md`), and",
             "a test keeps the two equal. `paci train` rows also pass the flags of a tiny run:",
             f"`{TINY}`. In a message, … stands for text that depends on the input or the machine.", "",
             "| command | bad input | what the user sees |", "|---|---|---|"]
    for case in CASES:
        command, *rest = case.args.split(" ", 1)
        flags = " ".join(rest).replace("{tiny}", "").strip()
        given = f" `{flags}`" if flags else ""
        row = [f"`paci {command}`", f"{case.what}:{given}", f"`{case.message}`"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def test_doc_is_the_table():
    """docs/bad-input.md is exactly what `markdown()` prints from CASES."""
    assert DOC.read_text() == markdown()


if __name__ == "__main__":
    print(markdown(), end="")
