"""The main job (``python -m train.demo``) at ``--scale tiny``: every stage runs, the arms x seeds
table, results.json (summary rows, arms, verdicts, chance) and curves.png are produced, a re-run
reuses what is finished, the ImageNet arm's plumbing works with a torchvision-layout file, and bad
input is one line with exit status 2. The statistics and the verdict rule are checked against
hand-worked numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from common.cli import run_cli
from torchvision_layout import torchvision_resnet50_shapes
from train import demo

# One fine-tuning seed keeps the test fast (4 runs: pre-trained and random init, all labels and
# 50% of them); the 2-seed statistics are checked on hand-worked rows below.
TINY = ["--scale", "tiny", "--workers", "1", "--quiet", "--seeds", "1"]
ARMS = {"pretrained", "random", "pretrained-50%labels", "random-50%labels"}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = run_cli(demo.main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def mmgl_run(tmp_path_factory):
    """One tiny MMGL demo, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("demo")
    # two one-thread slots whatever the machine's load: the random-init runs start beside the
    # pre-training, which then has one thread
    code = demo.main(["--out", str(out), *TINY, "--jobs", "2", "--threads", "1"])
    return code, out / "mmgl-tiny"


def test_tiny_mmgl_demo_runs_every_stage_and_writes_the_report(mmgl_run):
    code, run_dir = mmgl_run
    assert code == 0
    document = json.loads((run_dir / "results.json").read_text())
    assert document["method"] == "mmgl" and document["protocol"] == "sysu"
    assert document["setting"] == "sysu all-search" and document["trials"] == 10
    # test identities and chance, from the generated lists (independently of the shards)
    test_ids = [t for t in (run_dir / "data" / "exp" / "test_id.txt").read_text().replace(",", " ").split() if t]
    assert document["test_ids"] == len(test_ids)
    assert document["chance_R1"] == pytest.approx(1 / len(test_ids))
    summary = document["summary"]
    assert {(row["arm"], row["seed"]) for row in summary} == {(arm, 0) for arm in ARMS}
    for row in summary:
        assert set(row) == {"arm", "seed", "R1", "mAP", "mINP", "same_modality_R1"}
        assert all(0.0 <= row[k] <= 1.0 for k in ("R1", "mAP", "mINP", "same_modality_R1"))
    runs = document["finetune"]["runs"]
    assert set(runs) == {f"{arm}-seed0" for arm in ARMS}
    for name, run in runs.items():
        assert run["protocol"] == "sysu" and run["trials"] == 10
        assert {h["kind"] for h in run["history"]} == {"train", "eval"}
        row = next(r for r in summary if f"{r['arm']}-seed{r['seed']}" == name)
        assert row["R1"] == run["metrics"]["R1"] and row["same_modality_R1"] == run["same_modality"]["R1"]
    # the label-scarce runs classify half the training identities
    full, scarce = runs["random-seed0"]["labelled_ids"], runs["random-50%labels-seed0"]["labelled_ids"]
    assert scarce == max(2, round(0.5 * full)) and scarce < full
    assert [v["arm"] for v in document["verdicts"]] == ["pretrained", "pretrained-50%labels"]
    curve = document["pretrain"]["curve"]
    assert "perm_acc" in document["pretrain"]["last"]
    monitor = document["pretrain"]["monitor"]
    # the init, then every epoch (the tiny pre-training: 1 step per epoch x 2 epochs)
    assert [m["step"] for m in monitor] == [0, 1, 2]
    assert all(0.0 <= m["R1"] <= 1.0 and 0.0 <= m["same_modality_R1"] <= 1.0 for m in monitor)
    assert len(monitor) < len(curve)
    assert [s["stage"] for s in document["stages"]] == ["data", "shards", "pretrain", "export", "finetune"]
    assert "1 thread(s) beside 1 fine-tuning run(s) at a time" in document["stages"][2]["note"]
    machine = document["machine"]
    assert machine["wall_seconds"] > 0 and len(machine["load_average"]) == 3 and machine["threads"] >= 1
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "backbone.pt").is_file()
    assert sys.executable + " -m train.pretrain" in (run_dir / "logs" / "pretrain.log").read_text()
    assert "--label_fraction 0.5" in (run_dir / "logs" / "finetune-random-50%labels-seed0.log").read_text()


def test_a_rerun_reuses_finished_stages_and_prints_the_table(mmgl_run, capsys):
    _, run_dir = mmgl_run
    code, out, _ = _run(capsys, "--out", str(run_dir.parent), *TINY)
    assert code == 0
    assert "data: reused" in out and "shards: up to date, reused" in out
    assert "pretrain: finished run reused" in out and "4 finished run(s) reused" in out
    table = out[out.index("sysu all-search (protocol sysu, 10 trial(s)"):]
    assert "chance R1" in table and "test identities" in table
    assert "MMGL pre-trained" in table and "random init, 50% of the ids labelled" in table
    assert "verdict (all labels): pretrained - random" in table
    assert "RGB->RGB R1" in table and "wall time" in out and "load average" in out


