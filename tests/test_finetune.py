"""A tiny fine-tune runs, evaluates and resumes exactly; exports load; bad settings fail early.

Tiny synthetic SYSU-MM01 and Market-1501 shards are built once per session.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from models.registry import create_backbone
from models.reid import ReIDModel
from models.weights import NATIVE_FORMAT, load_backbone_weights
from models.resnet import resnet_tiny_test
from common.cli import run_cli
from common.errors import UserError
from shards.manifest import load_manifest
from train.checkpointing import load_model_state
from train.finetune import (
    labelled_ids,
    load_for_evaluation,
    lr_factors,
    resolve_config,
    run_finetune,
    training_data,
)
from train.evaluate import main as evaluate_main
from train.evaluation import protocols as evaluation

QUIET = ["--progress_bar", "false", "--tensorboard", "false"]


def _shards(tmp_path_factory, layout: str, ids: int, images: int):
    from shards.build import build
    from shards.synthetic import generate

    base = tmp_path_factory.mktemp(layout)
    generate(layout, base / "data", ids=ids, images_per_id=images, workers=1)
    build(layout, base / "data", base / "shards", shard_size=64, workers=1)
    return base / "shards"


@pytest.fixture(scope="session")
def sysu_shards(tmp_path_factory):
    return _shards(tmp_path_factory, "sysu-mm01", ids=15, images=8)


@pytest.fixture(scope="session")
def market_shards(tmp_path_factory):
    return _shards(tmp_path_factory, "market1501", ids=10, images=6)


def tiny(shards, out, *overrides: str, preset: str = "agw-tiny"):
    return resolve_config(preset, [*QUIET, "--output_dir", str(out), *overrides], shards=str(shards))


def test_tiny_agw_finetune_runs_evaluates_and_resumes_exactly(sysu_shards, tmp_path):
    whole = run_finetune(tiny(sysu_shards, tmp_path / "whole"))
    (result,) = whole.metrics
    assert result.setting == "sysu all-search" and result.trials == [0, 1] and result.queries == 6
    assert 0 <= result.mAP <= 1 and len(result.cmc) == 20
    kinds = [h["kind"] for h in whole.history]
    assert kinds == ["train", "train", "eval"] and whole.history[-1]["step"] == 8
    assert whole.checkpoint.name == "step_00000008"
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "train", "eval"} <= {line["kind"] for line in lines}
    assert all(line["images_per_s"] > 0 for line in lines if line["kind"] == "step")

    # Killed after 4 steps (one epoch), then resumed: the same weights as the uninterrupted run.
    cut = run_finetune(tiny(sysu_shards, tmp_path / "cut", "--max_steps", "4"))
    assert cut.checkpoint.name == "step_00000004"
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_finetune(tiny(sysu_shards, tmp_path / "cut"))
    resumed = run_finetune(tiny(sysu_shards, tmp_path / "cut"), resume="latest")
    assert resumed.checkpoint.name == "step_00000008"
    assert [h["step"] for h in resumed.history if h["kind"] == "train"] == [4, 8]
    a, b = load_model_state(whole.checkpoint), load_model_state(resumed.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed.summary() == whole.summary()

    # The evaluation command takes the run folder and writes JSON.
    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(tmp_path / "whole"), "--shards", str(sysu_shards), "--protocol", "sysu",
            "--trials", "2", "--out", str(out)]
    assert run_cli(evaluate_main, argv) == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["R1"] == pytest.approx(result.rank(1))
    assert report["results"][0]["trials"] == [0, 1]


def test_native_export_initialises_and_evaluates(sysu_shards, tmp_path, capsys):
    torch.manual_seed(1)
    exported = resnet_tiny_test(two_stream=True)
    path = tmp_path / "backbone.pth"
    torch.save({"format": NATIVE_FORMAT, "backbone": {"factory": "models.resnet:resnet_tiny_test",
                                                      "kwargs": {"two_stream": True}},
                "state_dict": exported.state_dict(), "source": {}}, path)
    backbone = create_backbone("resnet_tiny_two_stream", (64, 32))
    load_backbone_weights(backbone, path)
    for key, value in exported.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    with pytest.raises(UserError, match="does not fit a ResNet"):
        load_backbone_weights(create_backbone("resnet_tiny", (64, 32)), path)
    loaded = load_for_evaluation(path, device="cpu", size=(64, 32))
    assert loaded.size == (64, 32) and loaded.regdb_trial is None
    argv = ["--checkpoint", str(path), "--shards", str(sysu_shards), "--protocol", "sysu-indoor", "--trials", "2",
            "--size", "64", "32"]
    assert run_cli(evaluate_main, argv) == 0
    assert "sysu indoor-search" in capsys.readouterr().out


def test_tiny_vit_finetune_on_market(market_shards, tmp_path):
    result = run_finetune(tiny(market_shards, tmp_path / "vit", "--epochs", "1", "--steps_per_epoch", "2",
                               "--warmup_epochs", "0", preset="transreid-tiny"))
    assert [r.setting for r in result.metrics] == ["market"]
    assert result.history[-1]["kind"] == "eval"
    model = ReIDModel(create_backbone("vit_tiny", (64, 32)), 3)
    assert model.feature_dim == 96  # cat(CLS, mean of parts)


@pytest.mark.parametrize("overrides, message", [
    (["--ids_per_batch", "40"], "a batch needs 40 identities"),
    (["--protocol", "market"], "does not evaluate"),
    (["--lr", "-1"], "must not be negative"),
    (["--warmup_epochs", "5"], "longer than the run"),
    (["--arch", "vit_tiny", "--image_size", "60,30"], "multiples of its 16-pixel patch"),
    (["--init", "missing.pth"], "does not exist"),
    (["--nonsense", "1"], "unknown setting"),
])
def test_bad_settings_fail_before_training(sysu_shards, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_finetune(tiny(sysu_shards, tmp_path / "bad", *overrides))
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_cross_modal_sampler_on_rgb_only_data_is_refused(market_shards, tmp_path):
    with pytest.raises(UserError, match="needs RGB and infrared"):
        run_finetune(tiny(market_shards, tmp_path / "rgb"))


def test_agw_schedule_follows_the_recipe():
    config = resolve_config("agw-sysu", shards="x")
    factors = lr_factors(config, steps_per_epoch=2)
    per_epoch = factors[::2]
    assert len(per_epoch) == 81  # range(0, 81)
    assert per_epoch[0] == pytest.approx(0.1) and per_epoch[9] == pytest.approx(1.0)
    assert per_epoch[10:20].tolist() == [1.0] * 10
    assert per_epoch[20:50].tolist() == [0.1] * 30 and per_epoch[50:].tolist() == [0.01] * 31


def test_cli_prints_a_one_line_error(tmp_path, capsys):
    from train.finetune import main

    assert run_cli(main, ["--shards", str(tmp_path / "none"), "--init", "random", "--preset", "agw-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_a_file_that_is_not_weights_is_a_one_line_error(tmp_path):
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text('{"not": "weights"}\n')
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    for path in (not_weights, truncated):
        with pytest.raises(UserError, match="cannot read weights") as caught:
            load_backbone_weights(resnet_tiny_test(), path)
        assert "\n" not in str(caught.value) and "weights_only=False" not in str(caught.value)
        with pytest.raises(UserError, match="cannot read weights") as caught:
            load_for_evaluation(path, device="cpu")  # train.evaluate's way in
        assert "\n" not in str(caught.value)


def test_class_labels_flag_foreign_pids_without_a_host_sync():
    from train.finetune import class_labels

    known = torch.tensor([3, 7, 11])
    labels, foreign = class_labels(torch.tensor([11, 3, 7, 7]), known)
    assert labels.tolist() == [2, 0, 1, 1] and foreign.ndim == 0 and not bool(foreign)
    _, foreign = class_labels(torch.tensor([3, 5]), known)  # flagged on the device, not raised here
    assert bool(foreign)


def test_help_gives_every_setting_its_meaning_and_the_presets_value(capsys):
    import dataclasses

    from train.finetune import FinetuneConfig, main

    assert main(["--preset", "transreid-tiny", "--help"]) == 0  # no --shards / --init needed for help
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    for f in dataclasses.fields(FinetuneConfig):
        assert f"--{f.name}" in lines, f.name
    # the ViT recipe's values (DESIGN.md section 5), each with its meaning
    assert lines["--arch"].split()[1] == "vit_tiny" and "backbone architecture" in lines["--arch"]
    assert lines["--lr"].split()[1] == "0.0004" and "BNNeck + classifier" in lines["--lr"]
    assert lines["--image_size"].split()[1] == "64,32"
    assert lines["--eval_feature"].split()[1] == "pre_bn" and "BNNeck" in lines["--eval_feature"]
    flat = " ".join(out.split())
    assert "agw-sysu AGW's RGB-IR recipe on SYSU-MM01" in flat and "all-search protocol." in flat
    assert "3 non-finite loss" in flat


def test_cli_needs_shards_and_init_outside_help(capsys):
    from train.finetune import main

    assert run_cli(main, ["--preset", "agw-tiny", "--init", "random"]) == 2
    err = capsys.readouterr().err
    assert "--shards" in err and len(err.strip().splitlines()) == 1


def test_results_table_is_printed_once(sysu_shards, tmp_path, capsys):
    from train.finetune import main

    argv = ["--preset", "agw-tiny", "--shards", str(sysu_shards), "--init", "random", "--tensorboard", "false",
            "--progress_bar", "true", "--max_steps", "2", "--output_dir", str(tmp_path / "run")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    header = [line for line in (captured.out + captured.err).splitlines() if line.startswith("setting ")]
    assert len(header) == 1
    assert "sysu all-search" in captured.out


# Poisons the triplet loss of step 5 (0-based; the second step of epoch 1) with a NaN, then runs
# the command line as `python -m train.finetune` does.
NAN_DRIVER = """
import sys
import train.finetune as ft
from common.cli import run_cli
original, calls = ft.triplet_loss, []
def poisoned(config, features, labels):
    calls.append(1)
    loss = original(config, features, labels)
    return loss * float("nan") if len(calls) == 6 else loss
