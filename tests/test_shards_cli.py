"""The shard command line as a user meets it: help, exit codes, one-line errors, summaries."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import pytest
from PIL import Image

import tiny_datasets
from shards.cli import main
from common.cli import run_cli


def run(argv, capsys):
    code = run_cli(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_explains_layouts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["build", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for layout in ("market1501", "dukemtmc", "msmt17", "sysu-mm01", "regdb", "folder", "manifest"):
        assert layout in text
    assert "--shard_size" in text and "--strict" in text and "--workers" in text


def test_build_verify_inspect(tmp_path, capsys):
    dataset = tiny_datasets.sysu(tmp_path / "data")
    out = tmp_path / "out"
    code, text, _ = run(["build", "--layout", "sysu-mm01", "--root", str(dataset.root), "--out", str(out),
                         "--workers", "1", "--shard-size", "5"], capsys)
    assert code == 0
    assert "images/s" in text and "query" in text and "gallery" in text
    code, text, _ = run(["verify", str(out)], capsys)
    assert code == 0 and text.startswith("OK")
    sheet = tmp_path / "sheet.png"
    code, text, _ = run(["inspect", str(out), "--sheet", str(sheet), "--count", "13"], capsys)
    assert code == 0
    train_ir = sum(1 for v in dataset.expected.values() if v[3] == "train" and v[2] == "ir")
    assert any(line.split()[:3] == ["ir", str(train_ir), "3"] for line in text.splitlines())  # the train ir row
    with Image.open(sheet) as image:
        assert image.size == (12 * 64, 2 * (128 + 24))  # 13 tiles: a row of 12, then 1


def test_verify_exit_code_names_the_bad_shard(tmp_path, capsys):
    dataset = tiny_datasets.sysu(tmp_path / "data")
    out = tmp_path / "out"
    run(["build", "--layout", "sysu-mm01", "--root", str(dataset.root), "--out", str(out), "--workers", "1", "--quiet"], capsys)
    with open(out / "query-000000.tar", "r+b") as f:
        f.truncate(1000)
    code, text, err = run(["verify", str(out)], capsys)
    assert code == 1 and "BAD query-000000.tar" in text and "rebuild" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "--layout", "sysu-mm01", "--root", "/no/such/dataset", "--out", "OUT"], "does not exist"),
        (["verify", "/no/such/shards"], "does not exist"),
        (["inspect", "."], "not a shard folder"),
        (["build", "--layout", "folder", "--root", ".", "--out", "OUT", "--workers", "-1"], "--workers must not"),
    ],
)
def test_user_mistakes_get_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_installed_console_script(tmp_path):
    script = str(Path(sys.executable).with_name("reid-shards"))
    result = subprocess.run([script, "verify", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "not a shard folder" in result.stderr and "Traceback" not in result.stderr