def test_the_imagenet_arm_fine_tunes_from_a_torchvision_file(mmgl_run, capsys, tmp_path):
    """The paper's third arm: a random file in torchvision's ResNet-50 layout; only the two new
    runs are computed, the others reused."""
    _, run_dir = mmgl_run
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) if shape else torch.tensor(0)
             for k, shape in torchvision_resnet50_shapes().items()}
    torch.save(state, tmp_path / "resnet50.pth")
    code, out, err = _run(capsys, "--out", str(run_dir.parent), *TINY, "--imagenet", str(tmp_path / "resnet50.pth"))
    assert code == 0, err
    assert "4 finished run(s) reused" in out and "ImageNet init" in out
    assert "verdict (all labels): imagenet - random" in out
    document = json.loads((run_dir / "results.json").read_text())
    assert {"imagenet", "imagenet-50%labels"} <= {row["arm"] for row in document["summary"]}
    assert "resnet50_two_stream" in (run_dir / "logs" / "finetune-imagenet-seed0.log").read_text()


def test_changed_settings_recompute_only_the_stages_they_affect(mmgl_run, capsys):
    _, run_dir = mmgl_run
    code, out, _ = _run(capsys, "--out", str(run_dir.parent), *TINY, "--finetune", "epochs=1", "--label_fraction", "0")
    assert code == 0
    assert "pretrain: finished run reused" in out
    assert out.count("settings or init changed, recomputed") == 2  # pre-trained and random, all labels
    document = json.loads((run_dir / "results.json").read_text())
    assert {row["arm"] for row in document["summary"]} == {"pretrained", "random"}
    assert max(h["epoch"] for h in document["finetune"]["runs"]["random-seed0"]["history"]) == 0


def test_tiny_pass_demo_runs_on_the_market_layout(tmp_path, capsys):
    code, out, _ = _run(capsys, "--method", "pass", "--out", str(tmp_path), *TINY, "--label_fraction", "0")
    assert code == 0
    table = out[out.index("market (protocol market, 1 trial(s)"):]
    assert "PASS pre-trained" in table and "RGB->RGB" not in table  # Market-1501 has one modality
    document = json.loads((tmp_path / "pass-tiny" / "results.json").read_text())
    assert document["dataset"]["layout"] == "market1501" and document["protocol"] == "market"
    assert document["trials"] == 1
    assert {(row["arm"], row["seed"]) for row in document["summary"]} == {("pretrained", 0), ("random", 0)}
    assert all(row["same_modality_R1"] is None for row in document["summary"])  # Market is RGB only
    assert "loss_cls" in document["pretrain"]["last"]
    assert document["pretrain"]["monitor"] and document["pretrain"]["monitor"][0]["setting"].startswith("market")
    assert (tmp_path / "pass-tiny" / "curves.png").is_file()


def test_arm_statistics_and_verdicts_on_hand_worked_rows():
    rows = [{"arm": "pretrained", "seed": 0, "R1": 0.30, "mAP": 0.2, "mINP": 0.1, "same_modality_R1": 0.6},
            {"arm": "pretrained", "seed": 1, "R1": 0.34, "mAP": 0.2, "mINP": 0.1, "same_modality_R1": 0.7},
            {"arm": "random", "seed": 0, "R1": 0.20, "mAP": 0.1, "mINP": 0.1, "same_modality_R1": 0.5},
            {"arm": "random", "seed": 1, "R1": 0.26, "mAP": 0.1, "mINP": 0.1, "same_modality_R1": None},
            {"arm": "pretrained-25%labels", "seed": 0, "R1": 0.10, "mAP": 0.1, "mINP": 0.1, "same_modality_R1": None},
            {"arm": "pretrained-25%labels", "seed": 1, "R1": 0.20, "mAP": 0.1, "mINP": 0.1, "same_modality_R1": None},
            {"arm": "random-25%labels", "seed": 0, "R1": 0.12, "mAP": 0.1, "mINP": 0.1, "same_modality_R1": None},
            {"arm": "random-25%labels", "seed": 1, "R1": 0.14, "mAP": 0.1, "mINP": 0.1, "same_modality_R1": None}]
    stats = demo.arm_statistics(rows)
    assert stats["pretrained"]["R1"]["mean"] == pytest.approx(0.32)
    assert stats["pretrained"]["R1"]["spread"] == pytest.approx(0.04)
    assert stats["random"]["same_modality_R1"]["values"] == [0.5]  # None is left out
    assert stats["random-25%labels"]["same_modality_R1"] is None
    arms = [demo.Arm("pretrained"), demo.Arm("random"), demo.Arm("pretrained", 0.25), demo.Arm("random", 0.25)]
    assert [a.name for a in arms] == ["pretrained", "random", "pretrained-25%labels", "random-25%labels"]
    lines = demo.verdicts(arms, stats)
    # 0.32 - 0.23 = 0.09 > max(0.04, 0.06): better; 0.15 - 0.13 = 0.02 < max(0.10, 0.02): within noise
    assert [(v["R1_difference"], v["spread"], v["verdict"]) for v in lines] == [
        (pytest.approx(0.09), pytest.approx(0.06), "better"), (pytest.approx(0.02), pytest.approx(0.10), "within noise")]
    assert demo.verdict(-0.05, 0.01) == "worse" and demo.verdict(0.0, 0.0) == "within noise"


def test_training_children_get_the_thread_count():
    env = demo.thread_environment(3)
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"


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
    (["--imagenet", "/no/such/file.pth"], "no such file"),
    (["--label_fraction", "1.5"], "expected a fraction"),
    (["--seeds", "0"], "must be at least 1"),
])
def test_bad_settings_fail_before_training_with_one_line(tmp_path, capsys, extra, message):
    code, _, err = _run(capsys, "--out", str(tmp_path), *TINY, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mmgl-tiny" / "pretrain").exists()
