"""Run configuration: dataclasses per concern, defaults < TOML file (`--config`) < command-line flags.

Every section validates itself in `__post_init__` and raises ValueError with the fix in the
message; unknown TOML sections or keys are errors too. The resolved config is written into the
run directory as config.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paci.checks import check_integer, parse_bytes
from paci.data import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE
from paci.model import PRECISIONS, PRESETS
from paci.runtime.stage import OptimizerSpec
from paci.schedules import lookup


MAX_THREADS = 1024  # torch threads per process; far beyond it the OpenMP pool cannot even be allocated
_KINDS = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number"),
          "bool": (bool, "true or false")}


def _check_types(section: str, values: Any) -> None:
    """Each field of a section holds a value of its annotated type: a TOML file or a config.json can
    hold anything ('5' for 5, 2.5 or true for an integer, a list for a string)."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        kinds = [kind.strip() for kind in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        if not any(_is_kind(value, kind) for kind in kinds if kind in _KINDS):
            wanted = " or ".join(_KINDS[kind][1] for kind in kinds if kind in _KINDS)
            raise ValueError(f"[{section}] {f.name} must be {wanted}, got {_show(value)}")


def _is_kind(value: Any, kind: str) -> bool:
    return isinstance(value, _KINDS[kind][0]) and (kind == "bool" or not isinstance(value, bool))


