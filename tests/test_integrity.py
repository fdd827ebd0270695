"""The content check in front of every reader (pipelines.integrity): a changed byte is found
before any reader sees it, and a verified stamp spares the hash while the files are unchanged."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import integrity
from pipelines.integrity import STAMP_DIR, check_shards
from pipelines.sources import open_split
from pipelines.sources.base import ShardRef
from shards.build import build
from common.errors import UserError
from shards.format import parse_index
from shards.jpeg import jpeg_structure_problem
from shards.manifest import load_manifest
from shards.verify import verify
from tests.tiny_datasets import jpeg_bytes, sysu


@pytest.fixture
def shards(tmp_path) -> Path:
    data = sysu(tmp_path / "sysu")
    build("sysu-mm01", data.root, tmp_path / "shards", workers=1, shard_size=8)
    return tmp_path / "shards"


def refs(folder: Path) -> list[ShardRef]:
    return [ShardRef(s.file, folder / s.file, folder / s.index, s.samples, s.bytes, s.sha256)
            for s in load_manifest(folder).shards]


@pytest.fixture
def no_racy_window(monkeypatch):
    """Files written by the test are fresh; let them be stamped anyway."""
    monkeypatch.setattr(integrity, "RACY_SECONDS", 0.0)


def counting_hash(monkeypatch) -> list[Path]:
    hashed: list[Path] = []

    def sha(path: Path) -> str:
        hashed.append(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    monkeypatch.setattr(integrity, "sha256_of", sha)
    return hashed


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, keeping the size and (set back) the modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_intact_shards_are_stamped_then_trusted_without_hashing(shards, no_racy_window, monkeypatch):
    hashed = counting_hash(monkeypatch)
    assert check_shards(shards, refs(shards)) == []
    assert len(hashed) == len(refs(shards))
    assert sorted(p.name for p in (shards / STAMP_DIR).iterdir()) == sorted(f"{r.name}.json" for r in refs(shards))
    hashed.clear()
    assert check_shards(shards, refs(shards)) == []
    assert hashed == []


def test_changed_byte_with_same_size_and_mtime_is_found_despite_a_stamp(shards, no_racy_window):
    assert check_shards(shards, refs(shards)) == []  # stamped
    label = next(m for m in parse_index((shards / "train-000000.idx").read_text())[0] if m.ext == "lbl")
    flip_byte(shards / "train-000000.tar", label.offset)  # pid 8 -> 9: a silent label change
    damage = check_shards(shards, refs(shards))
    assert [d.name for d in damage] == ["train-000000.tar"] and "sha256" in damage[0].reason
    with pytest.raises(UserError, match=r"train-000000\.tar is damaged.*--skip_damaged"):
        open_split(shards, "train")
    checked = open_split(shards, "train", tolerate_damaged=True)
    assert [s.name for s in checked.damaged] == ["train-000000.tar"]
    assert "train-000000.tar" not in [s.name for s in checked.shards]


def test_fresh_files_are_not_stamped(shards, monkeypatch):
    hashed = counting_hash(monkeypatch)
    check_shards(shards, refs(shards))
    check_shards(shards, refs(shards))
    assert len(hashed) == 2 * len(refs(shards))  # written within RACY_SECONDS: hashed each time


def test_index_that_no_longer_matches_the_tar_is_damage(shards):
    idx = shards / "query-000000.idx"
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(int(fields[1]) + 512)  # the first member's offset now points at the next header
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    damage = check_shards(shards, refs(shards))
    assert [d.name for d in damage] == ["query-000000.tar"] and "index" in damage[0].reason


def test_read_only_stamp_place_falls_back_to_the_user_cache(shards, no_racy_window, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (shards / STAMP_DIR).write_text("not a folder")  # the shard folder cannot hold stamps
    hashed = counting_hash(monkeypatch)
    check_shards(shards, refs(shards))
    assert len(list((tmp_path / "cache").rglob("*.tar.json"))) == len(refs(shards))
    hashed.clear()
    check_shards(shards, refs(shards))
    assert hashed == []


# -- the JPEG structure walk: what DALI's parser would refuse ------------------------------------

def test_jpeg_walk_accepts_what_pillow_writes():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
    for options in ({}, {"progressive": True}, {"optimize": True}, {"restart_marker_blocks": 1}):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", **options)
        assert jpeg_structure_problem(out.getvalue()) is None, options


def header_end(data: bytes) -> int:
    return data.index(b"\xff\xda")  # start of the first scan


@pytest.mark.parametrize("where", ["soi", "sof", "sos"])
def test_jpeg_walk_names_damaged_headers(where):
    data = bytearray(jpeg_bytes(3))
    offset = {"soi": 0, "sof": data.index(b"\xff\xc0"), "sos": header_end(data)}[where]
    data[offset : offset + 16] = bytes(16)
    assert jpeg_structure_problem(bytes(data)) is not None


def test_jpeg_walk_names_truncation():
    assert "truncated" in jpeg_structure_problem(jpeg_bytes(3)[:-10])


# -- verify: the manifest against itself and against its samples --------------------------------

def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_verify_names_a_swapped_pid_to_label(shards):
    def swap(data):
        first, second = list(data["pid_to_label"])[:2]
        data["pid_to_label"][first], data["pid_to_label"][second] = data["pid_to_label"][second], data["pid_to_label"][first]
    edit_manifest(shards, swap)
    problems = verify(shards)
    assert [p.file for p in problems] == ["manifest.json"] and "pid_to_label" in problems[0].reason


def test_a_label_outside_0_to_p_is_refused_before_training(shards):
    edit_manifest(shards, lambda data: data["pid_to_label"].update({next(iter(data["pid_to_label"])): 99}))
    assert any("labels 0.." in p.reason for p in verify(shards))
    with pytest.raises(UserError, match="manifest .* is inconsistent: pid_to_label"):
        open_split(shards, "train")


def test_verify_names_edited_counts(shards):
    edit_manifest(shards, lambda data: data["splits"]["query"]["total"].update(images=999))
    problems = verify(shards)
    assert [p.file for p in problems] == ["manifest.json"] and "'query'" in problems[0].reason


def test_verify_of_intact_shards_is_clean(shards):
    assert verify(shards) == []


def test_measure_times_a_full_and_a_stamped_check(shards, no_racy_window):
    m = integrity.measure(shards, "train")
    listed = load_manifest(shards).shards_of("train")
    assert m["shards"] == len(listed) and m["samples"] == sum(s.samples for s in listed)
    assert m["full_s"] > 0 and m["stamped_s"] > 0
    assert len(list((shards / STAMP_DIR).glob("train-*.json"))) == len(listed)  # the second open was stamped
