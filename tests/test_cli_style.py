"""One command-line style for every tool: options are spelled with underscores, the dashed
spelling is accepted as the same option, a setting has the same name in every tool, and every
tool has a console script."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import tomllib
from pathlib import Path

import pytest

from benchmarks.__main__ import build_parser as bench_parser
from common.cli import canonical_options
from shards.cli import build_parser as shards_parser
from shards.synthetic import build_parser as synthetic_parser
from train.demo import build_parser as demo_parser
from train.evaluate import build_parser as evaluate_parser
from train.export import build_parser as export_parser
from train.features import build_parser as features_parser
from train.finetune import FinetuneConfig
from train.finetune import build_parser as finetune_parser
from train.pretrain import build_parser as pretrain_parser
from train.settings import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"shards": shards_parser, "synthetic": synthetic_parser, "pretrain": pretrain_parser,
           "finetune": finetune_parser, "evaluate": evaluate_parser, "export": export_parser,
           "demo": demo_parser, "bench": bench_parser, "features": features_parser}


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every long option of ``parser`` and of its sub-commands."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += option_strings(sub)
        found += [s for s in action.option_strings if s.startswith("--")]
    return found


@pytest.mark.parametrize("tool", PARSERS)
def test_options_are_spelled_with_underscores(tool):
    options = option_strings(PARSERS[tool]())
    assert options  # the walk found the options
    dashed = [o for o in options if "-" in o[2:]]
    assert not dashed, f"{tool}: {dashed}"


def test_dashed_spelling_is_the_same_option():
    argv = ["--checkpoint", "run", "--shards", "s", "--protocol", "sysu", "--eval_batch_size", "64",
            "--regdb_trials", "1,2", "--progress_bar", "false", "--eval_flip"]
    dashed = ["--checkpoint", "run", "--shards", "s", "--protocol", "sysu", "--eval-batch-size", "64",
              "--regdb-trials=1,2", "--progress-bar", "false", "--eval-flip"]
    parser = evaluate_parser()
    assert parser.parse_args(dashed) == parser.parse_args(argv)
    args = parser.parse_args(argv)
    assert (args.eval_batch_size, args.regdb_trials, args.progress_bar, args.eval_flip) == (64, [1, 2], False, True)
    # the old spellings still work
    old = parser.parse_args(["--checkpoint", "run", "--shards", "s", "--protocol", "sysu", "--batch-size", "64",
                             "--trials", "3", "--flip", "--no-progress"])
    assert (old.eval_batch_size, old.eval_trials, old.eval_flip, old.progress_bar) == (64, 3, True, False)
    shards = shards_parser().parse_args(["build", "--layout", "folder", "--root", "r", "--out", "o", "--shard-size", "9"])
    assert shards.shard_size == 9


def test_canonical_options_leave_values_and_positionals_alone():
    assert canonical_options(["--a-b=c-d", "x-y", "-v", "--", "--e-f"]) == ["--a_b=c-d", "x-y", "-v", "--", "--e-f"]


def test_the_same_setting_has_the_same_name_in_every_tool():
    finetune_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    evaluate_options = {o[2:] for o in option_strings(evaluate_parser())}
    shared = {"shards", "protocol", "source", "eval_batch_size", "eval_trials", "eval_flip", "progress_bar"}
    assert shared <= finetune_fields and shared <= evaluate_options
    pretrain_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"shards", "source", "seed", "output_dir", "progress_bar", "batch_size"} <= pretrain_fields
    assert {"shards", "source", "seed", "output_dir", "progress_bar"} <= finetune_fields
    assert "output_dir" in {o[2:] for o in option_strings(demo_parser())}


def test_every_tool_has_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"reid-shards", "reid-pretrain", "reid-finetune", "reid-evaluate", "reid-export",
                            "reid-features", "reid-demo", "reid-bench"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
