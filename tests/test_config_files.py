"""Config files (``--config FILE``, JSON or YAML) and ``--print_config`` of both training tools: a
run started from another run's ``config.json`` resolves to the same settings; the command line
overrides the file; old saved configs (renamed backbones) still load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.cli import run_cli
from common.errors import UserError
from train import finetune, pretrain
from train.config import config_from_dict, resolve_config, save_config

PRETRAIN_CHANGES = ["--epochs", "3", "--lr", "0.001", "--method.out_dim", "128", "--method.image_size", "96,48",
                    "--betas", "0.8,0.9", "--num_workers", "2", "--shards", "/data/shards", "--output_dir", "/runs/a"]
FINETUNE_CHANGES = ["--epochs", "5", "--image_size", "96,48", "--milestones", "2,4", "--protocol", "market",
                    "--eval_flip", "true", "--lr", "0.02", "--output_dir", "/runs/b"]


def printed(main, argv, capsys) -> dict:
    assert run_cli(main, [*argv, "--print_config"]) == 0
    return json.loads(capsys.readouterr().out)


def as_json(values: dict) -> dict:
    """``values`` as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(values))


def test_pretrain_run_config_json_resolves_to_the_same_settings(tmp_path, capsys):
    config = resolve_config(None, "pass_tiny", PRETRAIN_CHANGES)
    path = tmp_path / "config.json"
    save_config(config, path)  # what a run writes in its output folder
    assert resolve_config(None, None, [], path) == config
    # the same through the command line, and --print_config prints what a run saves
    assert printed(pretrain.main, ["--config", str(path)], capsys) == as_json(config.to_dict())
    assert printed(pretrain.main, ["--preset", "pass_tiny", *PRETRAIN_CHANGES], capsys) == as_json(config.to_dict())


def test_finetune_run_config_json_resolves_to_the_same_settings(tmp_path, capsys):
    config = finetune.resolve_config("transreid-tiny", FINETUNE_CHANGES, shards="/data/shards", init="random")
    path = tmp_path / "config.json"
    path.write_text(finetune.config_document(config))  # what a run writes in its output folder
    assert finetune.resolve_config(None, [], path) == config  # whatever the default preset is
    assert printed(finetune.main, ["--config", str(path)], capsys) == as_json(dataclasses.asdict(config))


def test_yaml_file_then_command_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: mmgl_tiny\ntrain:\n  epochs: 4\n  lr: 0.5\nmethod_config:\n  num_stripes: 3\n"
                    "log_every: 7\nmethod.pcc_weight: 0.25\n")
    values = printed(pretrain.main, ["--config", str(path), "--lr", "0.125"], capsys)
    assert values["method"] == "mmgl" and values["preset"] == "mmgl_tiny"
    assert values["train"]["epochs"] == 4 and values["train"]["log_every"] == 7
    assert values["train"]["lr"] == 0.125  # the command line wins over the file
    assert values["method_config"]["num_stripes"] == 3 and values["method_config"]["pcc_weight"] == 0.25
    # untouched settings keep the preset's values
    assert values["train"]["batch_size"] == 16 and values["method_config"]["image_size"] == [96, 48]

    tuned = tmp_path / "finetune.yml"
    tuned.write_text("preset: agw-tiny\nepochs: 3\nimage_size: [96, 48]\ninit: random\nshards: /data/s\n")
    values = printed(finetune.main, ["--config", str(tuned), "--epochs", "6"], capsys)
    assert values["epochs"] == 6 and values["image_size"] == [96, 48] and values["arch"] == "resnet_tiny_two_stream"
    assert values["shards"] == "/data/s" and values["init"] == "random"


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: three\n", "bad value for --epochs"),
    ("train:\n  epoch: 3\n", "unknown setting --epoch"),
    ("- a list\n", "must hold a mapping"),
    ("train: [1, 2\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run_cli(pretrain.main, ["--preset", "pass_tiny", "--config", str(path), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert run_cli(pretrain.main, ["--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read --config" in capsys.readouterr().err


def test_old_saved_configs_load_with_the_registry_names():
    """Before the backbone registry MMGL said backbone + two_stream and PASS vit_tiny_test."""
    mmgl = config_from_dict({"method": "mmgl", "preset": "mmgl_tiny", "train": {},
                             "method_config": {"backbone": "tiny", "two_stream": True}})
    assert mmgl.method_config.backbone == "resnet_tiny_two_stream"
    one_stream = config_from_dict({"method": "mmgl", "train": {},
                                   "method_config": {"backbone": "narrow", "two_stream": False}})
    assert one_stream.method_config.backbone == "resnet_narrow"
    passed = config_from_dict({"method": "pass", "train": {}, "method_config": {"arch": "vit_tiny_test"}})
    assert passed.method_config.arch == "vit_tiny"
    with pytest.raises(UserError, match="unknown backbone"):
        config_from_dict({"method": "pass", "train": {}, "method_config": {"arch": "vit_huge"}})


def test_an_old_run_config_json_still_starts_a_run(tmp_path, capsys):
    old = resolve_config(None, "mmgl_tiny", ["--shards", "/data/s"]).to_dict()
    old["method_config"].pop("backbone")
    old["method_config"].update(backbone="tiny", two_stream=True)  # the names before the registry
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    values = printed(pretrain.main, ["--config", str(path)], capsys)
    assert values["method_config"]["backbone"] == "resnet_tiny_two_stream" and "two_stream" not in values["method_config"]

