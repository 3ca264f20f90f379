"""`paci ...` in the test's own process, for tests that check a command's outputs and files but not
what only a process of its own shows (signals, exit by the interpreter, torchrun).

A fresh `python -m paci` spends seconds importing torch and torch._dynamo (which every torch.optim
optimizer imports at construction) before it trains a step; through `paci.cli.main` here, both are
warm, and so is the fork server that `--nproc` and `--dp` ranks are forked from.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Mapping

from paci.cli import main


def paci(*argv: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`paci ARGV` through the CLI's entry point; the exit code, stdout and stderr as subprocess.run
    returns them (this process's: what `--nproc` ranks print goes to the fork server's streams).
    `env` sets environment variables for the command, restored after."""
    stdout, stderr = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # a usage error, from argparse
                code = exc.code
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["paci", *argv], code, stdout.getvalue(), stderr.getvalue())
