"""``--log_with``: TensorBoard stays the default and writes event files; an unknown tracker, or
one whose package is missing, is a one-line error before any work."""

from __future__ import annotations

import importlib.util

import pytest

from common.cli import run_cli
from common.errors import UserError
from pass_tiny_data import tiny_args, tiny_shards
from train.finetune import FinetuneConfig
from train.finetune import main as finetune_main
from train.pretrain import main as pretrain_main
from train.runtime import MetricsLogger, make_accelerator, trackers_of
from train.settings import TrainConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory)


def test_tensorboard_is_the_default_and_writes_events(tmp_path):
    assert TrainConfig().log_with == FinetuneConfig().log_with == "tensorboard"
    assert trackers_of("tensorboard") == ["tensorboard"] and trackers_of("none") == []
    accelerator = make_accelerator(tmp_path, "no", trackers=trackers_of(TrainConfig().log_with))
    accelerator.init_trackers("run")
    MetricsLogger(accelerator, tmp_path).write({"step": 1, "loss": 0.5}, step=1)
    accelerator.end_training()
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    (tmp_path / "quiet").mkdir()
    quiet = make_accelerator(tmp_path / "quiet", "no", trackers=trackers_of("none"))
    quiet.init_trackers("run")
    MetricsLogger(quiet, tmp_path / "quiet", trackers=False).write({"step": 1, "loss": 0.5}, step=1)
    quiet.end_training()
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def test_unknown_tracker_is_refused():
    with pytest.raises(UserError, match="unknown --log_with nonsense"):
        trackers_of("tensorboard,nonsense")


MISSING = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name) is None]


@pytest.mark.parametrize("log_with, message", [("nonsense", "unknown --log_with"),
                                               *[(name, f"needs the {name} package") for name in MISSING]])
def test_bad_tracker_is_one_line_error_before_training(shards, tmp_path, capsys, log_with, message):
    assert run_cli(pretrain_main, tiny_args(shards, tmp_path / "run", "--log_with", log_with)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    argv = ["--preset", "agw-tiny", "--shards", str(shards), "--init", "random", "--output_dir", str(tmp_path / "ft"),
            "--log_with", log_with]
    assert run_cli(finetune_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
