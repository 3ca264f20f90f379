"""The training job end to end in one process: what a run at a different micro-batch count keeps equal."""

import math

from paci.config import load_config
from paci.train import train


def _run(tmp_path, name: str, microbatches: int, batch_size: int, eval_batches: int) -> list[float]:
    config = load_config(overrides={
        "model": {"preset": "tiny"}, "data": {"batch_size": batch_size},
        "pipeline": {"schedule": "1f1b", "stages": 2, "microbatches": microbatches, "split": "uniform"},
        "train": {"steps": 6, "eval_every": 3, "eval_batches": eval_batches, "out": str(tmp_path / name),
                  "threads": 1}})
    losses: list[float] = []
    summary, _ = train(config, on_record=lambda record: losses.append(record["loss"]) if "loss" in record else None)
    return [*losses, summary["final_val_loss"]]


def test_flush_trajectory_is_independent_of_the_microbatch_count(tmp_path):
    """1F1B-flush with 2 micro-batches of 4 sequences and with 4 of 2 sees the same 8 sequences per
    step and evaluates the same 16 held-out sequences: the losses agree up to float summation order."""
    coarse = _run(tmp_path, "m2", microbatches=2, batch_size=4, eval_batches=4)
    fine = _run(tmp_path, "m4", microbatches=4, batch_size=2, eval_batches=8)
    assert len(coarse) == len(fine) == 7
    for a, b in zip(coarse, fine):
        assert math.isclose(a, b, rel_tol=1e-4), (coarse, fine)


def test_a_split_is_pinned_from_a_previous_run(tmp_path):
    """--split RUN_DIR reuses the split that run resolved (a profiled one depends on the machine's
    timings); a folder that is not a run is refused with the fix."""
    import json

    import pytest

    from paci.train import make_plan

    def config(split: str, name: str):
        return load_config(overrides={"model": {"preset": "tiny"}, "pipeline": {"stages": 2, "split": split},
                                      "train": {"steps": 1, "out": str(tmp_path / name), "threads": 1}})

    first, _ = train(config("0:2,2:6", "first"))
    assert json.loads((tmp_path / "first" / "config.json").read_text())["resolved"]["split"] == "0:2,2:6"
    assert make_plan(config(str(tmp_path / "first"), "second")).split == [(0, 2), (2, 6)]
    with pytest.raises(ValueError, match="expected a paci run directory"):
        make_plan(config(str(tmp_path), "third"))


def test_logged_throughput_and_times_mean_what_they_say(tmp_path):
    """metrics.jsonl: `wall_s` rises step by step and `tok_per_s` is that step's tokens over that
    step's time (not a running average); the summary's `tokens_per_s` is all tokens over all time."""
    records: list[dict] = []
    config = load_config(overrides={
        "model": {"preset": "tiny"}, "data": {"batch_size": 2, "seq_len": 16},
        "pipeline": {"schedule": "1f1b", "stages": 2, "microbatches": 2, "split": "uniform"},
        "train": {"steps": 5, "eval_every": 5, "eval_batches": 1, "out": str(tmp_path / "run"), "threads": 1}})
    summary, _ = train(config, on_record=records.append)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    previous = {"tokens": 0, "wall_s": 0.0}
    for record in steps:
        took = record["wall_s"] - previous["wall_s"]
        assert took > 0
        assert math.isclose((record["tokens"] - previous["tokens"]) / record["tok_per_s"], took, abs_tol=1.5e-3)
        previous = record
    assert math.isclose(summary["tokens_per_s"], steps[-1]["tokens"] / steps[-1]["wall_s"], rel_tol=1e-9)
