"""Sources (DALI on the CPU, the webdataset fallback, the device cache) on a tiny SYSU-MM01-like
dataset built once with the real shard builder.

JPEG tolerance: DALI's CPU decoder (libjpeg-turbo) and PIL (libjpeg-turbo) decode the same bytes
to identical pixels here (max abs diff 0 observed at the stored size); the test allows max <= 2,
mean < 0.5. Resized (DALI decode + torch antialiased bilinear on the CPU vs PIL bilinear), observed
max 0 here and max 1, mean 0.014 on the synthetic SYSU set at 288x144; allowed max <= 8, mean < 1
(the GPU path resizes with DALI's own ``fn.resize``, which differs more).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.sources import CacheSource, DaliSource, WdsSource, make_source, open_split
from shards.build import build
from common.errors import UserError
from shards.format import IndexEntry, format_index, parse_index
from shards.manifest import load_manifest

H, W = 32, 16
IDS = 32


def make_sysu_tree(root: Path, ids: int = IDS, per_cam: int = 2, seed: int = 0) -> Path:
    """``cam{1..6}/{pid:04d}/{n:04d}.jpg``; ids 1..24 train (train + val lists), 25..32 test."""
    rng = np.random.default_rng(seed)
    for cam in range(1, 7):
        for pid in range(1, ids + 1):
            folder = root / f"cam{cam}" / f"{pid:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_cam):
                base = rng.integers(0, 256, 3)
                arr = np.clip(base + rng.integers(-40, 40, (H, W, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{n + 1:04d}.jpg", quality=90)
    (root / "exp").mkdir(exist_ok=True)
    n_train = ids * 3 // 4
    (root / "exp/train_id.txt").write_text(",".join(str(i) for i in range(1, n_train)))
    (root / "exp/val_id.txt").write_text(str(n_train))
    (root / "exp/test_id.txt").write_text(",".join(str(i) for i in range(n_train + 1, ids + 1)))
    return root


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Train split: 24 ids x 6 cameras x 2 = 288 images (192 RGB, 96 IR) in 8 shards of <= 40."""
    base = tmp_path_factory.mktemp("sysu")
    build("sysu-mm01", make_sysu_tree(base / "raw"), base / "shards", shard_size=40, workers=1)
    return base / "shards"


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def collect(source, epochs=1):
    return [b for _ in range(epochs) for b in source]


def everything(source):
    """All batches of one epoch, sorted by sample index: images, labels (N, 4)."""
    batches = collect(source)
    images = torch.cat([b.images for b in batches])
    labels = torch.stack([torch.cat([getattr(b, f) for b in batches]) for f in ("pid", "camera", "modality", "index")], 1)
    order = torch.argsort(labels[:, 3])
    return images[order], labels[order]


def total_of(folder: Path, split="train") -> int:
    return sum(s.samples for s in load_manifest(folder).shards_of(split))


# -- the Batch contract and agreement between backends -------------------------------------------

@pytest.mark.parametrize("size, max_diff, mean_diff", [((H, W), 2, 0.5), ((24, 12), 8, 1.0)])
def test_dali_wds_and_cache_agree_on_labels_and_pixels(shards, size, max_diff, mean_diff):
    common = dict(batch_size=50, size=size, device="cpu", shuffle=False, drop_last=False, rank=0, world=1)
    dali = make_source(shards, "train", source="dali", **common)
    wds = make_source(shards, "train", source="wds", num_workers=0, **common)
    cache = make_source(shards, "train", source="cache", **common)
    assert isinstance(dali, DaliSource) and isinstance(wds, WdsSource) and isinstance(cache, CacheSource)
    b = next(iter(dali))
    assert b.images.dtype == torch.uint8 and b.images.shape == (50, 3, *size)
    assert all(t.dtype == torch.int64 and t.shape == (50,) for t in (b.pid, b.camera, b.modality, b.index))
    assert dali.batches == 1
    dali.set_epoch(0)  # back to the start of the epoch (the loop above kept its position)
    (di, dl), (wi, wl) = everything(dali), everything(wds)
    c = cache.cached
    order = torch.argsort(c.index)
    ci, cl = c.images[order], torch.stack([c.pid, c.camera, c.modality, c.index], 1)[order]
    n = total_of(shards)
    assert dl.shape == (n, 4) and torch.equal(dl[:, 3], torch.arange(n))
    assert torch.equal(dl, wl) and torch.equal(dl, cl)
    assert set(dl[:, 2].tolist()) == {0, 1}
    diff = (di.int() - wi.int()).abs()
    assert diff.max() <= max_diff and diff.float().mean() < mean_diff
    assert torch.equal(di, ci)  # the cache was filled by DALI


