"""The `paci` command line. The only module that parses argv, prints results or configures logging.

Each subcommand lives in `paci.commands.<name>` with an `add_<name>_parser(subparsers)` and a
`<name>_command(args) -> int`.
Bad input anywhere below raises ValueError/OSError; `main` turns it into one line on stderr and
exit code 2, never a traceback (set PACI_DEBUG=1 to see the traceback), and drops the log lines
the command held back while it checked its input (`paci.commands.HeldLogs`). A run that fails
(RuntimeError: a stage's action, a lost peer, too many non-finite values) is one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch

from paci.commands import HeldLogs
from paci.commands.partition import add_partition_parser
from paci.commands.plan import add_plan_parser
from paci.commands.bench import add_bench_parser
from paci.commands.simulate import add_schedules_parser, add_simulate_parser
from paci.commands.train import add_train_parser
from paci.errors import exit_code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit code 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paci", description="Pipeline-parallel training with PACI and the schedules it is "
                                              "measured against.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_schedules_parser(subparsers)
    add_simulate_parser(subparsers)
    add_train_parser(subparsers)
    add_bench_parser(subparsers)
    add_partition_parser(subparsers)
    add_plan_parser(subparsers)
    return parser


def _terminate(signum, frame) -> None:
    """SIGTERM stops a run the way Ctrl-C does (a training run: drains after its current step and saves; again: at once)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`paci ARGV`; the exit code. Re-entrant: a caller in the same process (a test, a notebook, a
    study) gets its SIGTERM handler, log level and handlers and torch thread count back."""
    previous, threads = signal.signal(signal.SIGTERM, _terminate), torch.get_num_threads()
    try:
        return _command(build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # `paci train` sets its own
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def _command(args: argparse.Namespace) -> int:
    root, logs = logging.getLogger(), HeldLogs(sys.stderr)  # held until the command's input is checked
    level = root.level
    root.addHandler(logs)
    root.setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        if os.environ.get("PACI_DEBUG"):
            logs.let_out()
            raise
        logs.drop()
        print(f"paci: error: {_one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        logs.let_out()
        print("paci: interrupted", file=sys.stderr)
        return exit_code(exc)
    except RuntimeError as exc:  # a run that failed (a stage's action, too many non-finite values, a peer)
        logs.let_out()
        if os.environ.get("PACI_DEBUG"):
            raise
        print(f"paci: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return exit_code(exc)
    finally:
        logs.let_out()
        root.removeHandler(logs)
        root.setLevel(level)


def _one_line(exc: Exception) -> str:
    """The first line of an error; a schedule error's picture of the actions around it stays for PACI_DEBUG=1."""
    first, *more = str(exc).strip().splitlines() or [type(exc).__name__]
    return first + (" (PACI_DEBUG=1 shows the details)" if more else "")


if __name__ == "__main__":
    sys.exit(main())
