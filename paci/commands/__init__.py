"""One module per subcommand, each with `add_<name>_parser(subparsers)` and `<name>_command(args) -> int`.

While a command checks its input, the log lines it emits (a corpus loaded, units profiled) are held
back by `HeldLogs`, which `paci.cli.main` installs: bad input then shows only its one error line.
A command calls `input_checked()` once everything is checked and its work begins; from then on,
lines go out as they come.
"""

from __future__ import annotations

import logging
from typing import TextIO


class HeldLogs(logging.Handler):
    """Writes records to `stream` as "%(message)s" lines, but holds them until `let_out`; `drop`
    forgets the held ones (the input was bad: its error line says everything)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        else:
            self._write(record)

    def let_out(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            self._write(record)

    def drop(self) -> None:
        self.held = None

    def _write(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(record.getMessage() + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


def input_checked() -> None:
    """The command's input passed every check: let the held log lines out, and the next ones as they come."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HeldLogs):
            handler.let_out()
