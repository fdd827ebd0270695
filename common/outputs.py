"""Output paths are checked before any work starts, so no result is computed and then lost.

One way for every tool: :func:`output_folder` for a folder the tool writes into (created when
absent), :func:`output_file` for a single file (its folder created, its ending one the tool can
write). Both *try* a write (a probe file created and removed), since permission bits do not
tell the whole story (a read-only mount, an administrator account, a full disk). A path that
cannot be used is a :class:`UserError` naming the option, the path and the reason.
:func:`writing_failed` turns an ``OSError`` met while writing later (a disk that fills) into
the same kind of one-line message.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from common.errors import UserError


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def _probe(folder: Path, option: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise UserError(f"{option} {folder}: cannot write there ({_reason(err)})") from None


def _existing_parent(path: Path) -> Path:
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def output_folder(path: str | os.PathLike, option: str, *, create: bool = True) -> Path:
    """``path`` as a folder the tool can write into, created when absent (module docstring).
    With ``create=False`` an absent folder is left absent and its nearest existing parent must
    be a folder that takes a write (the tool creates it later, once its settings are checked)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; a folder was expected (it is created when absent)")
    if not create and not path.exists():
        parent = _existing_parent(path)
        if not parent.is_dir():
            raise UserError(f"{option} {path}: cannot create the folder ({parent} is a file)")
        _probe(parent, option)
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = _existing_parent(path)
        what = f"{blocker} is a file" if blocker.is_file() else _reason(err)
        raise UserError(f"{option} {path}: cannot create the folder ({what})") from None
    _probe(path, option)
    return path


def output_file(path: str | os.PathLike, option: str, suffixes: Iterable[str] | None = None) -> Path:
    """``path`` as a file the tool can write: not a folder, one of ``suffixes`` (lower case,
    with the dot) when given, in a folder that exists or can be made and takes a write."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; a file name was expected")
    if suffixes is not None:
        allowed = sorted(set(suffixes))
        if path.suffix.lower() not in allowed:
            raise UserError(f"{option} {path}: the ending {path.suffix or '(none)'!r} is not one this tool "
                            f"writes; use one of {', '.join(allowed)}")
    output_folder(path.parent, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path} exists and is read-only")
    return path


def writing_failed(err: OSError, what: str, keep: str = "") -> UserError:
    """A one-line error for ``err`` met while writing ``what`` (``keep``: what is still safe)."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "the disk is full" if full else _reason(err)
    where = f" ({err.filename})" if err.filename else ""
    return UserError(f"could not write {what}: {reason}{where}{'; ' + keep if keep else ''}")


__all__ = ["output_file", "output_folder", "writing_failed"]
