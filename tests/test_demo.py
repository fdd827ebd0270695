"""The main job (``python -m train.demo``) at ``--scale tiny``: every stage runs, the side-by-side
table, results.json and curves.png are produced, a re-run reuses what is finished, and bad input
is one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.cli import run_cli
from train import demo

TINY = ["--scale", "tiny", "--workers", "1", "--quiet"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_cli(demo.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def mmgl_run(tmp_path_factory):
    """One tiny MMGL demo, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("demo")
    code = demo.main(["--out", str(out), *TINY])
    return code, out / "mmgl-tiny"


def test_tiny_mmgl_demo_runs_every_stage_and_writes_the_report(mmgl_run):
    code, run_dir = mmgl_run
    assert code == 0
    document = json.loads((run_dir / "results.json").read_text())
    assert document["method"] == "mmgl" and document["protocol"] == "sysu"
    assert document["setting"] == "sysu all-search" and document["trials"] == 10
    for init in ("pretrained", "random"):
        run = document["finetune"][init]
        assert set(run["metrics"]) == {"R1", "R5", "R10", "R20", "mAP", "mINP"}
        assert all(0.0 <= v <= 1.0 for v in run["metrics"].values())
        assert run["protocol"] == "sysu" and run["trials"] == 10
        assert {h["kind"] for h in run["history"]} == {"train", "eval"}
    assert document["pretrain"]["curve"] and "perm_acc" in document["pretrain"]["curve"][-1]
    assert [s["stage"] for s in document["stages"]] == [
        "data", "shards", "pretrain", "export", "finetune from pretrained init", "finetune from random init"]
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "backbone.pt").is_file()
    assert sys.executable + " -m train.pretrain" in (run_dir / "logs" / "pretrain.log").read_text()


def test_a_rerun_reuses_finished_stages_and_prints_the_table(mmgl_run, capsys):
    _, run_dir = mmgl_run
    code, out, _ = _run(capsys, "--out", str(run_dir.parent), *TINY)
    assert code == 0
    assert "data: reused" in out and "shards: up to date, reused" in out
    assert "pretrain: finished run reused" in out
    assert out.count("finished run reused") == 3  # the pre-training and both fine-tunings
    table = out[out.index("sysu all-search (protocol sysu, 10 trial(s)"):]
    assert "MMGL pre-trained" in table and "random init" in table and "pre-trained - random" in table
    assert "R1" in table and "mAP" in table and "mINP" in table


def test_changed_settings_recompute_only_the_stages_they_affect(mmgl_run, capsys):
    _, run_dir = mmgl_run
    code, out, _ = _run(capsys, "--out", str(run_dir.parent), *TINY, "--finetune", "epochs=1")
    assert code == 0
    assert "pretrain: finished run reused" in out
    assert "finetune from random init: settings or init changed, recomputed" in out
    document = json.loads((run_dir / "results.json").read_text())
    assert max(h["epoch"] for h in document["finetune"]["random"]["history"]) == 0


def test_tiny_pass_demo_runs_on_the_market_layout(tmp_path):
    assert demo.main(["--method", "pass", "--out", str(tmp_path), *TINY]) == 0
    document = json.loads((tmp_path / "pass-tiny" / "results.json").read_text())
    assert document["dataset"]["layout"] == "market1501" and document["protocol"] == "market"
    assert document["trials"] == 1
    assert {"R1", "mAP", "mINP"} <= set(document["finetune"]["pretrained"]["metrics"])
    assert {"R1", "mAP", "mINP"} <= set(document["finetune"]["random"]["metrics"])
    assert "loss_cls" in document["pretrain"]["curve"][-1]
    assert (tmp_path / "pass-tiny" / "curves.png").is_file()


def test_a_root_that_is_not_the_layout_is_one_line_with_status_2(tmp_path):
    (tmp_path / "not-sysu").mkdir()
    (tmp_path / "not-sysu" / "readme.txt").write_text("no cam folders here")
    for root in (tmp_path / "not-sysu", tmp_path / "missing"):
        done = subprocess.run([sys.executable, "-m", "train.demo", "--root", str(root), "--out", str(tmp_path / "o"),
                               *TINY], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.tar"))


@pytest.mark.parametrize("extra, message", [
    (["--pretrain", "epochs"], "expected KEY=VALUE"),
    (["--pretrain", "no_such_key=1"], "unknown setting"),
    (["--finetune", "epochs=many"], "bad value for --epochs"),
])
def test_bad_settings_fail_before_training_with_one_line(tmp_path, capsys, extra, message):
    code, _, err = _run(capsys, "--out", str(tmp_path), *TINY, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mmgl-tiny" / "pretrain").exists()
