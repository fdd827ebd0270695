"""Ctrl-C and SIGTERM: every tool stops with one line and a conventional exit status (130 after
SIGINT, 143 after SIGTERM), never with a traceback, never with status 0, and takes its child
processes down with it.

:func:`stop_on_signals` (used by :func:`common.cli.run_cli`, the runner of every CLI) makes
both signals raise in the main thread: SIGINT a ``KeyboardInterrupt``, SIGTERM a
:class:`Terminated`, a subclass of it, so every ``except KeyboardInterrupt`` cleanup (DataLoader
workers, process pools, progress bars) runs for both. Two places can swallow such an exception:

* a signal that lands where Python cannot raise (a finalizer, an at-fork callback such as
  ``logging``'s lock re-initialisation while a DataLoader forks its workers) is reported through
  ``sys.unraisablehook`` as "Exception ignored ... Traceback" and the program goes on. The hook
  installed here prints nothing for it and delivers the signal to the main thread again
  (``_thread.interrupt_main``), where it raises at the next safe point;
* code that catches everything. The signal is recorded, so the runner still exits 130/143.

Forked children (DataLoader workers, process pools) get SIGTERM's default action back: the
parent's raising handler would make a pool worker print a traceback when the pool terminates it.
"""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

#: The exit status after each signal (128 + the signal number, as shells report it).
EXIT_STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}
MESSAGE = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while :func:`stop_on_signals` is active."""


@dataclass
class Stop:
    """The first stopping signal received (None: none yet)."""

    signum: int | None = None
    #: inside another tool's :func:`stop_on_signals`: the outer one reports the stop
    nested: bool = False

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signum, 130)

    @property
    def message(self) -> str:
        return MESSAGE.get(self.signum, "interrupted")


_active: list[Stop] = []


def _default_sigterm_in_child() -> None:
    if _active:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


def signal_of(err: BaseException) -> int:
    return signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """While active, SIGINT and SIGTERM raise in the main thread (module docstring). Outside the
    main thread (a tool run from a worker thread) signals are left as they are."""
    if _active:  # a tool run by another tool in the same process
        yield Stop(nested=True)
        return
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is None:
            stop.signum = signum
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous_hook = sys.unraisablehook

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):
            # swallowed where it landed: raise it again in the main thread
            _thread.interrupt_main(stop.signum or signal.SIGINT)
            return
        previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = unraisable
    _active.append(stop)
    try:
        yield stop
    finally:
        _active.remove(stop)
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_signals() -> None:
    """Once a stop is being reported, further Ctrl-C / SIGTERM must not interrupt the report."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)




#: Seconds a child process gets to stop after the signal is passed on, before it is killed.
CHILD_GRACE_SECONDS = 30.0


def wait_child(child: subprocess.Popen, grace: float = CHILD_GRACE_SECONDS,
               while_waiting: Optional[Callable[[], None]] = None, every: float = 0.2) -> int:
    """Wait for ``child``; if this process is stopped meanwhile, pass the signal on (a training
    stage saves nothing half-written and stops with one line), give the child ``grace`` seconds,
    then kill it: no child outlives its parent.

    ``while_waiting`` is called every ``every`` seconds until the child ends (the demo tends its
    fine-tuning runs there). If it raises, the child is stopped as on SIGTERM and the error
    goes on."""
    try:
        while while_waiting is not None:
            try:
                return child.wait(timeout=every)
            except subprocess.TimeoutExpired:
                while_waiting()
        return child.wait()
    except BaseException as err:
        stop_children([child], err, grace)
        raise


def stop_children(children: list[subprocess.Popen], err: Optional[BaseException],
                  grace: float = CHILD_GRACE_SECONDS) -> None:
    """Pass a stop on to running ``children``: the signal of ``err`` when it is a
    KeyboardInterrupt (SIGINT, or SIGTERM for :class:`Terminated`), else SIGTERM; each gets
    ``grace`` seconds to end, then is killed (so is every one left after a second Ctrl-C)."""
    stop = signal_of(err) if isinstance(err, KeyboardInterrupt) else signal.SIGTERM
    for child in children:
        if child.poll() is None:
            child.send_signal(stop)
    for child in children:
        try:
            child.wait(timeout=grace)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            child.kill()
            child.wait()


__all__ = ["Stop", "Terminated", "ignore_signals", "signal_of", "stop_children", "stop_on_signals", "wait_child"]
