"""`paci train`: train a GPT with a pipeline schedule; progress on the terminal, plots in the run directory."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from paci import schedules
from paci.commands import input_checked
from paci.metrics import to_json

log = logging.getLogger("paci")


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a GPT with a pipeline schedule (PACI by default)",
                              description="Train on the embedded Shakespeare corpus unless --data says otherwise. "
                                          "Precedence: defaults < --config TOML < flags.")
    p.add_argument("--config", type=Path, help="TOML file with [model] [data] [pipeline] [optim] [train] sections")
    p.add_argument("--preset", help="model preset: tiny, small (default), deep, gpt2, gpt2-medium")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary trained on a text corpus (default 4096)")
    p.add_argument("--schedule", help=f"one of: {', '.join(schedules.REGISTRY)} (default paci)")
    p.add_argument("--stages", type=int, help="pipeline depth P: ranks (default: --nproc if given, else 4)")
    p.add_argument("--chunks", type=int, help="stages per rank for interleaved-1f1b (default 2): the model is cut "
                                              "into chunks x P stages, rank r holding r, r + P, ...")
    p.add_argument("--microbatches", type=int, help="micro-batches per mini-batch M (default 8)")
    p.add_argument("--accum", type=int, help="K, backwards per optimizer step for paci/2bw (default M)")
    p.add_argument("--sync-steps", type=int, dest="sync_steps",
                   help="run an asynchronous schedule's first N optimizer steps as 1F1B-flush (default 0)")
    p.add_argument("--steps", type=int, help="mini-batches to train (default 400)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1.6e-2 with muon, 2e-3 with adamw or nadamw)")
    p.add_argument("--warmup", type=int, dest="warmup_steps", help="LR warm-up steps (default 5%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, dest="min_lr_ratio",
                   help="the cosine schedule ends at this fraction of --lr (default 0.1)")
    p.add_argument("--weight-decay", type=float, dest="weight_decay", help="decoupled weight decay (default 0.1)")
    p.add_argument("--optimizer", help="muon (default: Muon on the hidden matrices, AdamW with --beta1 on the rest, "
                                       "one --lr), adamw, or nadamw (Adam with Nesterov momentum)")
    p.add_argument("--beta1", type=float, help="the optimizer's first-moment decay (default 0.9)")
    p.add_argument("--clip-grad-norm", type=float, dest="clip_grad_norm",
                   help="clip the gradient to this norm before each step (default 0: off): the global norm on a "
                        "flush schedule, each stage's own on an asynchronous one")
    p.add_argument("--compensate", help="stash-free correction for delayed gradients: none (the default, the paper's "
                                        "plain PACI; with adamw on paci: predict-window), predict (adamw or muon: "
                                        "forwards that an update will overtake run on predicted weights), "
                                        "predict-window (predict, with the gradient the stage's window already holds), "
                                        "pipemare (lr / delay^p, annealed), nesterov (NAdamW, beta1 0.99, on delayed "
                                        "stages), dc "
                                        "(adamw: delayed gradients corrected by its second moment times the last "
                                        "update, DC-ASGD)")
    p.add_argument("--predict-gain", type=float, dest="predict_gain",
                   help="scale of the predicted weight displacement (default 1; > 1 over-relaxes)")
    p.add_argument("--dc-lambda", type=float, dest="dc_lambda",
                   help="scale of the curvature in --compensate dc's correction (default 1)")
    p.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    p.add_argument("--data", help="text file, folder of .txt, or folder with train.bin/val.bin (default: embedded)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--eval-every", type=int, help="optimizer steps between validation rounds (default 50)")
    p.add_argument("--eval-batches", type=int, help="held-out micro-batches per validation round (default 8)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: the cores, split across "
                                               "processes)")
    p.add_argument("--out", help="run directory (default runs/<schedule>-<time>); must not exist or be empty")
    p.add_argument("--split", help='stage split: "profile" (default: measure the units, then the exact DP; '
                                   'timing-dependent), "uniform", unit ranges like 0:3,3:6,6:10 (see paci '
                                   'partition), or a run directory whose split to reuse')
    p.add_argument("--precision", help="fp32 (default) or bf16: autocast over fp32 weights; a Linear's backward "
                                       "then reads the bf16 weight copy its forward made (docs/design.md)")
    p.add_argument("--recompute", action="store_true", default=None,
                   help="keep only each stage's input per in-flight micro-batch; backward re-runs the forward "
                        "with the weights of that moment (costs one more forward)")
    p.add_argument("--memory-per-stage", help="memory budget per stage for the profiled split, e.g. 24GiB "
                                              "(default: the GPU's memory; none on CPU)")
    p.add_argument("--nproc", type=int, help="spawn this many local processes, one stage each (gloo on CPU, "
                                             "NCCL on GPU); under torchrun leave it out")
    p.add_argument("--dp", type=int, help="data-parallel replicas of the pipeline (default 1): each takes --batch-size "
                                          "sequences of every micro-batch; --stages x --dp processes")
    p.add_argument("--port", type=int, help="rendezvous port for --nproc (default: a free one)")
    p.add_argument("--timeout", type=float, dest="timeout_s",
                   help="seconds a rank waits for a peer before giving up (default 45)")
    p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every",
                   help="optimizer steps between checkpoints, taken where the schedule drains (0: only at the end; "
                        "default: the fewest whose drains cost under 1%%)")
    p.add_argument("--nonfinite-limit", type=int, dest="nonfinite_limit",
                   help="micro-batches a stage may drop, plus updates it may skip, for a non-finite loss or gradient "
                        "before the run stops (default 20)")
    outputs = p.add_argument_group("outputs", "what a run writes besides config.json, metrics.jsonl and summary.json "
                                              "(each on by default)")
    on_off = argparse.BooleanOptionalAction
    outputs.add_argument("--eval", action=on_off, help="validation rounds (--eval-every, --eval-batches)")
    outputs.add_argument("--checkpoint", action=on_off,
                         help="checkpoints and the drain points they need; without them a run cannot be resumed")
    outputs.add_argument("--trace", action=on_off, help="trace.json: measured and predicted timelines for Perfetto "
                                                        "(multi-process runs)")
    outputs.add_argument("--plots", action=on_off, help="loss.png, and timeline.png and timeline_predicted.png in "
                                                        "multi-process runs")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest complete checkpoint, with its own settings; the result "
                        "equals the run that never stopped, bit for bit")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    p.set_defaults(func=train_command)


_TRAIN_FLAGS = {"model": {"preset": "preset", "vocab_size": "vocab_size"},
                "data": {"data": "path", "batch_size": "batch_size", "seq_len": "seq_len"},
                "pipeline": {"schedule": "schedule", "stages": "stages", "microbatches": "microbatches",
                             "accum": "accum", "nproc": "nproc", "dp": "dp", "port": "port", "timeout_s": "timeout_s",
                             "split": "split", "memory_per_stage": "memory_per_stage",
                             "recompute": "recompute", "chunks": "chunks", "sync_steps": "sync_steps"},
                "optim": {"lr": "lr", "warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio",
                          "weight_decay": "weight_decay", "optimizer": "optimizer", "beta1": "beta1",
                          "compensate": "compensate", "clip_grad_norm": "clip_grad_norm",
                          "predict_gain": "predict_gain", "dc_lambda": "dc_lambda"},
                "train": {"steps": "steps", "seed": "seed", "eval_every": "eval_every",
                          "eval_batches": "eval_batches", "threads": "threads", "out": "out",
                          "precision": "precision", "checkpoint_every": "checkpoint_every",
                          "nonfinite_limit": "nonfinite_limit", "eval": "eval", "checkpoint": "checkpoint",
                          "trace": "trace", "plots": "plots"}}


def train_command(args: argparse.Namespace) -> int:
    from paci.config import load_config, load_run_config
    from paci.runtime.launch import STOP_SIGNAL, STOPPING, StopRequest, run_rank, spawn
    from paci.runtime.mesh import env_rank

    overrides = {section: {key: getattr(args, flag) for flag, key in flags.items()}
                 for section, flags in _TRAIN_FLAGS.items()}
    resume = args.resume is not None
    if resume and (args.config is not None or args.out is not None):
        raise ValueError("--resume continues the run in RUN_DIR with its own config.json; drop --config and --out")
    info = env_rank()
    if info is not None:  # under torchrun: this process is one rank; --stages defaults to the world size
        overrides["pipeline"]["stages"] = overrides["pipeline"]["stages"] or info.world_size // (args.dp or 1)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and args.out and not resume:
            # torchrun --max-restarts restarted the workers: continue --out from its newest checkpoint
            resume, args.resume = True, Path(args.out)
            overrides["train"]["out"] = None
            log.warning("paci: restarted by torchrun; resuming %s", args.out)
    config = load_run_config(args.resume, overrides) if resume else load_config(args.config, overrides)
    if info is not None:
        return run_rank(_train_rank, (config, args.json, resume))
    if config.pipeline.nproc == 1:
        from paci.train import train

        progress = _Progress(quiet=args.json)
        stop = StopRequest((signal.SIGINT, signal.SIGTERM), STOPPING)
        try:
            summary, _ = train(config, on_record=progress.record, on_plan=progress.start_checked, resume=resume,
                               stop=stop)
        except KeyboardInterrupt:
            progress.interrupted()
            raise
        progress.close()
        _finish(summary, args.json)
        return 0
    import torch

    from paci.partition import split_spec
    from paci.runtime.launch import check_port, start_fork_server, threads_per_rank
    from paci.train import make_plan

    if config.pipeline.port is not None:
        check_port(config.pipeline.port)
    start_fork_server(_train_rank, ("paci.train",))  # it imports what ranks need while this process checks the plan

    torch.set_num_threads(config.train.threads or threads_per_rank(config.pipeline.nproc))  # profile as a rank runs
    plan = make_plan(config, resume)  # check everything (warm the data cache, profile the split) before any rank starts
    config.pipeline.split = split_spec(plan.split)  # rank 0 names and claims the run directory
    input_checked()
    try:
        return spawn(_train_rank, (config, args.json, resume), config.pipeline.nproc, port=config.pipeline.port,
                     threads=config.train.threads, stop_signal=STOP_SIGNAL if plan.drains_midway else None)
    except KeyboardInterrupt:
        _Progress(quiet=False).interrupted(config.train.out)
        raise


def _train_rank(payload) -> int:
    """One rank of a multi-process run (spawned, or started by torchrun)."""
    from paci.runtime.launch import STOPPING, StopRequest, spawned, stop_signals
    from paci.runtime.mesh import env_rank
    from paci.train import train_rank

    config, as_json, resume = payload
    progress = _Progress(quiet=as_json)
    under_torchrun = not spawned()  # else paci's own launcher announces and reports
    stop = StopRequest(stop_signals(), STOPPING if under_torchrun and env_rank().rank == 0 else None)
    try:
        summary = train_rank(config, on_record=progress.record, on_plan=progress.start, resume=resume, stop=stop)
    except KeyboardInterrupt:
        if under_torchrun:
            progress.interrupted()
        raise
    progress.close()
    if summary is not None:
        _finish(summary, as_json)
    return 0


def _finish(summary: dict, as_json: bool) -> None:
    if as_json:
        print(to_json(summary, indent=1))
        return
    dropped, skipped = summary["nonfinite_microbatches"], sum(map(len, summary["skipped_updates"]))
    if dropped or skipped:
        log.warning("paci: %d micro-batches had a non-finite loss and were left out; %d stage updates were skipped "
                    "for a non-finite gradient (metrics.jsonl, summary.json)", dropped, skipped)
    line = f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.0f} s | "
    if summary["final_val_loss"] is not None:
        line += (f"val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} "
                 f"(ppl {summary['final_val_ppl']:.1f}) | ")
    else:
        line += f"train loss {summary['final_train_loss']:.3f} | "
    line += f"max Δ {summary['max_drift']}"
    if "bubble_fraction" in summary:
        line += (f" | bubble {summary['bubble_fraction']:.1%} | measured/predicted makespan "
                 f"{summary['makespan_ratio']:.3f}")
    print(line + f" | {summary['run_dir']}")


class _Progress:
    """paci train's progress: the run's header lines, then `paci.progress.Progress` (a tqdm bar on a
    terminal, plain log lines otherwise) with the validation perplexity."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.shown = None

    def start_checked(self, plan) -> None:
        """`start`, in a run whose plan this process made: every check has passed."""
        input_checked()
        self.start(plan)

    def start(self, plan) -> None:
        from paci.progress import Progress

        self.run_dir = plan.run_dir
        self.shown = Progress(plan.schedule.num_steps, bool(plan.eval_rounds), ("val_ppl", "val ppl", ".1f"),
                              quiet=self.quiet)
        if self.quiet:
            return
        depth = f"P={plan.num_ranks}" + (f" x {plan.schedule.stages_per_rank} stages per rank"
                                         if plan.num_ranks != plan.num_stages else "")
        optim = plan.config.optim
        log.info("%s | %s, M=%d, K=%d | %s lr %g, compensate %s | %s | %s | run dir %s", plan.schedule.name,
                 depth, plan.config.pipeline.microbatches, plan.schedule.accumulation, optim.optimizer, optim.lr,
                 optim.compensate, plan.config.model.preset, plan.data.source, plan.run_dir)
        every = f"every {plan.checkpoint_every} steps and " if plan.checkpoint_every else ""
        if plan.checkpoints:
            log.info("checkpoints %sat the end (drain points of the schedule)%s", every,
                     f"; resuming after step {plan.start_step}" if plan.resume else "")
        else:
            log.info("no checkpoints (--no-checkpoint): this run cannot be resumed")

    def record(self, record: dict) -> None:
        if self.shown is not None:
            self.shown(record)

    def close(self) -> None:
        if self.shown is not None:
            self.shown.close()

    def interrupted(self, run_dir: str | Path | None = None) -> None:
        """Ctrl-C or SIGTERM: say where the run can be resumed from (the newest complete checkpoint)."""
        from paci.checkpoint import CheckpointError, latest

        self.close()
        run_dir = run_dir or getattr(self, "run_dir", None)
        if run_dir is None:
            return
        try:
            step = latest(Path(run_dir))["step"]
        except CheckpointError:
            log.error("paci: no checkpoint was complete yet in %s", run_dir)
            return
        log.error("paci: the newest checkpoint is after step %d; continue with: paci train --resume %s", step, run_dir)
