"""User-facing errors shared by every command-line tool of the project.

A :class:`UserError` is a mistake in what the user gave (a wrong path, an unknown layout, an
impossible setting, corrupt shards). Command-line entry points catch it and print its message on
one line, without a traceback, and exit with status 2 (DESIGN.md section 8). Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from common.interrupts import ignore_signals, signal_of, stop_on_signals


class UserError(Exception):
    """An error caused by the user's input; its message says what was expected and where."""


class DataWarning(UserWarning):
    """A warning about the user's data (a damaged shard left out, a resumed stream that differs):
    command-line entry points print it as one line ``warning: ...``, without the location in
    this project's code that a plain warning starts with."""


def _one_line_data_warnings(original: Callable[..., str]) -> Callable[..., str]:
    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, DataWarning):
            return f"warning: {message}\n"
        return original(message, category, filename, lineno, line)

    return formatwarning


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``, turning :class:`UserError`, Ctrl-C and SIGTERM into a one-line message.

    Returns the process exit status: ``main``'s own (0 when it returns None), 2 for a user error,
    130 after Ctrl-C, 143 after SIGTERM (:mod:`common.interrupts`; also when ``main`` swallowed
    the interrupt). While ``main`` runs, a :class:`DataWarning` prints as one line.
    """
    original = warnings.formatwarning
    warnings.formatwarning = _one_line_data_warnings(original)
    with stop_on_signals() as stop:
        try:
            status = main(argv) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            if stop.nested:
                raise  # the outer tool stops and reports it
            ignore_signals()
            stop.signum = stop.signum or signal_of(err)
            print(stop.message, file=sys.stderr)
            return stop.exit_status
        finally:
            warnings.formatwarning = original
        if stop.signum is not None:  # the interrupt was swallowed on the way: still not a success
            print(stop.message, file=sys.stderr)
            return stop.exit_status
        return status
