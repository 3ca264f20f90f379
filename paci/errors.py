"""What a failure exits with, one map for the command line and for every launched rank.

2: the input was wrong (ValueError, OSError: one line says what to fix; nothing was lost).
130: stopped by a signal (as a shell reports Ctrl-C; a run that drained and saved first, too).
1: the run itself failed (a stage's action, too many non-finite values, a lost peer).
"""

from __future__ import annotations

BAD_INPUT, STOPPED, FAILED = 2, 130, 1


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, (ValueError, OSError)):
        return BAD_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return STOPPED
    return FAILED
