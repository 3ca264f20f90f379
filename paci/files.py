"""Writing files so that a reader (or a crash) never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, flush it to disk, then rename it over `path`:
    after a crash `path` holds the old contents or the new ones, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Raise ValueError unless `path` (a file, or with `folder` a directory made with its parents)
    can be written, so that bad output paths are refused before anything is computed or written."""
    path = Path(path)
    parent = path.parent
    if folder:  # made with its parents: the nearest existing ancestor must be a folder
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    elif not parent.exists():
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it first or write elsewhere")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {parent} (permission denied); choose another path")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
