"""The pre-training loop on tiny PASS runs (CPU): outputs, bad settings, a NaN stop, and a run
killed with SIGKILL that resumes to the same parameters as one that never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pass_tiny_data import tiny_args, tiny_shards
from common.cli import run_cli
from train.checkpointing import STATE_FILE, list_checkpoints, load_model_state
from train.methods.base import StepOutput
from train.methods.pass_method import PASS
from train.pretrain import main
from train.runtime import EXIT_NON_FINITE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_config_metrics_tensorboard_and_checkpoints(shards, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(shards, run, "--max_steps", "4", "--log_every", "2", "--checkpoint_every_steps", "2",
                     "--keep_last", "1")
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "pass" and config["train"]["max_steps"] == 4
    lines = read_metrics(run)
    assert [line["step"] for line in lines] == [2, 4]
    assert {"loss", "loss_cls", "loss_part1", "loss_part3", "lr", "wd", "teacher_momentum", "teacher_temp",
            "images_per_s"} <= set(lines[0])
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_00000004"]  # keep_last 1
    state = json.loads((checkpoints[0] / STATE_FILE).read_text())
    assert (state["step"], state["epoch"], state["steps_per_epoch"], state["total_steps"]) == (4, 0, 6, 12)
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shards", "/nonexistent/shards"], "nonexistent"),
        (["--batch_size", "64"], "lower the batch size"),
        (["--resume"], "no complete checkpoint"),
        (["--method.image_size", "60,32"], "multiple of the patch size"),
        (["--warmup_epochs", "5"], "longer than the run"),
    ],
)
def test_bad_settings_fail_before_training_with_one_line(shards, tmp_path, capsys, extra, message):
    assert run_cli(main, tiny_args(shards, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_a_finished_run_is_not_overwritten(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(shards, run, "--max_steps", "1")) == 0
    assert run_cli(main, tiny_args(shards, run, "--max_steps", "2")) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys, monkeypatch):
    original = PASS.forward
    calls = {"n": 0}

    def poisoned(self, views):
        out = original(self, views)
        calls["n"] += 1
        return StepOutput(out.loss * float("nan"), out.metrics) if calls["n"] == 5 else out  # step 4

    monkeypatch.setattr(PASS, "forward", poisoned)
    run = tmp_path / "run"
    # losses are checked every 6 steps and before each checkpoint (steps 3, 6): the NaN of step 4
    # is found before the checkpoint of step 6 would be written
    args = tiny_args(shards, run, "--max_steps", "8", "--log_every", "6", "--checkpoint_every_steps", "3")
    assert main(args) == EXIT_NON_FINITE
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err and "loss=nan" in err
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    state = load_model_state(run / "checkpoints" / "step_00000003")
    assert all(torch.isfinite(v).all() for v in state.values())


# Kills its own process with SIGKILL in the middle of the second checkpoint: after accelerate has
# written it into the temporary folder, before it is published under its final name.
KILL_DRIVER = """
import os, signal, sys
import train.checkpointing as ck
publish, calls = ck.Checkpointer._publish, []
def killing_publish(self, tmp, final):
    calls.append(final)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    publish(self, tmp, final)
ck.Checkpointer._publish = killing_publish
from train.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_parameters_as_an_uninterrupted_one(shards, tmp_path):
    # 8 steps over two epochs (6 steps each): the resumed part crosses the epoch boundary, where
    # the data order reshuffles and the heads' last layer starts to train.
    common = ["--max_steps", "8", "--checkpoint_every_steps", "2", "--checkpoint_every_epochs", "0",
              "--log_every", "1", "--keep_last", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    reference, run = tmp_path / "reference", tmp_path / "run"
    uninterrupted = subprocess.Popen([sys.executable, "-m", "train.pretrain", *tiny_args(shards, reference, *common)],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, *tiny_args(shards, run, *common)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()  # half-written, never published

    resumed = subprocess.run([sys.executable, "-m", "train.pretrain", *tiny_args(shards, run, *common), "--resume"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert uninterrupted.wait(timeout=240) == 0, uninterrupted.stderr.read()[-2000:]

    final = [c.name for c in list_checkpoints(run / "checkpoints")]
    assert final == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    ours, theirs = (load_model_state(r / "checkpoints" / "step_00000008") for r in (run, reference))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    optim = [torch.load(r / "checkpoints" / "step_00000008" / "optimizer.bin", weights_only=False)
             for r in (run, reference)]
    for state_a, state_b in zip(optim[0]["state"].values(), optim[1]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # same steps, losses and schedules: the metrics of steps 3..8 logged after the resume match
    keys = ("step", "loss", "loss_part2", "lr", "wd", "teacher_momentum")
    assert [[m[k] for k in keys] for m in read_metrics(run)] == [[m[k] for k in keys] for m in read_metrics(reference)]


@pytest.mark.parametrize("extra", [["--method.image_size", "60,32"], ["--warmup_epochs", "5"], ["--lr", "-1"]])
def test_the_configuration_is_printed_only_once_the_settings_are_checked(shards, tmp_path, capsys, extra):
    assert run_cli(main, tiny_args(shards, tmp_path / "run", *extra)) == 2
    assert "configuration" not in capsys.readouterr().out


def test_a_good_run_prints_its_configuration(shards, tmp_path, capsys):
    assert main(tiny_args(shards, tmp_path / "run", "--max_steps", "1")) == 0
    out = capsys.readouterr().out
    assert "configuration (" in out and "method.image_size = (64, 32)" in out


def test_runs_with_other_precisions_follow_each_other_in_one_process():
    """Pre-training in bf16 then fine-tuning in float32 from Python (the demo's stages, a
    notebook): accelerate alone refuses the second Accelerator."""
    from accelerate import Accelerator

    from train.runtime import new_accelerator

    assert new_accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="no")
    assert new_accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"
