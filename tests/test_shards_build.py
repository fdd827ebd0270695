"""The shard builder end to end: every layout built and read back three ways (tarfile,
webdataset, DALI's CPU webdataset reader), determinism, resume after a kill, verify."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_datasets
from shards.build import build
from common.errors import UserError
from common.modality import MODALITY_CODE
from shards.manifest import load_manifest
from shards.verify import verify

LAYOUT_WRITERS = {
    "market1501": lambda root: tiny_datasets.market(root),
    "dukemtmc": lambda root: tiny_datasets.market(root, cameras=8),
    "msmt17": tiny_datasets.msmt17,
    "sysu-mm01": tiny_datasets.sysu,
    "regdb": tiny_datasets.regdb,
    "folder": tiny_datasets.folder,
    "manifest": tiny_datasets.manifest_csv,
}


def read_with_tarfile(out: Path) -> dict[str, dict]:
    """{source: {"image", "meta", "label", "key", "tar", "order" (position in its tar)}} from every tar."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        members: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for info in tar.getmembers():
                key, ext = info.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for order, (key, m) in enumerate(members.items()):
            meta = json.loads(m["json"])
            assert meta["source"] not in samples, f"{meta['source']} stored twice"
            samples[meta["source"]] = {
                "image": m["jpg"], "meta": meta, "key": key, "tar": tar_path.name, "order": order,
                "label": np.frombuffer(m["lbl"], dtype="<i4").tolist(),
            }
    return samples


def built(tmp_path: Path, layout: str, **options):
    dataset = LAYOUT_WRITERS[layout](tmp_path / "data")
    root = dataset.root / "list.csv" if layout == "manifest" else dataset.root
    manifest = build(layout, root, tmp_path / "out", shard_size=3, workers=1, **options)
    return dataset, manifest


@pytest.mark.parametrize("layout", sorted(LAYOUT_WRITERS))
def test_every_good_image_once_with_its_labels(tmp_path, layout):
    dataset, manifest = built(tmp_path, layout)
    samples = read_with_tarfile(tmp_path / "out")
    assert set(samples) == set(dataset.expected)
    for source, (pid, camera, modality, split) in dataset.expected.items():
        sample = samples[source]
        meta = sample["meta"]
        assert (meta["pid"], meta["camera"], meta["modality"], meta["split"]) == (pid, camera, modality, split)
        assert sample["label"] == [pid, camera, MODALITY_CODE[modality], meta["index"]]
        assert sample["tar"].startswith(split + "-") and "." not in sample["key"]
        original = (dataset.root / source).read_bytes()
        if source in dataset.converted:
            with Image.open(io.BytesIO(sample["image"])) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
        else:
            assert sample["image"] == original, f"{source}: JPEG bytes must be copied unchanged"
    assert {r.source for r in manifest.rejected} == dataset.rejected
    assert manifest.converted == len(dataset.converted)


@pytest.mark.parametrize("layout", ["market1501", "sysu-mm01"])
def test_indices_labels_and_counts(tmp_path, layout):
    dataset, manifest = built(tmp_path, layout)
    samples = read_with_tarfile(tmp_path / "out")
    for split in manifest.splits:
        in_split = sorted((s for s in samples.values() if s["meta"]["split"] == split), key=lambda s: s["meta"]["source"])
        # indices are contiguous and follow the order of source paths
        assert [s["meta"]["index"] for s in in_split] == list(range(len(in_split)))
        counts = manifest.splits[split]
        assert counts.total.images == len(in_split)
        assert counts.total.identities == len({s["meta"]["pid"] for s in in_split})
        for modality, sub in counts.modalities.items():
            assert sub.images == sum(s["meta"]["modality"] == modality for s in in_split)
    train_pids = sorted({pid for pid, _, _, split in dataset.expected.values() if split == "train"})
    assert manifest.pid_to_label == {pid: i for i, pid in enumerate(train_pids)}
    for sample in samples.values():
        meta = sample["meta"]
        assert meta["label"] == (manifest.pid_to_label[meta["pid"]] if meta["split"] == "train" else -1)
    assert sum(s.samples for s in manifest.shards) == len(samples)


