"""``make gpu-check`` (benchmarks/gpu_check.py) on the CPU: its dry path runs the stages end to end
at test size, and every command of the GPU plan parses (benchmark CLI, pre-training presets), so
the one-call GPU check cannot rot between the rare runs on a GPU."""

from __future__ import annotations

from pathlib import Path

from benchmarks.__main__ import build_parser
from benchmarks.gpu_check import main, plan
from train.config import resolve_config


def test_the_gpu_plan_commands_parse(tmp_path):
    stages = {s.name: s for s in plan("cuda", tmp_path, dry_run=False, cores=16).stages}
    assert {"versions", "gpu_tests", "bench_decode", "bench_step", "synthetic_data", "pretrain_mmgl",
            "pretrain_pass"} <= set(stages)
    assert sum(s.limit_s for s in stages.values()) <= 8 * 60  # the stage budgets fit the 8-minute call
    assert "-m" in stages["gpu_tests"].argv and "gpu" in stages["gpu_tests"].argv
    for name in ("bench_decode", "bench_step"):
        argv = stages[name].argv
        args = build_parser().parse_args(argv[argv.index("benchmarks") + 1:])
        assert args.device == "cuda" and Path(args.results) == tmp_path / "bench"
    for name, preset in (("pretrain_mmgl", "mmgl_sysu"), ("pretrain_pass", "pass_vits_lup")):
        argv = stages[name].argv
        overrides = argv[argv.index(preset) + 1:]
        config = resolve_config(None, preset, overrides)  # a UserError if an override went stale
        assert config.train.max_steps > 0 and config.train.output_dir.startswith(str(tmp_path))


def test_the_dry_run_goes_through_the_stages_and_writes_a_summary(tmp_path):
    out = tmp_path / "check"
    archive = tmp_path / "check.tar.gz"
    rc = main(["--device", "cpu", "--dry-run", "--out", str(out), "--archive", str(archive),
               "--only", "versions", "synthetic_data", "pretrain_mmgl"])
    summary = (out / "summary.md").read_text()
    assert rc == 0, summary
    for stage in ("versions", "synthetic_data", "pretrain_mmgl"):
        assert f"| {stage} | ok |" in summary
    assert '"torch"' in (out / "versions.log").read_text()
    assert "pre-training mmgl_tiny:" in summary and "images/s" in summary
    assert archive.stat().st_size > 0
