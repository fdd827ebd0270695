"""A list file for any other dataset: CSV (with a header row) or JSONL, one image per row.

Columns: ``path`` (required; relative to the list file's folder, or absolute), ``pid`` and
``camera`` (integers, default -1), ``modality`` (``rgb``/``ir``, default ``rgb``), ``split``
(``train``/``query``/``gallery``/``all``, default ``train``). An unknown column is an error (it
is usually a typo that would otherwise silently fall back to a default); a row with a bad
value is rejected with its reason.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from common.errors import UserError
from common.modality import MODALITIES
from shards.format import SPLITS, UNKNOWN
from shards.layouts.common import LayoutScan, Record
from shards.manifest import Rejected

COLUMNS = ("path", "pid", "camera", "modality", "split")


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs from a CSV or JSONL file; ``where`` is ``file:line`` for messages."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return [(f"{path.name}:{i}", row) for i, row in enumerate(reader, start=2)]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path.name}:{i}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path.name}:{i} is not valid JSON ({err.msg})") from None
        return rows
    raise UserError(f"manifest layout expects a .csv or .jsonl list file, got {path}")


def _record(row: dict) -> Record:
    """A record from one row; raises ValueError with the reason for a bad value."""
    source = str(row.get("path") or "").strip()
    if not source:
        raise ValueError("empty path")
    modality = str(row.get("modality") or "rgb").strip().lower()
    split = str(row.get("split") or "train").strip().lower()
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")

    def integer(name: str) -> int:
        value = row.get(name)
        if value is None or str(value).strip() == "":
            return UNKNOWN
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not an integer") from None

    return Record(Path(source).as_posix(), integer("pid"), integer("camera"), modality, split)


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
        raise UserError(f"{path} lists no usable image")
    return scan