def test_labels_match_the_manifest(shards):
    m = load_manifest(shards)
    src = make_source(shards, "train", source="dali", batch_size=32, size=(H, W), device="cpu", world=1, rank=0)
    _, labels = everything(src)
    assert set(labels[:, 0].tolist()) <= set(m.pid_to_label)
    assert labels[:, 1].min() >= 1 and labels[:, 1].max() <= 6
    ir = labels[:, 2] == 1
    assert set(labels[ir, 1].tolist()) <= {3, 6} and set(labels[~ir, 1].tolist()) <= {1, 2, 4, 5}


# -- ranks, epochs, resume ------------------------------------------------------------------------

def streaming(kind, shards, **kw):
    args = dict(batch_size=16, size=(H, W), device="cpu", seed=7, shuffle_buffer=64)
    args.update(kw)
    if kind == "wds":
        args.setdefault("num_workers", 2)
    return make_source(shards, "train", source=kind, **args)


@pytest.mark.parametrize("kind", ["dali", "wds"])
def test_two_ranks_disjoint_equal_and_covering(shards, kind):
    n, world, b = total_of(shards), 2, 16
    seen = []
    for rank in range(world):
        src = streaming(kind, shards, rank=rank, world=world, batch_size=b)
        batches = collect(src)
        assert len(src) == len(batches) == n // (world * b)
        assert all(len(x) == b for x in batches)
        seen.append(torch.cat([x.index for x in batches]).tolist())
    a, c = set(seen[0]), set(seen[1])
    assert len(a) == len(seen[0]) and len(c) == len(seen[1])  # no repeat inside a rank
    assert not a & c  # disjoint
    assert len(a | c) == world * b * (n // (world * b))  # everything but the documented drop
    # without drop_last the ranks cover the split exactly
    full = set()
    for rank in range(world):
        src = streaming(kind, shards, rank=rank, world=world, batch_size=b, drop_last=False)
        full |= {i for x in collect(src) for i in x.index.tolist()}
    assert full == set(range(n))


@pytest.mark.parametrize("kind", ["dali", "wds"])
def test_epochs_reshuffle_and_seed_repeats(shards, kind):
    src = streaming(kind, shards, rank=0, world=1)
    e0 = torch.cat([x.index for x in collect(src)])
    e1 = torch.cat([x.index for x in collect(src)])
    assert src.epoch == 2 and not torch.equal(e0, e1)
    again = streaming(kind, shards, rank=0, world=1)
    assert torch.equal(e0, torch.cat([x.index for x in collect(again)]))


@pytest.mark.parametrize("kind", ["dali", "wds", "cache"])
def test_resumed_source_continues_the_same_stream(shards, kind):
    kw = dict(rank=1, world=2)
    if kind == "cache":
        kw["sampler"] = "identity"
    reference = streaming(kind, shards, **kw)
    expected = [x.index.clone() for x in collect(reference, epochs=2)]
    first = streaming(kind, shards, **kw)
    got = []
    for i, x in enumerate(first):
        got.append(x.index.clone())
        if i == 2:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 3
    resumed = streaming(kind, shards, **kw)
    resumed.load_state_dict(state)
    got += [x.index.clone() for x in collect(resumed, epochs=2)][: len(expected) - len(got)]
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_stopping_at_the_last_batch_moves_to_the_next_epoch(shards):
    src = streaming("dali", shards, rank=0, world=1)
    for i, _ in enumerate(src):
        if i == len(src) - 1:
            break
    assert src.state_dict()["batches"] == len(src)
    assert len(collect(src)) == len(src) and src.epoch == 2


def test_cache_samplers_and_auto_choice(shards):
    n = total_of(shards)
    auto = make_source(shards, "train", batch_size=16, size=(H, W), device="cpu", rank=0, world=1)
    assert isinstance(auto, CacheSource) and len(auto.cached) == n
    streaming_auto = make_source(shards, "train", batch_size=16, size=(H, W), device="cpu", rank=0, world=1,
                                 budget_bytes=0)
    assert isinstance(streaming_auto, DaliSource)
    pairs = make_source(shards, "train", batch_size=8, size=(H, W), device="cpu", rank=0, world=1, sampler="pairs")
    x = next(iter(pairs))
    assert len(x) == 16 and (x.modality[:8] == 0).all() and (x.modality[8:] == 1).all()
    cm = make_source(shards, "train", batch_size=16, size=(H, W), device="cpu", rank=0, world=1,
                     sampler="cross_modal", instances=2)
    x = next(iter(cm))
    assert torch.equal(x.pid[:8], x.pid[8:]) and (x.modality[:8] == 0).all() and (x.modality[8:] == 1).all()


def test_cache_refuses_a_split_over_budget(shards):
    with pytest.raises(UserError, match="budget"):
        make_source(shards, "train", batch_size=16, size=(H, W), device="cpu", source="cache", budget_bytes=1000)
    with pytest.raises(UserError, match="cache"):
        make_source(shards, "train", batch_size=16, size=(H, W), device="cpu", source="dali", sampler="identity")


def test_bad_settings_are_user_errors(shards):
    with pytest.raises(UserError, match="fewer than one batch"):
        make_source(shards, "query", batch_size=1000, size=(H, W), device="cpu", source="dali")
    with pytest.raises(UserError, match="unknown source"):
        make_source(shards, "train", batch_size=8, size=(H, W), source="tfrecord")
    with pytest.raises(UserError, match="no shards for split"):
        make_source(shards, "val", batch_size=8, size=(H, W), device="cpu")
    with pytest.raises(UserError, match="not divisible"):
        make_source(shards, "train", batch_size=10, size=(H, W), device="cpu", sampler="identity", instances=4)


# -- damaged input ---------------------------------------------------------------------------------

def truncate(folder: Path, name="train-000001.tar") -> Path:
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_shard_dali_refuses_naming_it(copy):
    truncate(copy)
    with pytest.raises(UserError, match=r"train-000001\.tar.*shards verify"):
        make_source(copy, "train", source="dali", batch_size=16, size=(H, W), device="cpu")


@pytest.mark.parametrize("source", ["auto", "wds", "cache"])
def test_truncated_shard_is_refused_by_default(copy, source):
    """Training refuses damaged shards unless told to skip them (DESIGN.md section 8)."""
    truncate(copy)
    with pytest.raises(UserError, match=r"train-000001\.tar.*shards verify"):
        make_source(copy, "train", source=source, batch_size=16, size=(H, W), device="cpu")


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_wds_warns_skips_and_counts(copy, workers):
    truncate(copy)
    lost = next(s.samples for s in load_manifest(copy).shards if s.file == "train-000001.tar")
    with pytest.warns(UserWarning, match=r"train-000001\.tar"):
        src = make_source(copy, "train", source="wds", batch_size=16, size=(H, W), device="cpu", rank=0, world=1,
                          num_workers=workers, skip_damaged=True)
    assert src.skipped == lost and src.skipped_shards == ["train-000001.tar"]
    batches = collect(src)
    assert len(batches) == len(src) == (total_of(copy) - lost) // 16
    seen = [i for b in batches for i in b.index.tolist()]
    assert len(set(seen)) == len(seen)


def corrupt_first_image(folder: Path, name="train-000002.tar") -> str:
    """Overwrite the JPEG signature of the shard's first image (same size, new sha256)."""
    path = folder / name
    first = parse_index((folder / name.replace(".tar", ".idx")).read_text())[0]
    jpg = next(m for m in first if m.ext == "jpg")
    data = bytearray(path.read_bytes())
    data[jpg.offset : jpg.offset + 16] = b"\0" * 16
    path.write_bytes(bytes(data))
    return jpg.name.split(".")[0]


@pytest.mark.parametrize("source", ["dali", "wds", "cache"])
def test_changed_byte_is_refused_before_reading(copy, source):
    """A same-size change is found by the content check before any reader sees the bytes
    (DALI could crash on them): a clear error naming the shard (DESIGN.md section 8)."""
    corrupt_first_image(copy)
    with pytest.raises(UserError, match=r"train-000002\.tar is damaged: .*sha256.*shards verify"):
        make_source(copy, "train", source=source, batch_size=16, size=(H, W), device="cpu", rank=0, world=1,
                    shuffle=False)


@pytest.mark.parametrize("source", ["dali", "wds", "cache"])
def test_changed_byte_skipped_whole_shard_with_skip_damaged(copy, source):
    corrupt_first_image(copy)
    lost = next(s.samples for s in load_manifest(copy).shards if s.file == "train-000002.tar")
    with pytest.warns(UserWarning, match=r"train-000002\.tar"):
        src = make_source(copy, "train", source=source, batch_size=16, size=(H, W), device="cpu", rank=0, world=1,
                          num_workers=0, drop_last=False, skip_damaged=True)
    assert src.skipped == lost and src.skipped_shards == ["train-000002.tar"]
    if source != "cache":
        kept = {i for b in collect(src) for i in b.index.tolist()}
        assert len(kept) == total_of(copy) - lost


def strip_label_members(folder: Path, name="train-000000.tar") -> None:
    """Rewrite a shard (and its index and manifest entry) without its .lbl members."""
    path = folder / name
    kept = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".lbl"):
                kept.append((member, tar.extractfile(member).read()))
    index, offset = {}, 0
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in kept:
            tar.addfile(member, io.BytesIO(data))
            key, ext = member.name.split(".", 1)
            index.setdefault(key, []).append(IndexEntry(ext, offset + 512, len(data), member.name))
            offset += 512 + -(-len(data) // 512) * 512
    path.write_bytes(buf.getvalue())
    path.with_suffix(".idx").write_text(format_index(list(index.values())))
    m = load_manifest(folder)
    m.shards = [
        type(s)(**{**s.__dict__, "bytes": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
        if s.file == name else s
        for s in m.shards
    ]
    m.save(folder)


@pytest.mark.parametrize("kind", ["dali", "wds", "cache"])
def test_missing_label_member_is_a_user_error(copy, kind):
    strip_label_members(copy)
    with pytest.raises(UserError, match=r"no \.lbl member"):
        make_source(copy, "train", source=kind, batch_size=16, size=(H, W), device="cpu")


def test_manifest_not_matching_the_files(copy):
    shutil.copy(copy / "train-000000.tar", copy / "train-000099.tar")
    with pytest.raises(UserError, match=r"does not list: train-000099\.tar"):
        open_split(copy, "train")
    (copy / "train-000099.tar").unlink()
    (copy / "train-000003.tar").unlink()
    with pytest.raises(UserError, match=r"not there: train-000003\.tar.*verify"):
        make_source(copy, "train", source="wds", batch_size=16, size=(H, W), device="cpu")
    with pytest.raises(UserError, match="not a shard folder"):
        make_source(copy.parent, "train", batch_size=16, size=(H, W), device="cpu")


# -- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_mixed_decode_on_the_gpu_matches_the_cpu(shards):
    common = dict(batch_size=32, size=(H, W), shuffle=False, drop_last=False, rank=0, world=1)
    gpu = make_source(shards, "train", source="dali", device="cuda", **common)
    cpu = make_source(shards, "train", source="dali", device="cpu", **common)
    (gi, gl), (ci, cl) = everything(gpu), everything(cpu)
    assert gi.is_cuda and gl.is_cuda
    assert torch.equal(gl.cpu(), cl)
    diff = (gi.cpu().int() - ci.int()).abs()
    assert diff.float().mean() < 1.0  # nvJPEG vs libjpeg-turbo (IDCT differences)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = make_source(shards, "train", source="cache", device="cuda", batch_size=16, size=(H, W), rank=0, world=1)
    assert cache.cached.images.is_cuda and next(iter(cache)).images.is_cuda


def test_damage_warning_names_the_callers_line(copy):
    truncate(copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_source(copy, "train", source="wds", batch_size=16, size=(H, W), device="cpu", rank=0, world=1,
                    num_workers=0, skip_damaged=True)
    (warning,) = [w for w in caught if "train-000001.tar" in str(w.message)]
    assert issubclass(warning.category, UserWarning)
    assert warning.filename == __file__  # this test's line, not a line inside pipelines/sources


def test_damage_warning_prints_as_one_clean_line(copy):
    import subprocess
    import sys

    truncate(copy)
    # as a command-line tool runs it: through run_cli, which prints data warnings on one line
    script = ("from pipelines.sources import make_source\nfrom common.cli import run_cli\n"
              f"run_cli(lambda argv: make_source({str(copy)!r}, 'train', source='wds', batch_size=16, "
              f"size=({H}, {W}), device='cpu', rank=0, world=1, num_workers=0, skip_damaged=True) and 0)\n")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipping 1 damaged shard(s) of split 'train'")
    assert "train-000001.tar" in lines[0] and "UserWarning" not in lines[0]
