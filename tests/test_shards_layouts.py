"""Layouts: what each one reads from names and lists, and its errors for a wrong root."""

from __future__ import annotations

import pytest

import tiny_datasets
from common.errors import UserError
from shards.layouts import scan


def as_table(layout_scan):
    return {r.source: (r.pid, r.camera, r.modality, r.split) for r in layout_scan.records}


@pytest.mark.parametrize(
    "layout, writer",
    [("market1501", tiny_datasets.market), ("msmt17", tiny_datasets.msmt17), ("sysu-mm01", tiny_datasets.sysu),
     ("regdb", tiny_datasets.regdb), ("folder", tiny_datasets.folder)],
)
def test_records_match_the_names(tmp_path, layout, writer):
    dataset = writer(tmp_path)
    table = as_table(scan(layout, tmp_path))
    # the layout names the good images and the corrupt ones (found later, when decoded)
    corrupt = {s for s in dataset.rejected if (tmp_path / s).exists() and s.endswith(".jpg") and "badname" not in s}
    assert set(table) == set(dataset.expected) | corrupt
    for source, expected in dataset.expected.items():
        assert table[source] == expected


def test_market_rules(tmp_path):
    tiny_datasets.market(tmp_path)
    result = scan("market1501", tmp_path)
    assert result.dropped == {"junk (pid -1)": 1}
    assert [r.source for r in result.rejected] == ["query/badname.jpg"]
    assert not any("Thumbs" in r.source for r in result.records + result.rejected)


def test_duke_accepts_cameras_up_to_8_and_market_does_not(tmp_path):
    tiny_datasets.market(tmp_path, cameras=8)
    duke = scan("dukemtmc", tmp_path)
    assert 8 in {r.camera for r in duke.records}
    market = scan("market1501", tmp_path)
    assert any("camera 8" in r.reason for r in market.rejected)


def test_msmt17_train_is_train_plus_val_and_camera_from_name(tmp_path):
    tiny_datasets.msmt17(tmp_path)
    result = scan("msmt17", tmp_path)
    train = [r for r in result.records if r.split == "train"]
    assert {r.pid for r in train} == {0, 1, 2}
    assert {r.camera for r in result.records} == {3, 12}
    assert [r.reason for r in result.rejected] == ["listed in list_gallery.txt but missing"]


def test_sysu_drops_ids_in_no_list(tmp_path):
    tiny_datasets.sysu(tmp_path)
    result = scan("sysu-mm01", tmp_path)
    assert result.dropped == {"identity in no exp/*_id.txt list": 6 * 2}  # id 6: 6 cameras x 2 images
    query = [r for r in result.records if r.split == "query"]
    assert query and all(r.modality == "ir" and r.camera in (3, 6) for r in query)


def test_manifest_file_rows(tmp_path):
    dataset = tiny_datasets.manifest_csv(tmp_path)
    result = scan("manifest", tmp_path / "list.csv")
    assert as_table(result) == dataset.expected
    assert {r.source: r.reason for r in result.rejected} == {
        "list.csv:6": "modality 'thermal' is not one of rgb, ir",
        "images/missing.jpg": "listed at list.csv:7 but missing",
    }


def test_manifest_jsonl_and_unknown_columns(tmp_path):
    tiny_datasets.write_image(tmp_path / "x.jpg", 1)
    (tmp_path / "list.jsonl").write_text('{"path": "x.jpg", "pid": 4, "camera": 2, "modality": "ir", "split": "query"}\n')
    assert as_table(scan("manifest", tmp_path / "list.jsonl")) == {"x.jpg": (4, 2, "ir", "query")}
    (tmp_path / "typo.csv").write_text("path,person_id\nx.jpg,4\n")
    with pytest.raises(UserError, match="unknown column.*person_id"):
        scan("manifest", tmp_path / "typo.csv")


@pytest.mark.parametrize(
    "layout, writer, remove, message",
    [
        ("market1501", tiny_datasets.market, "query", "expects a folder query/"),
        ("msmt17", tiny_datasets.msmt17, "list_val.txt", "expects the file list_val.txt"),
        ("sysu-mm01", tiny_datasets.sysu, "exp/test_id.txt", "expects the file exp/test_id.txt"),
        ("sysu-mm01", tiny_datasets.sysu, "cam4", "expects a folder cam4/"),
        ("regdb", tiny_datasets.regdb, "idx/test_thermal_2.txt", "trial 2 needs"),
    ],
)
def test_missing_parts_are_named(tmp_path, layout, writer, remove, message):
    import shutil

    writer(tmp_path)
    target = tmp_path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=message):
        scan(layout, tmp_path)


def test_unknown_layout_and_missing_root(tmp_path):
    with pytest.raises(UserError, match="unknown layout 'market'.*market1501"):
        scan("market", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        scan("market1501", tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        scan("folder", tmp_path / "file.jpg")


def test_images_outside_pid_folders_are_rejected(tmp_path):
    tiny_datasets.sysu(tmp_path)
    tiny_datasets.write_image(tmp_path / "cam1" / "stray.jpg", 99)
    tiny_datasets.write_image(tmp_path / "cam3" / "misc" / "0001.jpg", 98)
    result = scan("sysu-mm01", tmp_path)
    assert {r.source: r.reason for r in result.rejected} == {
        "cam1/stray.jpg": "not in a cam*/<pid>/ folder",
        "cam3/misc/0001.jpg": "not in a cam*/<pid>/ folder",
    }
