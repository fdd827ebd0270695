"""A list file for any other dataset: CSV (with a header row) or JSONL, one image per row.

Columns: ``path`` (required; relative to the list file's folder, or absolute), ``pid`` and
``camera`` (integers, default -1), ``modality`` (``rgb``/``ir``, default ``rgb``), ``split``
(``train``/``query``/``gallery``/``all``, default ``train``). The file is read as a user's text
file (:mod:`common.textfiles`: UTF-8, with or without BOM, or UTF-16 with BOM). An unknown
column is an error (it is usually a typo that would otherwise silently fall back to a default),
so is a row that breaks the file's structure; a row with a bad value (a pid that is not a whole
number, an unknown modality) is rejected with its reason.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from common.errors import UserError
from common.modality import MODALITIES
from common.textfiles import read_user_text
from shards.format import SPLITS, UNKNOWN
from shards.layouts.common import LayoutScan, Record
from shards.manifest import Rejected

COLUMNS = ("path", "pid", "camera", "modality", "split")
#: DictReader key of the fields a CSV row has beyond its header
EXTRA = "\0extra"


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs from a CSV or JSONL file; ``where`` is ``file:line`` for messages. A
    row that does not fit the file's structure (a CSV row with more fields than the header, a
    JSONL line that is not an object) is a user error naming its line."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise UserError(f"manifest layout expects a .csv or .jsonl list file, got {path}")
    text = read_user_text(path)
    rows = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey=EXTRA)
        try:
            for row in reader:
                where = f"{path.name}:{reader.line_num}"
                if EXTRA in row:
                    raise UserError(f"{where} has {len(row[EXTRA])} more field(s) than the header's "
                                    f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote values "
                                    "that hold a comma")
                rows.append((where, row))
        except csv.Error as err:
            raise UserError(f"{path.name}:{reader.line_num} is not valid CSV ({err})") from None
        return rows
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path.name}:{i} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path.name}:{i} is a JSON {type(row).__name__}, not an object such as "
                            '{"path": "a/b.jpg", "pid": 3}')
        rows.append((f"{path.name}:{i}", row))
    return rows


def _integer(row: dict, name: str) -> int:
    """Column ``name`` as an integer (-1 when absent or empty). JSON gives ints, floats, booleans
    and lists as they are; only whole numbers are accepted (``true`` or ``1.7`` is not pid 1)."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return UNKNOWN
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} {json.dumps(value)} is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} {value} is not an integer")
        return int(value)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not an integer") from None


def _text(row: dict, name: str, default: str) -> str:
    value = row.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ValueError(f"{name} {json.dumps(value)} is not a string")
    return value.strip()


def _record(row: dict) -> Record:
    """A record from one row; raises ValueError with the reason for a bad value."""
    source = _text(row, "path", "")
    if not source:
        raise ValueError("empty path")
    modality = _text(row, "modality", "rgb").lower()
    split = _text(row, "split", "train").lower()
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    return Record(Path(source).as_posix(), _integer(row, "pid"), _integer(row, "camera"), modality, split)


def scan_manifest_file(path: Path) -> LayoutScan:
    if not path.is_file():
        raise UserError(f"manifest layout expects --root to be a .csv or .jsonl list file, but {path} is not a file")
    rows = _read_rows(path)
    columns = {key for _, row in rows for key in row}
    unknown = sorted(columns - set(COLUMNS))
    if unknown:
        raise UserError(f"{path} has unknown column(s) {', '.join(unknown)}; expected {', '.join(COLUMNS)}")
    if rows and "path" not in columns:
        raise UserError(f"{path} has no 'path' column")
    scan = LayoutScan(base=path.parent)
    for where, row in rows:
        try:
            record = _record(row)
        except ValueError as err:
            scan.rejected.append(Rejected(where, str(err)))
            continue
        if not (scan.base / record.source).is_file():
            scan.rejected.append(Rejected(record.source, f"listed at {where} but missing"))
            continue
        scan.records.append(record)
    if not scan.records:
        first = f"; the first rejected, {scan.rejected[0].source}: {scan.rejected[0].reason}" if scan.rejected else ""
        raise UserError(f"{path} lists no usable image{first}")
    return scan