ft.triplet_loss = poisoned
sys.exit(run_cli(ft.main))
"""


def test_non_finite_loss_exits_3_and_keeps_the_last_good_checkpoint(sysu_shards, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from train.checkpointing import list_checkpoints

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    # 2 epochs of 4 steps, a checkpoint per epoch, losses checked every 2 steps: the NaN of step 5
    # is found at step 6, before the checkpoint of step 8
    argv = ["--preset", "agw-tiny", "--shards", str(sysu_shards), "--init", "random", *QUIET,
            "--output_dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", NAN_DRIVER, *argv], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 3, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in done.stderr
    assert "non-finite loss at step 5" in error[0] and "triplet_loss=nan" in error[0] and "loss=nan" in error[0]
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_00000004"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    state = load_model_state(run / "checkpoints" / "step_00000004")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (run / "results.json").exists()


class _TwoRanks:
    """accelerate's collectives as process 0 of two sees them, its peer holding ``peer`` rows:
    ``pad_across_processes`` pads dim 0 with zeros to the longer part; ``gather`` concatenates
    in rank order (a row count with the peer's, rows with the peer's rows padded alike)."""

    def __init__(self, peer: torch.Tensor) -> None:
        self.peer = peer

    @staticmethod
    def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros(rows - len(tensor), *tensor.shape[1:])])

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return self._padded(tensor, max(len(tensor), len(self.peer)))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape == (1,):  # a row count
            return torch.cat([tensor, torch.tensor([len(self.peer)])])
        return torch.cat([tensor, self._padded(self.peer, len(tensor))])


@pytest.mark.parametrize("mine_rows, peer_rows", [(3, 2), (2, 3), (2, 2)])
def test_gather_rows_concatenates_parts_of_different_lengths(mine_rows, peer_rows):
    from train.runtime import gather_rows

    mine = torch.arange(1, 2 * mine_rows + 1).view(mine_rows, 2)
    peer = torch.arange(101, 101 + 2 * peer_rows).view(peer_rows, 2)
    gathered = gather_rows(_TwoRanks(peer))(mine)
    assert gathered.tolist() == mine.tolist() + peer.tolist()


# One fine-tuning run, launched on two processes by the test below. Each process writes its
# summary to its own file: printed, the two processes' lines could interleave on the shared pipe
# (seen once in CI: one SUMMARY line of the two was lost).
TWO_PROCESS_DRIVER = """
import json, os, sys
from pathlib import Path
from train.finetune import resolve_config, run_finetune
shards, out, summaries = sys.argv[1:]
config = resolve_config("agw-tiny", ["--progress_bar", "false", "--tensorboard", "false", "--output_dir", out],
                        shards=shards)
