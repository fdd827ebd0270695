"""What every command-line tool of the project shares: the runner that turns a
:class:`~common.errors.UserError` into a one-line message and an exit status.

Every tool (``reid-shards``, ``reid-pretrain``, ``reid-finetune``, ``reid-evaluate``,
``reid-export``, ``reid-demo``, ``reid-bench``) runs its ``main(argv)`` through :func:`run_cli` and
parses with :class:`ArgumentParser`: one spelling for every option, underscores
(``--batch_size``), with the dashed one accepted (``--batch-size``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

from common.errors import DataWarning, UserError
from common.interrupts import ignore_signals, signal_of, stop_on_signals


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


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's one option spelling: options are declared
    with underscores (``--batch_size``, ``--output_dir``) and the dashed spelling is accepted as
    the same option (``--batch-size``), in options and in ``--key value`` settings alike.
    Abbreviations are refused (a typo is an error, not another option)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):
        return super().parse_known_args(canonical_options(sys.argv[1:] if args is None else args), namespace)


def canonical_options(argv: Sequence[str]) -> list[str]:
    """``argv`` with dashes inside option names turned into underscores (``--shard-size=64`` ->
    ``--shard_size=64``); values, short options and everything after ``--`` are left alone."""
    out, options = [], True
    for token in argv:
        if token == "--":
            options = False
        elif options and token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = "--" + name.replace("-", "_") + eq + value
        out.append(token)
    return out


def parse_bool(text: str) -> bool:
    """``true/false/yes/no/on/off/1/0`` (any case) as a bool, for ``type=`` of an option."""
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return words[text.lower()]