def test_market_junk_dropped_distractors_kept(tmp_path):
    _, manifest = built(tmp_path, "market1501")
    assert manifest.dropped == {"junk (pid -1)": 1}
    assert 0 in {s["meta"]["pid"] for s in read_with_tarfile(tmp_path / "out").values() if s["meta"]["split"] == "gallery"}


def test_regdb_trials_recorded(tmp_path):
    _, manifest = built(tmp_path, "regdb")
    assert [(t.trial, t.train_ids, t.test_ids) for t in manifest.trials] == [(1, [1, 2], [3, 4]), (2, [3, 4], [1, 2])]
    assert list(manifest.splits) == ["all"]


@pytest.mark.parametrize("layout", sorted(LAYOUT_WRITERS))
def test_readable_by_webdataset(tmp_path, layout):
    import webdataset as wds

    dataset, manifest = built(tmp_path, layout)
    urls = [str(tmp_path / "out" / s.file) for s in manifest.shards]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        seen[meta["source"]] = (sample["jpg"], np.frombuffer(sample["lbl"], dtype="<i4").tolist(), meta)
    assert set(seen) == set(dataset.expected)
    for source, (image, label, meta) in seen.items():
        if source not in dataset.converted:
            assert image == (dataset.root / source).read_bytes()
        assert label == [meta["pid"], meta["camera"], MODALITY_CODE[meta["modality"]], meta["index"]]


@pytest.mark.parametrize("layout", sorted(LAYOUT_WRITERS))
def test_readable_by_dali_cpu_reader_with_index(tmp_path, layout):
    """DALI reads each shard, through its index, in the order tarfile does, with the same labels
    and (within libjpeg-turbo rounding) the same pixels as PIL."""
    from nvidia.dali import fn, pipeline_def, types

    _, manifest = built(tmp_path, layout)
    out = tmp_path / "out"
    samples = read_with_tarfile(out)
    for shard in manifest.shards:

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipeline():
            image, label = fn.readers.webdataset(
                paths=[str(out / shard.file)], index_paths=[str(out / shard.index)],
                ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32], name="reader")
            return fn.decoders.image(image, device="cpu"), label

        pipe = pipeline()
        pipe.build()
        assert pipe.epoch_size("reader") == shard.samples
        in_tar_order = sorted((s for s in samples.values() if s["tar"] == shard.file), key=lambda s: s["order"])
        for expected in in_tar_order:
            image, label = pipe.run()
            assert np.array(label[0]).tolist() == expected["label"]
            with Image.open(io.BytesIO(expected["image"])) as pil:
                reference = np.asarray(pil.convert("RGB"), dtype=np.int16)
            decoded = np.array(image[0], dtype=np.int16)
            assert decoded.shape == reference.shape
            assert np.abs(decoded - reference).mean() < 1.0


def test_index_files_match_dalis_own_tool(tmp_path):
    _, manifest = built(tmp_path, "sysu-mm01")
    tool = Path(sys.executable).with_name("wds2idx")
    for shard in manifest.shards:
        reference = tmp_path / f"{shard.file}.ref.idx"
        subprocess.run([str(tool), str(tmp_path / "out" / shard.file), str(reference)], check=True, capture_output=True)
        assert (tmp_path / "out" / shard.index).read_text() == reference.read_text()


def test_same_inputs_and_seed_give_identical_shards(tmp_path):
    dataset = tiny_datasets.sysu(tmp_path / "data")
    first = build("sysu-mm01", dataset.root, tmp_path / "a", seed=7, shard_size=4, workers=1)
    second = build("sysu-mm01", dataset.root, tmp_path / "b", seed=7, shard_size=4, workers=2)
    other = build("sysu-mm01", dataset.root, tmp_path / "c", seed=8, shard_size=4, workers=1)
    for shard in first.shards:
        assert (tmp_path / "a" / shard.file).read_bytes() == (tmp_path / "b" / shard.file).read_bytes()
        assert (tmp_path / "a" / shard.index).read_bytes() == (tmp_path / "b" / shard.index).read_bytes()
    assert [s.sha256 for s in first.shards if s.split == "train"] != [s.sha256 for s in other.shards if s.split == "train"]
    assert [s.sha256 for s in first.shards if s.split != "train"] == [s.sha256 for s in other.shards if s.split != "train"]


