"""What every command-line tool of the project shares: the runner that turns a
:class:`~common.errors.UserError` into a one-line message and an exit status.

Every tool (``reid-shards``, ``reid-pretrain``, ``reid-finetune``, ``reid-evaluate``,
``reid-export``, ``reid-demo``, ``reid-bench``) runs its ``main(argv)`` through :func:`run_cli`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from common.errors import DataWarning, UserError


def _one_line_data_warnings(original: Callable[..., str]) -> Callable[..., str]:
    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, DataWarning):
            return f"warning: {message}\n"
        return original(message, category, filename, lineno, line)

    return formatwarning


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``, turning :class:`UserError` and Ctrl-C into a one-line message.

    Returns the process exit status: ``main``'s own (0 when it returns None), 2 for a user error,
    130 after Ctrl-C. While ``main`` runs, a :class:`DataWarning` prints as one line.
    """
    original = warnings.formatwarning
    warnings.formatwarning = _one_line_data_warnings(original)
    try:
        return main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = original
