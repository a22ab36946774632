"""Error plumbing of the command-line entry points (train, eval, sample, scripts): a failure is
one line, `error: <message>`, printed last, with an exit status that says what kind it was.

Imports nothing from peer_jax, so every module can report through it.
"""

from __future__ import annotations

import os
import sys


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name if it has none)."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


def fail(error: BaseException | str, status: int = 2) -> int:
    """Prints `error: <message>` on stderr and returns the exit status (2: bad configuration).

    Buffered stdout goes out first, so that with both streams on one terminal or pipe the
    message comes last (`exit_cli` keeps it last)."""
    sys.stdout.flush()
    print(f"error: {error}", file=sys.stderr, flush=True)
    return status


def exit_cli(status: int) -> None:
    """`sys.exit(status)` for a command-line entry point whose failure `fail` has reported.

    After a failure, stdout and stderr are flushed and then pointed at /dev/null: whatever
    library threads (TensorStore, orbax), absl or TF print while the interpreter shuts down
    would otherwise follow the error line, which must stay the last thing printed."""
    if status:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    sys.exit(status)