def test_rerun_is_up_to_date_and_other_inputs_are_refused(tmp_path):
    dataset = tiny_datasets.sysu(tmp_path / "data")
    first = build("sysu-mm01", dataset.root, tmp_path / "out", workers=1)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = build("sysu-mm01", dataset.root, tmp_path / "out", workers=1)
    assert again.fingerprint == first.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == mtimes
    (tmp_path / "out" / first.shards[0].file).unlink()  # a damaged folder is rebuilt, not trusted
    repaired = build("sysu-mm01", dataset.root, tmp_path / "out", workers=1)
    assert repaired.shards == first.shards and verify(tmp_path / "out") == []
    with pytest.raises(UserError, match="--overwrite"):
        build("sysu-mm01", dataset.root, tmp_path / "out", seed=1, workers=1)
    build("sysu-mm01", dataset.root, tmp_path / "out", seed=1, workers=1, overwrite=True)
    assert load_manifest(tmp_path / "out").seed == 1


def test_refuses_a_non_empty_folder_that_is_not_a_shard_folder(tmp_path):
    dataset = tiny_datasets.sysu(tmp_path / "data")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        build("sysu-mm01", dataset.root, tmp_path / "mine", workers=1)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_strict_fails_on_rejects(tmp_path):
    dataset = tiny_datasets.market(tmp_path / "data")
    with pytest.raises(UserError, match="--strict: 2 input"):
        build("market1501", dataset.root, tmp_path / "out", strict=True, workers=1)


KILLED_BUILD = """
import sys, time
import shards.build as b
original = b.write_shard
def slow_write(*args, **kwargs):
    time.sleep(0.15)  # slow enough that the test can kill the build between shards
    return original(*args, **kwargs)
b.write_shard = slow_write
b.build("sysu-mm01", sys.argv[1], sys.argv[2], seed=3, shard_size=2, workers=1)
"""


def test_build_killed_midway_resumes_to_the_same_shards(tmp_path):
    dataset = tiny_datasets.sysu(tmp_path / "data")
    reference = build("sysu-mm01", dataset.root, tmp_path / "reference", seed=3, shard_size=2, workers=1)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(dataset.root), str(out)])
    done = out / ".build" / "done"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (done.is_dir() and len(list(done.glob("*.json"))) >= 3):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "killed before the end: no manifest yet"
    finished = len(list(done.glob("*.json")))
    assert 3 <= finished < len(reference.shards)
    resumed = build("sysu-mm01", dataset.root, out, seed=3, shard_size=2, workers=1)
    assert resumed.shards == reference.shards
    for shard in reference.shards:
        assert (out / shard.file).read_bytes() == (tmp_path / "reference" / shard.file).read_bytes()
    assert not (out / ".build").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s.file for s in reference.shards] + [s.index for s in reference.shards] + ["manifest.json"])
    assert verify(out) == []


def test_verify_names_flipped_and_truncated_shards(tmp_path):
    _, manifest = built(tmp_path, "sysu-mm01")
    out = tmp_path / "out"
    assert verify(out) == []
    flipped, truncated = manifest.shards[0], manifest.shards[1]
    data = bytearray((out / flipped.file).read_bytes())
    data[700] ^= 0x01  # inside the first image's data
    (out / flipped.file).write_bytes(bytes(data))
    with open(out / truncated.file, "r+b") as f:
        f.truncate(truncated.bytes // 2)
    problems = {p.file: p.reason for p in verify(out)}
    assert set(problems) == {flipped.file, truncated.file}
    assert "sha256" in problems[flipped.file]
    assert "truncated" in problems[truncated.file]


def test_writer_output_equals_tarfiles(tmp_path):
    """The hand-written USTAR headers against Python's tarfile writing the same members."""
    from shards.writer import EncodedSample, write_shard

    samples = [EncodedSample(f"train_{i:08d}", bytes(j % 251 for j in range(700 * i % 1500)), b'{"a":1}', bytes(16))
               for i in range(5)]
    written = write_shard(tmp_path, "x", samples)
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.members():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "x.tar").read_bytes() == reference.getvalue()
    assert written.bytes == len(reference.getvalue()) and written.samples == 5
