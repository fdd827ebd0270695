"""Reading a text file that a user wrote (list files, id lists, manifests): one way for every tool.

Accepted: UTF-8, UTF-8 with a byte-order mark (Excel, Windows Notepad's "UTF-8 with BOM") and
UTF-16 with a byte-order mark (Notepad's "Unicode"). The BOM is removed, so it never becomes an
invisible character in a first column name. Anything else (Latin-1 bytes, UTF-16 without a BOM,
UTF-32) is a :class:`UserError` that names the file and the line, and says how to save it.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

from common.errors import UserError

SAVE_HINT = "save it as UTF-8 (or UTF-16 with a byte-order mark)"


def _line_of(data: bytes, position: int) -> int:
    return data.count(b"\n", 0, position) + 1


def decode_user_text(data: bytes, name: str) -> str:
    """``data`` as text (module docstring); ``name`` is how errors refer to the file."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise UserError(f"{name} is UTF-32 text; {SAVE_HINT}")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")  # the BOM says which byte order and is dropped
        except UnicodeDecodeError as err:
            raise UserError(f"{name}: broken UTF-16 text after byte {err.start}; {SAVE_HINT}") from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = _line_of(data, err.start)
            raise UserError(
                f"{name}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); {SAVE_HINT}"
            ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"{name}:{line}: NUL characters in text (UTF-16 saved without a byte-order mark?); "
                        f"{SAVE_HINT}")
    return text


def read_user_text(path: str | os.PathLike) -> str:
    """The text of a user's file (module docstring); unreadable or undecodable: a UserError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; a text file was expected") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return decode_user_text(data, str(path))


__all__ = ["decode_user_text", "read_user_text"]
