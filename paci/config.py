"""Run configuration: dataclasses per concern, defaults < TOML file (`--config`) < command-line flags.

Every section validates itself in `__post_init__` and raises ValueError with the fix in the
message; unknown TOML sections or keys are errors too. The resolved config is written into the
run directory as config.json.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paci.model import PRECISIONS, PRESETS
from paci.runtime.stage import OptimizerSpec
from paci.schedules import REGISTRY


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"[{section}] {name} must be an integer >= 1, got {value!r}")


@dataclass
class ModelConfig:
    preset: str = "small"  # a GPT preset: tiny, small, deep, gpt2, gpt2-medium
    vocab_size: int = 4096  # BPE vocabulary for text corpora (a .bin folder brings its own)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        _positive("model", vocab_size=self.vocab_size)


@dataclass
class DataConfig:
    path: str | None = None  # None: the embedded Shakespeare corpus; else a text file/folder or a .bin folder
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int | None = None  # tokens per sequence; default: the preset's context length

    def __post_init__(self) -> None:
        _positive("data", batch_size=self.batch_size, seq_len=self.seq_len)


@dataclass
class PipelineConfig:
    schedule: str = "paci"
    stages: int | None = None  # P; default: --nproc when given, else 4
    microbatches: int = 8  # M, micro-batches per mini-batch
    accum: int | None = None  # K for paci/2bw; default M
    nproc: int = 1  # processes: 1 runs every stage in this process
    split: str = "profile"  # "profile" (measure, then the exact DP), "uniform", or "0:3,3:6,..." unit ranges
    memory_per_stage: str | None = None  # e.g. "24GiB"; default: the device's memory on CUDA, no limit on CPU
    port: int | None = None  # rendezvous port for --nproc (default: a free one)
    timeout_s: float = 45.0  # a rank waiting longer than this on a peer (or at start-up) gives up
    recompute: bool = False  # keep only stage inputs; backward re-runs the forward with the weights of then

    def __post_init__(self) -> None:
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be true or false, got {self.recompute!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.port is not None and not 1024 <= self.port <= 65535:
            raise ValueError(f"--port must be in 1024..65535, got {self.port}")
        if self.schedule not in REGISTRY:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(REGISTRY)}")
        _positive("pipeline", stages=self.stages, microbatches=self.microbatches, accum=self.accum, nproc=self.nproc)
        if self.stages is None:
            self.stages = self.nproc if self.nproc > 1 else 4
        if self.nproc > 1 and self.nproc != self.stages:
            raise ValueError(f"--nproc {self.nproc} must equal --stages {self.stages} (one process per stage); "
                             "drop one of them or make them equal")


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.1
    warmup_steps: int | None = None  # default: 5% of the optimizer steps
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    optimizer: str = "adamw"  # "adamw" or "nadamw" (Adam with Nesterov momentum, decoupled weight decay)
    beta1: float = 0.9  # first-moment decay
    compensate: str | None = None  # stash-free correction for delayed gradients: none, pipemare, nesterov,
    # predict; default: predict for paci (docs/experiments.md), none for every other schedule

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("weight_decay must be >= 0 and min_lr_ratio in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"--beta1 must be in [0, 1), got {self.beta1}")
        OptimizerSpec(name=self.optimizer, compensate=self.compensate or "none")  # checks the choices


@dataclass
class TrainConfig:
    steps: int = 400  # mini-batches of M micro-batches
    seed: int = 0  # model init and data order
    eval_every: int = 50  # optimizer steps between validation rounds
    eval_batches: int = 8  # held-out micro-batches per validation round
    out: str | None = None  # run directory; default runs/<schedule>-<time>
    threads: int | None = None  # torch threads per process; default: the cores, split across processes
    precision: str = "fp32"  # "fp32", or "bf16": autocast over fp32 weights (model.autocast)

    def __post_init__(self) -> None:
        _positive("train", steps=self.steps, eval_every=self.eval_every, eval_batches=self.eval_batches,
                  threads=self.threads)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown --precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.optim.compensate is None:  # the recommended PACI; the paper's plain variant is --compensate none
            self.optim.compensate = "predict" if self.pipeline.schedule == "paci" else "none"
            if self.optim.optimizer != "adamw":
                self.optim.compensate = "none"

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
        if section not in classes or not isinstance(values, dict):
            raise ValueError(f"{origin}: unknown section [{section}]; sections are {', '.join(classes)}")
        known = {f.name for f in dataclasses.fields(classes[section])}
        for key in values:
            if key not in known:
                raise ValueError(f"{origin}: unknown key {key!r} in [{section}]; known keys: {', '.join(sorted(known))}")
        merged[section].update(values)
