"""A strict walk over a JPEG's marker structure, for the JPEGs the builder stores as they are.

Pillow is lenient: it decodes some JPEGs whose headers are damaged (a zeroed marker inside the
tables, garbage between segments), which DALI's JPEG parser refuses ("Invalid marker") and,
on some streams, crashes on (exit 139, the whole training process). The builder stores a
copied JPEG only if this walk finds a well-formed stream, so no stored JPEG can reach DALI's
decoder with a structure it cannot parse. The walk reads markers and segment lengths only
(the entropy-coded data is skipped with ``bytes.find``): microseconds per image.

Structure: SOI; segments ``FF xx LEN(2) ...`` (fill bytes ``FF`` allowed before a marker); a
frame header (SOFn) before the first scan; each SOS followed by entropy-coded data in which an
``FF`` is followed only by ``00`` (a stuffed byte) or ``D0..D7`` (restart markers) until the
next marker; EOI after at least one scan. Bytes after EOI are ignored (cameras append some).
"""

from __future__ import annotations

SOI, EOI, SOS, DHT, DAC, JPG = 0xD8, 0xD9, 0xDA, 0xC4, 0xCC, 0xC8
RESTARTS = range(0xD0, 0xD8)
#: Markers a baseline/progressive/lossless JPEG may hold between segments.
SEGMENT_MARKERS = frozenset(
    [*range(0xC0, 0xD0), 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, *range(0xE0, 0xF0), 0xFE]
)
FRAME_MARKERS = frozenset(m for m in range(0xC0, 0xD0) if m not in (DHT, JPG, DAC))


def _end_of_scan(data: bytes, pos: int) -> int:
    """Position of the first marker after entropy-coded data starting at ``pos`` (or len)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        nxt = data[pos + 1]
        if nxt == 0x00 or nxt in RESTARTS or nxt == 0xFF:
            pos += 1 if nxt == 0xFF else 2
            continue
        return pos


def jpeg_structure_problem(data: bytes) -> str | None:
    """Why ``data`` is not a well-formed JPEG stream (module docstring), or None."""
    if data[:2] != b"\xff\xd8":
        return "does not start with a JPEG SOI marker"
    pos, frame, scans = 2, False, 0
    while True:
        if pos >= len(data):
            return "truncated: the stream ends before its EOI marker"
        if data[pos] != 0xFF:
            return f"invalid marker: byte 0x{data[pos]:02x} at offset {pos} where a marker should start"
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= len(data):
            return "truncated: the stream ends before its EOI marker"
        marker = data[pos]
        pos += 1
        if marker == EOI:
            return None if scans else "no image data (EOI before any scan)"
        if marker in RESTARTS:
            continue
        if marker != SOS and marker not in SEGMENT_MARKERS:
            return f"invalid marker 0xff{marker:02x} at offset {pos - 2}"
        if pos + 2 > len(data):
            return "truncated inside a segment header"
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > len(data):
            return f"segment 0xff{marker:02x} at offset {pos - 2} has an impossible length {length}"
        if marker in FRAME_MARKERS:
            frame = True
        pos += length
        if marker == SOS:
            if not frame:
                return "a scan starts before the frame header (SOF)"
            scans += 1
            pos = _end_of_scan(data, pos)


__all__ = ["jpeg_structure_problem"]
