"""Synthetic RegDB: the real layout written out here (folders, names, trial lists), paired
visible/thermal images, and the whole RegDB path end to end: generate -> ``python -m shards
build --layout regdb`` -> ``python -m train.finetune`` (toy size, RegDB protocol) ->
``python -m train.evaluate``.

Every check reads the written files back and recomputes what it needs from names and pixels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.cli import run_cli
from shards.synthetic import main

REGDB_NAME = re.compile(r"^(female|male)_(front|back)_([vt])_(\d{5})_(\d+)\.bmp$")
IDS, PER_ID = 8, 4


@pytest.fixture(scope="module")
def regdb(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("regdb") / "data"
    argv = ["--layout", "regdb", "--out", str(root), "--ids", str(IDS), "--images-per-id", str(PER_ID),
            "--workers", "1"]
    assert run_cli(main, argv) == 0
    return root


def parse_lists(root: Path) -> dict[tuple[str, str, int], list[tuple[str, int]]]:
    """(part, modality, trial) -> [(relpath, label)] of every ``idx`` file."""
    lists = {}
    for path in (root / "idx").iterdir():
        match = re.fullmatch(r"(train|test)_(visible|thermal)_(\d+)\.txt", path.name)
        assert match, path.name
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        assert all(len(row) == 2 for row in rows), path
        lists[match[1], match[2], int(match[3])] = [(rel, int(label)) for rel, label in rows]
    return lists


def test_regdb_tree_follows_the_layout(regdb):
    assert sorted(p.name for p in regdb.iterdir()) == ["Thermal", "Visible", "idx"]
    names = {}
    for folder, letter in (("Visible", "v"), ("Thermal", "t")):
        assert sorted(int(p.name) for p in (regdb / folder).iterdir()) == list(range(1, IDS + 1))
        for pid_dir in (regdb / folder).iterdir():
            files = sorted(p.name for p in pid_dir.iterdir())
            assert len(files) == PER_ID, pid_dir  # exactly, as RegDB's 10 + 10
            for name in files:
                match = REGDB_NAME.match(name)
                assert match and match[3] == letter, name
            names[folder, int(pid_dir.name)] = files
    # Image n of both cameras is one moment: the same name but for the v/t letter.
    for pid in range(1, IDS + 1):
        thermal = sorted(n.replace("_t_", "_v_") for n in names["Thermal", pid])
        assert thermal == names["Visible", pid]
        assert len({REGDB_NAME.match(n)[1] for n in names["Visible", pid]}) == 1  # one sex per person

    lists = parse_lists(regdb)
    assert sorted({key[2] for key in lists}) == list(range(1, 11)) and len(lists) == 40
    splits = set()
    for trial in range(1, 11):
        ids = {}
        for part in ("train", "test"):
            for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
                rows = lists[part, modality, trial]
                pids = {int(Path(rel).parent.name) for rel, _ in rows}
                # Every image of the listed identities, and only of them, in this modality.
                expected = sorted(f"{folder}/{pid}/{n}" for pid in pids for n in names[folder, pid])
                assert sorted(rel for rel, _ in rows) == expected
                # Labels index the trial's identities of that part: 0..n-1, one per identity.
                label_of = {int(Path(rel).parent.name): label for rel, label in rows}
                assert sorted(label_of.values()) == list(range(len(pids)))
                ids.setdefault(part, pids)
                assert ids[part] == pids  # both modalities list the same identities
        assert not ids["train"] & ids["test"] and ids["train"] | ids["test"] == set(range(1, IDS + 1))
        assert len(ids["train"]) == IDS // 2
        splits.add(frozenset(ids["train"]))
    assert len(splits) > 1  # every trial draws its own split


def test_regdb_images_are_bmp_and_thermal_is_grey_and_paired(regdb):
    for pid in (1, 2):
        for visible in sorted((regdb / "Visible" / str(pid)).iterdir()):
            thermal = regdb / "Thermal" / str(pid) / visible.name.replace("_v_", "_t_")
            images = [Image.open(p) for p in (visible, thermal)]
            assert all(im.format == "BMP" and im.mode == "RGB" and im.size == (64, 128) for im in images)
            pixels = [np.asarray(im, dtype=np.float64) for im in images]
            assert np.abs(pixels[1][..., 0] - pixels[1][..., 2]).max() == 0  # equal channels
            assert np.abs(pixels[0][..., 0] - pixels[0][..., 2]).max() > 20  # colour
            # The pair shows one moment: the thermal image's warm (bright) columns, where the
            # body is, are the visible image's least-background-like columns. Compare the
            # column profiles' centres of mass of the middle band.
            band = slice(40, 90)
            heat = pixels[1][band, :, 0].mean(0)
            heat = np.clip(heat - np.median(heat), 0, None)
            centre_t = (heat * np.arange(64)).sum() / heat.sum()
            colour_change = np.abs(np.diff(pixels[0][band], axis=1)).sum((0, 2))
            centre_v = (colour_change * np.arange(63)).sum() / colour_change.sum()
            assert abs(centre_t - centre_v) < 12, (visible.name, centre_t, centre_v)


def run_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_regdb_end_to_end_build_finetune_evaluate(regdb, tmp_path):
    shards = tmp_path / "shards"
    build = run_module(["shards", "build", "--layout", "regdb", "--root", str(regdb), "--out", str(shards),
                        "--workers", "1", "--quiet"], tmp_path)
    assert build.returncode == 0, build.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["layout"] == "regdb" and len(manifest["trials"]) == 10

    run = tmp_path / "run"
    finetune = run_module(["train.finetune", "--preset", "agw-tiny", "--shards", str(shards), "--init", "random",
                           "--protocol", "regdb", "--regdb_trial", "2", "--output_dir", str(run),
                           "--progress_bar", "false", "--tensorboard", "false"], tmp_path)
    assert finetune.returncode == 0, finetune.stdout + finetune.stderr
    results = json.loads((run / "results.json").read_text())["results"]
    assert [r["setting"] for r in results] == ["regdb visible->thermal", "regdb thermal->visible"]
    test_ids = {int(Path(rel).parent.name) for rel, _ in parse_lists(regdb)["test", "visible", 2]}
    for result in results:
        assert result["trials"] == [2]
        # Every test image queries once (nothing is removed in RegDB), so R1 is a multiple of
        # 1 / queries; the CMC is a non-decreasing curve that reaches 1 within the gallery size.
        queries = len(test_ids) * PER_ID
        assert result["queries"] == queries and result["gallery"] == queries
        r1 = result["cmc"][0]
        assert abs(r1 * queries - round(r1 * queries)) < 1e-6
        assert np.all(np.diff(result["cmc"]) >= 0) and result["cmc"][queries - 1] == 1.0

    out = tmp_path / "eval.json"
    evaluation = run_module(["train.evaluate", "--checkpoint", str(run), "--shards", str(shards), "--protocol",
                             "regdb", "--out", str(out), "--no-progress", "--device", "cpu"], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "regdb visible->thermal" in evaluation.stdout and "regdb thermal->visible" in evaluation.stdout