result = run_finetune(config)
Path(summaries, f"summary-{os.environ['RANK']}.json").write_text(json.dumps(result.summary()))
"""


def test_two_processes_share_the_evaluation_and_match_one(sysu_shards, tmp_path):
    """Each process embeds its part of the test images; process 0's metrics equal a one-process
    evaluation of the same checkpoint (see tests/test_pretrain_distributed.py for the launch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_PROCESS_DRIVER)
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, *launch, str(driver), str(sysu_shards), str(tmp_path / "run"), str(tmp_path)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    summaries = [json.loads((tmp_path / f"summary-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(summaries) == 2 and {} in summaries  # process 0 alone ranks
    shared = next(summary for summary in summaries if summary)
    loaded = load_for_evaluation(tmp_path / "run", device="cpu")  # the same model, one process
    results = evaluation.evaluate(loaded.embed, sysu_shards, "sysu", size=loaded.size, transform=loaded.transform,
                                    trials=2, batch_size=64, device="cpu", progress=False)
    assert shared == {r.setting: r.summary() for r in results}


def test_labelled_ids_are_a_seeded_fraction():
    pids = list(range(10, 50))
    picked = labelled_ids(pids, 0.25, seed=3)
    assert len(picked) == 10 and picked == sorted(picked) and set(picked) <= set(pids)
    assert labelled_ids(pids, 0.25, seed=3) == picked  # the same seed: the same identities (both arms)
    assert labelled_ids(pids, 0.25, seed=4) != picked
    assert labelled_ids(pids, 1.0, seed=3) == pids and len(labelled_ids(pids, 0.01, seed=0)) == 2


@pytest.mark.parametrize("sampler", ["cross_modal", "identity"])
def test_a_label_scarce_sampler_draws_only_the_labelled_identities(sysu_shards, tmp_path, sampler):
    config = tiny(sysu_shards, tmp_path / "run", "--label_fraction", "0.5", "--sampler", sampler)
    manifest = load_manifest(sysu_shards)
    data = training_data(config, manifest, rank=0, world=1)
    everyone = sorted(manifest.pid_to_label)
    assert data.pids.tolist() == labelled_ids(everyone, 0.5, config.seed)
    pid = torch.tensor([p for p in everyone for _ in range(6)])
    modality = torch.tensor([0, 0, 0, 1, 1, 1] * len(everyone))
    draws = data.sampler(SimpleNamespace(pid=pid, modality=modality))
    seen = {int(pid[i]) for batch in draws.epoch_table(0).tolist() for i in batch}
    assert seen <= set(data.pids.tolist()) and len(seen) >= config.ids_per_batch


def test_label_scarce_fine_tuning_classifies_the_labelled_identities(sysu_shards, tmp_path):
    result = run_finetune(tiny(sysu_shards, tmp_path / "run", "--label_fraction", "0.5"))
    report = json.loads((result.output_dir / "results.json").read_text())
    train_ids = len(load_manifest(sysu_shards).pid_to_label)
    assert report["labelled_ids"] == max(2, round(0.5 * train_ids))
    classifier = [v for k, v in load_model_state(result.checkpoint).items() if k.endswith("classifier.weight")]
    assert classifier[0].shape[0] == report["labelled_ids"]
    # the same-modality reference figure on SYSU shards
    assert report["same_modality"]["setting"].startswith("RGB->RGB") and 0 <= report["same_modality"]["R1"] <= 1
    with pytest.raises(UserError, match="label_fraction"):
        tiny(sysu_shards, tmp_path / "bad", "--label_fraction", "0").validate()