def _show(value: Any) -> str:
    """A value as TOML writes it, and what it is: "'5' (a string)", "true (a boolean)"."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    kind = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None:
            check_integer(f"[{section}] {name}", value)


@dataclass
class ModelConfig:
    preset: str = "small"  # a GPT preset: tiny, small, deep, gpt2, gpt2-medium
    vocab_size: int = 4096  # BPE vocabulary for text corpora (a .bin folder brings its own)

    def __post_init__(self) -> None:
        _check_types("model", self)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"--vocab-size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 bytes + the "
                             f"end-of-text token; ids are stored as uint16), got {self.vocab_size}")


@dataclass
class DataConfig:
    path: str | None = None  # None: the embedded Shakespeare corpus; else a text file/folder or a .bin folder
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int | None = None  # tokens per sequence; default: the preset's context length

    def __post_init__(self) -> None:
        _check_types("data", self)
        _positive("data", batch_size=self.batch_size, seq_len=self.seq_len)


@dataclass
class PipelineConfig:
    schedule: str = "paci"
    stages: int | None = None  # P; default: --nproc when given, else 4
    microbatches: int = 8  # M, micro-batches per mini-batch
    accum: int | None = None  # K for paci/2bw; default M
    nproc: int = 1  # processes: 1 runs every stage in this process
    dp: int = 1  # data-parallel replicas of the pipeline (one process per stage and replica)
    split: str = "profile"  # "profile" (measure, then the exact DP), "uniform", or "0:3,3:6,..." unit ranges
    memory_per_stage: str | None = None  # e.g. "24GiB"; default: the device's memory on CUDA, no limit on CPU
    port: int | None = None  # rendezvous port for --nproc (default: a free one)
    timeout_s: float = 45.0  # a rank waiting longer than this on a peer (or at start-up) gives up
    recompute: bool = False  # keep only stage inputs; backward re-runs the forward with the weights of then
    chunks: int | None = None  # interleaved-1f1b: stages per rank (default 2); the model is cut into chunks x stages
    sync_steps: int = 0  # an asynchronous schedule's first optimizer steps run as 1F1B-flush (a synchronous start)

    def __post_init__(self) -> None:
        _check_types("pipeline", self)
        if not 0 < self.timeout_s <= 86400:
            raise ValueError(f"--timeout must be seconds in (0, 86400], got {self.timeout_s!r}")
        if self.port is not None and not 1024 <= self.port <= 65535:
            raise ValueError(f"--port must be in 1024..65535, got {self.port}")
        lookup(self.schedule)
        _positive("pipeline", stages=self.stages, microbatches=self.microbatches, accum=self.accum, nproc=self.nproc,
                  dp=self.dp, chunks=self.chunks)  # a --chunks the schedule cannot take: schedules.build says so
        if self.stages is None:
            self.stages = self.nproc // self.dp if self.nproc > 1 else 4
        if self.dp > 1 and self.nproc == 1:
            self.nproc = self.stages * self.dp  # one process per stage and replica
        if self.nproc > 1 and self.nproc != self.stages * self.dp:
            raise ValueError(f"--nproc {self.nproc} must equal --stages {self.stages}"
                             + (f" x --dp {self.dp}" if self.dp > 1 else "")
                             + " (one process per stage" + (" and replica" if self.dp > 1 else "")
                             + "); drop --nproc or make them agree")
        if self.memory_per_stage is not None:
            parse_bytes(self.memory_per_stage)


DEFAULT_LR = {"muon": 1.6e-2, "adamw": 2e-3, "nadamw": 2e-3}  # each one's best peak rate on the deep and small
# presets (docs/results.md: the optimizer axis); Muon's is the AdamW-matched rate (adjust_lr_fn="match_rms_adamw")


@dataclass
class OptimConfig:
    lr: float | None = None  # peak learning rate; default: the optimizer's DEFAULT_LR
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # default: 5% of the optimizer steps
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    optimizer: str = "muon"  # "muon" (Muon on the hidden matrices, AdamW on embeddings, head and 1-D parameters:
    # paci.optim; the recommended optimizer for PACI, docs/experiments.md), "adamw" or "nadamw" (Adam with Nesterov
    # momentum, decoupled weight decay)
    beta1: float = 0.9  # first-moment decay
    compensate: str | None = None  # stash-free correction for delayed gradients: none, pipemare, nesterov,
    # predict, predict-window, dc; default: predict-window for paci with adamw (docs/experiments.md), none for
    # every other schedule and optimizer
    predict_gain: float = 1.0  # the predicted displacement's scale (predict, predict-window)
    dc_lambda: float = 1.0  # the curvature's scale (dc)
    clip_grad_norm: float = 0.0  # 0: off; else the largest gradient norm (global on flush schedules, per stage
    # on asynchronous ones: docs/design.md)

    def __post_init__(self) -> None:
        _check_types("optim", self)
        OptimizerSpec(name=self.optimizer, compensate=self.compensate or "none")  # checks the choices
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name in ("lr", "weight_decay", "min_lr_ratio", "beta1", "clip_grad_norm", "predict_gain", "dc_lambda"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"[optim] {name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("weight_decay must be >= 0 and min_lr_ratio in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"--beta1 must be in [0, 1), got {self.beta1}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"--clip-grad-norm must be >= 0 (0: off), got {self.clip_grad_norm}")
        if not self.predict_gain > 0:
            raise ValueError(f"--predict-gain must be > 0, got {self.predict_gain}")


@dataclass
class TrainConfig:
    steps: int = 400  # mini-batches of M micro-batches
    seed: int = 0  # model init and data order
    eval_every: int = 50  # optimizer steps between validation rounds
    eval_batches: int = 8  # held-out micro-batches per validation round
    out: str | None = None  # run directory; default runs/<schedule>-<time>
    threads: int | None = None  # torch threads per process; default: the cores, split across processes
    precision: str = "fp32"  # "fp32", or "bf16": autocast over fp32 weights (model.autocast)
    nonfinite_limit: int = 20  # micro-batches dropped plus updates skipped for non-finite values, per stage,
    # before the run stops
    checkpoint_every: int | None = None  # optimizer steps between checkpoints (drain points); 0: only at the
    # end; default: the fewest for which the drains cost under 1% (schedules.drain_interval)
    # what a run writes besides config.json, metrics.jsonl and summary.json; each can be turned off
    eval: bool = True  # validation rounds (val_loss in metrics.jsonl)
    checkpoint: bool = True  # checkpoints (and the drain points they need); off: nothing to resume from
    trace: bool = True  # trace.json, the measured and predicted timelines (multi-process runs)
    plots: bool = True  # loss.png; timeline.png and timeline_predicted.png (multi-process runs)

    def __post_init__(self) -> None:
        _check_types("train", self)
        if self.eval_every == 0:
            raise ValueError("--eval-every must be an integer >= 1 (optimizer steps between validation rounds); "
                             "--no-eval turns validation off")
        _positive("train", steps=self.steps, eval_every=self.eval_every, eval_batches=self.eval_batches,
                  threads=self.threads)
        if self.threads is not None and self.threads > MAX_THREADS:
            raise ValueError(f"--threads must be at most {MAX_THREADS}, got {self.threads}; leave it out to use "
                             "this machine's cores")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        check_integer("--nonfinite-limit", self.nonfinite_limit, 0)
        if self.checkpoint_every is not None:
            check_integer("--checkpoint-every", self.checkpoint_every, 0)
        if self.checkpoint_every is not None and not self.checkpoint:
            raise ValueError(f"--checkpoint-every {self.checkpoint_every} asks for checkpoints that --no-checkpoint "
                             "turns off; drop one of them")
        check_integer("--seed", self.seed, 0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.optim.compensate is None:  # the recommended PACI; the paper's plain variant is --compensate none
            adamw_paci = self.pipeline.schedule == "paci" and self.optim.optimizer == "adamw"
            self.optim.compensate = "predict-window" if adamw_paci else "none"

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _section_classes() -> dict[str, type]:
    return {f.name: type(f.default_factory()) for f in dataclasses.fields(RunConfig)}


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """Defaults, then the TOML file, then `overrides` ({section: {key: value}}; None values are skipped)."""
    classes = _section_classes()
    merged: dict[str, dict[str, Any]] = {name: {} for name in classes}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            document = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {path}: not valid TOML ({exc})") from None
        _merge(merged, document, str(path))
    for section, values in (overrides or {}).items():
        merged[section].update({k: v for k, v in values.items() if v is not None})
    return RunConfig(**{name: classes[name](**values) for name, values in merged.items()})


def _merge(merged: dict[str, dict[str, Any]], document: dict[str, Any], origin: str) -> None:
    classes = _section_classes()
    for section, values in document.items():
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: {section} = {values!r} is outside any section; put it under its section "
                             f"({', '.join(f'[{name}]' for name in classes)})")
        if section not in classes:
            raise ValueError(f"{origin}: unknown section [{section}]; sections are {', '.join(classes)}")
        known = {f.name for f in dataclasses.fields(classes[section])}
        for key in values:
            if key not in known:
                raise ValueError(f"{origin}: unknown key {key!r} in [{section}]; known keys: {', '.join(sorted(known))}")
        merged[section].update(values)


def load_run_config(run_dir: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The settings of an existing run (its config.json, with the split it resolved), for a resume;
    `overrides` are applied on top, and a checkpoint refuses any that change the computation."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {run_dir}: no config.json there; give a paci run directory")
    try:
        saved = json.loads(path.read_text())
        resolved = saved.pop("resolved")
        saved["pipeline"]["split"] = resolved["split"]
        saved["train"]["out"] = str(run_dir)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--resume {run_dir}: config.json is damaged ({type(exc).__name__}: {exc})") from None
    classes = _section_classes()
    if set(saved) != set(classes) or not all(isinstance(v, dict) for v in saved.values()):
        raise ValueError(f"--resume {run_dir}: config.json has sections {sorted(saved)}, expected {sorted(classes)}")
    for section, values in (overrides or {}).items():
        saved[section].update({k: v for k, v in values.items() if v is not None})
    try:
        return RunConfig(**{name: classes[name](**values) for name, values in saved.items()})
    except TypeError as exc:
        raise ValueError(f"--resume {run_dir}: config.json does not match this paci ({exc})") from None
