"""Shards from a remote location, served by Python's http.server on 127.0.0.1 (only that
address): fetch copies and verifies, verify streams, a changed tar is refused, a pipe: location
works, and the evaluation reads a URL as it reads a local folder."""

from __future__ import annotations

import filecmp
import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from common.cli import run_cli
from models.registry import create_backbone
from shards.build import build
from shards.cli import main as shards_main
from shards.manifest import load_manifest
from shards.remote import cache_folder, local_shards
from shards.synthetic import generate
from train.evaluate import main as evaluate_main


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("remote")
    generate("market1501", base / "data", ids=4, images_per_id=4, workers=1)
    build("market1501", base / "data", base / "shards", shard_size=8, workers=1)
    return base / "shards"


@pytest.fixture
def server(tmp_path):
    """Serves ``tmp_path/www`` at http://127.0.0.1:PORT/ for the test's duration."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_fetch_copies_and_verifies(built, server, tmp_path, capsys):
    root, url = server
    shutil.copytree(built, root / "market")
    assert shards_main(["fetch", f"{url}/market/", str(tmp_path / "copy"), "--quiet"]) == 0
    manifest = load_manifest(tmp_path / "copy")
    assert manifest.shards and all(filecmp.cmp(built / s.file, tmp_path / "copy" / s.file, shallow=False)
                                   for s in manifest.shards)
    assert shards_main(["verify", str(tmp_path / "copy")]) == 0
    assert shards_main(["verify", f"{url}/market"]) == 0  # streamed, nothing written
    assert "OK" in capsys.readouterr().out
    # a second fetch finds the copy complete and reads only the manifest
    (root / "market" / manifest.shards[0].file).unlink()
    assert shards_main(["fetch", f"{url}/market", str(tmp_path / "copy"), "--quiet"]) == 0


def test_changed_tar_is_refused(built, server, tmp_path, capsys):
    root, url = server
    shutil.copytree(built, root / "market")
    shard = load_manifest(built).shards[-1]
    data = bytearray((root / "market" / shard.file).read_bytes())
    data[700] ^= 0xFF  # inside the first member's data: same size, other content
    (root / "market" / shard.file).write_bytes(bytes(data))
    assert run_cli(shards_main, ["verify", f"{url}/market"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {shard.file}" in out and "sha256" in out
    assert run_cli(shards_main, ["fetch", f"{url}/market", str(tmp_path / "copy"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sha256 differs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "copy" / "manifest.json").exists()  # an incomplete copy never looks complete


def test_missing_location_is_one_line_error(server, tmp_path, capsys):
    _, url = server
    assert run_cli(shards_main, ["fetch", f"{url}/nothing-here", str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and len(err.strip().splitlines()) == 1


def test_pipe_location(built, tmp_path):
    assert shards_main(["fetch", f"pipe:cat {built}/{{}}", str(tmp_path / "copy"), "--quiet"]) == 0
    assert len(load_manifest(tmp_path / "copy").shards) == len(load_manifest(built).shards)


def test_evaluation_reads_a_url(built, server, tmp_path, monkeypatch):
    root, url = server
    shutil.copytree(built, root / "market")
    monkeypatch.setenv("REID_SHARDS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.save(create_backbone("resnet_tiny", (64, 32)).state_dict(), tmp_path / "backbone.pth")
    common = ["--checkpoint", str(tmp_path / "backbone.pth"), "--protocol", "market", "--size", "64", "32",
              "--device", "cpu", "--source", "wds", "--no_progress"]
    assert evaluate_main([*common, "--shards", f"{url}/market", "--out", str(tmp_path / "remote.json")]) == 0
    assert evaluate_main([*common, "--shards", str(built), "--out", str(tmp_path / "local.json")]) == 0
    remote, local = (json.loads((tmp_path / f"{n}.json").read_text())["results"] for n in ("remote", "local"))
    assert remote == local
    staged = cache_folder(f"{url}/market")
    assert staged.parent == tmp_path / "cache" and load_manifest(staged).shards
    assert local_shards(f"{url}/market") == str(staged)  # re-used
    assert local_shards(str(built)) == str(built)  # a local folder is left alone
