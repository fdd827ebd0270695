"""A tiny fine-tune runs, evaluates and resumes exactly; exports load; bad settings fail early.

Tiny synthetic SYSU-MM01 and Market-1501 shards are built once per session.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.export import NATIVE_FORMAT
from models.resnet import resnet_tiny_test
from shards.errors import UserError, run_cli
from train.checkpointing import load_model_state
from train.finetune import (
    ReIDModel,
    build_backbone,
    load_backbone,
    load_for_evaluation,
    lr_factors,
    resolve_config,
    run_finetune,
)
from train import evaluate as evaluate_cli

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
    assert run_cli(evaluate_cli.main, argv) == 0
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
    backbone = build_backbone("resnet_tiny_two_stream", (64, 32))
    load_backbone(backbone, path)
    for key, value in exported.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    with pytest.raises(UserError, match="does not fit a ResNet"):
        load_backbone(build_backbone("resnet_tiny", (64, 32)), path)
    loaded = load_for_evaluation(path, device="cpu", size=(64, 32))
    assert loaded.size == (64, 32) and loaded.regdb_trial is None
    argv = ["--checkpoint", str(path), "--shards", str(sysu_shards), "--protocol", "sysu-indoor", "--trials", "2",
            "--size", "64", "32"]
    assert run_cli(evaluate_cli.main, argv) == 0
    assert "sysu indoor-search" in capsys.readouterr().out


def test_tiny_vit_finetune_on_market(market_shards, tmp_path):
    result = run_finetune(tiny(market_shards, tmp_path / "vit", "--epochs", "1", "--steps_per_epoch", "2",
                               "--warmup_epochs", "0", preset="transreid-tiny"))
    assert [r.setting for r in result.metrics] == ["market"]
    assert result.history[-1]["kind"] == "eval"
    model = ReIDModel(build_backbone("vit_tiny", (64, 32)), 3)
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
    assert per_epoch[0] == pytest.approx(0.1) and per_epoch[9] == pytest.approx(1.0)
    assert per_epoch[10:20].tolist() == [1.0] * 10
    assert per_epoch[20:50].tolist() == [0.1] * 30 and per_epoch[50:].tolist() == [0.01] * 30
    transreid = resolve_config("transreid-market", shards="x")
    cosine = lr_factors(transreid, steps_per_epoch=10)
    assert cosine[0] == pytest.approx(0.01) and cosine[200] == pytest.approx(1.0)
    assert cosine[-1] == pytest.approx(0.002, abs=1e-4)


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
            load_backbone(resnet_tiny_test(), path)
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
