"""User-facing errors shared by every command-line tool of the project.

A :class:`UserError` is a mistake in what the user gave (a wrong path, an unknown layout, an
impossible setting, corrupt shards). Command-line entry points (:func:`common.cli.run_cli`) catch
it and print its message on one line, without a traceback, and exit with status 2 (DESIGN.md
section 8). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; its message says what was expected and where."""


class DataWarning(UserWarning):
    """A warning about the user's data (a damaged shard left out, a resumed stream that differs):
    command-line entry points print it as one line ``warning: ...``, without the location in
    this project's code that a plain warning starts with."""
