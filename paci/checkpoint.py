"""Checkpoints: complete or absent, loadable without executing code, refused when they belong to another run.

Layout, one folder per drain point::

    run_dir/checkpoints/step-000040/stage-0.pt ... stage-<P-1>.pt
    run_dir/checkpoints/step-000040/manifest.json    (written last: the checkpoint exists once it does)

Each stage file is written to a temporary name, fsynced and renamed; the manifest lists every
stage file with its SHA-256 and the run's identity (what must not change across a resume). The
two newest complete checkpoints are kept, so a stage file found corrupt falls back to the one
before. Stage files hold only tensors, numbers and strings (`torch.save`), and are read with
`torch.load(weights_only=True)`, which refuses any pickle that would build other objects or run code.

Checkpoints are taken only at drain points (`ir.with_drains`): no micro-batch is in flight, so a
stage's state is its weights, optimizer, LR schedule, version and RNG, and the data position is
the step itself (data are numbered by sequence).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from paci.files import atomic_write, write_text

log = logging.getLogger(__name__)

KEEP = 2  # complete checkpoints kept: the newest and the one before, for a corrupt stage file


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def folder_for(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_stage(run_dir: Path, step: int, index: int, state: dict[str, Any]) -> dict[str, Any]:
    """Write one stage's state atomically; returns its manifest entry (file name, bytes, SHA-256)."""
    path = folder_for(run_dir, step) / f"stage-{index}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return {"stage": index, "file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(run_dir: Path, step: int, identity: dict[str, Any], entries: list[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> Path:
    """Mark the checkpoint at `step` complete, then drop all but the newest `KEEP` complete ones."""
    folder = folder_for(run_dir, step)
    manifest = {"step": step, "identity": identity, "stages": sorted(entries, key=lambda e: e["stage"]),
                **(extra or {})}
    write_text(folder / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    complete = [f for f in _folders(run_dir) if (f / "manifest.json").is_file()]
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest(run_dir: Path) -> dict[str, Any]:
    """The newest complete checkpoint whose stage files all pass their checksums (warning about any
    newer one that does not), as its manifest plus "folder"; CheckpointError if there is none."""
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder: is it a paci run directory?")
    for folder in reversed(_folders(run_dir)):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            for entry in manifest["stages"]:
                if _sha256(folder / entry["file"]) != entry["sha256"]:
                    raise CheckpointError(f"{entry['file']} fails its checksum")
        except FileNotFoundError as exc:
            if (folder / "manifest.json").is_file():  # a listed stage file is gone
                log.warning("paci: checkpoint %s is incomplete (%s); using an older one", folder.name,
                            Path(exc.filename or "").name)
            continue  # no manifest: a checkpoint interrupted while being written
        except (CheckpointError, json.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("paci: checkpoint %s is damaged (%s); using an older one", folder.name, exc)
            continue
        return {**manifest, "folder": str(folder)}
    raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from; start a new run")


def check_identity(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume when anything that fixes the computation differs; name the first field that does."""
    saved, current = _flat(saved), _flat(current)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"the checkpoint was written with {key} = {_show(saved.get(key))}, this run has "
                                  f"{key} = {_show(current.get(key))}; resume with the run's own settings")


def _flat(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def load_stage(manifest: dict[str, Any], index: int, device: torch.device) -> dict[str, Any]:
    """One stage's state; only tensors, numbers, strings and containers of them are accepted."""
    path = Path(manifest["folder"]) / f"stage-{index}.pt"
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} holds objects other than tensors and numbers; refusing to load it "
                              f"(torch.load weights_only: {first})") from None


def _folders(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    folders = [f for f in (run_dir / "checkpoints").glob("step-*") if f.is_dir() and f.name[5:].isdigit()]
    return sorted(folders, key=lambda f: int(f.name[5:]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."

