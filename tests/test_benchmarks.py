"""The benchmark suite in ``--quick`` mode on the CPU: well-formed results, tables, charts and a
report rebuilt from the JSON. No timing threshold is asserted (the figures depend on the machine)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.decode import IMAGENET_MEAN, IMAGENET_STD, FlipNormalize
from benchmarks.machine import machine_name
from benchmarks.registry import SUITES
from benchmarks.timing import side_by_side

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """One quick run of every suite into a temporary results folder."""
    folder = tmp_path_factory.mktemp("bench-results")
    assert main(["run", "--suite", "all", "--quick", "--results", str(folder)]) == 0
    return folder


def load(results: Path, suite: str) -> dict:
    return json.loads((results / machine_name() / f"{suite}.json").read_text())


@pytest.mark.parametrize("suite", list(SUITES))
def test_quick_results_are_well_formed(results, suite):
    doc = load(results, suite)
    assert doc["suite"] == suite and doc["title"] and doc["command"].startswith("python -m benchmarks run")
    machine = doc["machine"]
    assert machine["name"] == machine_name() and machine["cores"] >= 1 and machine["cpu"]
    assert machine["versions"]["torch"] and machine["versions"]["pillow"]
    settings = doc["settings"]
    assert settings["quick"] is True and settings["device"] == "cpu" and settings["repeats"] == 1
    assert len(settings["load_average_before"]) == 3 and len(settings["load_average_after"]) == 3
    keys = [k for k, _ in doc["columns"]]
    assert doc["primary"] in keys and doc["rows"]
    for row in doc["rows"]:
        assert row["name"] and row["items"] > 0
        for key in keys + ["seconds_median"]:
            counted = key.startswith(("system_ms", "minor_faults"))  # may be 0 for a run that touches no new page
            assert (row[key] >= 0 if counted else row[key] > 0) and math.isfinite(row[key]), (row["key"], key)
        assert len(row["seconds_all"]) == settings["repeats"]
    by_key = {row["key"]: row for row in doc["rows"]}
    assert doc["ratios"]
    for ratio in doc["ratios"]:
        metric = ratio["metric"]
        assert metric in keys
        expected = by_key[ratio["numerator"]][metric] / by_key[ratio["denominator"]][metric]
        assert ratio["value"] == pytest.approx(expected, rel=1e-2, abs=1e-3)
    table = (results / machine_name() / f"{suite}.md").read_text()
    assert all(row["name"] in table for row in doc["rows"])
    assert (results / machine_name() / f"{suite}.png").read_bytes()[:8] == PNG_MAGIC


def test_decode_compares_every_cpu_path_with_the_usual_way_and_the_limit(results):
    doc = load(results, "decode")
    assert {r["key"] for r in doc["rows"]} >= {"usual", "wds", "dali_cpu", "cache", "limit_decode",
                                               "limit_decode_resize"}
    assert {(r["numerator"], r["denominator"]) for r in doc["ratios"]} >= {("dali_cpu", "usual"),
                                                                         ("dali_cpu", "limit_decode")}
    # training batches: the torchreid-style loader against the project's sources, faults beside images/s
    assert {r["key"] for r in doc["rows"]} >= {"torchreid_train", "wds_train", "dali_cpu_train"}
    assert ("wds_train", "torchreid_train") in {(r["numerator"], r["denominator"]) for r in doc["ratios"]}
    assert all(r["minor_faults_per_image"] >= 0 and r["system_ms_per_image"] >= 0 for r in doc["rows"])


def test_flip_normalize_matches_a_per_image_flip_and_normalization():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 8, 5), dtype=torch.uint8, generator=gen)
    make = FlipNormalize(6, (8, 5), seed=11)
    flips = (torch.rand(6, generator=torch.Generator().manual_seed(11)) < 0.5).tolist()
    out = make(images).clone()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(6):
        image = images[i].flip(-1) if flips[i] else images[i]
        torch.testing.assert_close(out[i], (image.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert 0 < sum(flips) < 6  # both branches ran
    assert make(images[:2]).data_ptr() == make.out.data_ptr()  # written into the buffer allocated once


def test_step_times_model_alone_and_full_pipeline_of_both_methods(results):
    doc = load(results, "step")
    rows = {row["key"]: row for row in doc["rows"]}
    for method in ("pass", "mmgl"):
        settings = doc["settings"][method]
        assert settings["flops_per_step"] > 0 and settings["images_per_step"] > 0
        assert settings["variants"][0] == "fp32" and "bf16" in settings["variants"]
        assert {f"{method}_fp32_alone", f"{method}_fp32_full", f"{method}_{settings['variants'][-1]}_full"} <= set(rows)
        assert any(r["numerator"] == f"{method}_fp32_full" and r["denominator"] == f"{method}_fp32_alone"
                   for r in doc["ratios"])
    assert {"cl", "bf16_cl"} <= set(doc["settings"]["mmgl"]["variants"])  # channels-last: convolutions only
    assert doc["settings"]["pass"]["compile_skipped"] == doc["settings"]["mmgl"]["compile_skipped"] == "quick run"
    for row in doc["rows"]:
        seconds_per_step = row["seconds_median"] / row["steps_per_run"]
        assert row["images_per_s"] == pytest.approx(row["items"] / row["seconds_median"], rel=1e-2)
        assert row["model_tflop_per_s"] == pytest.approx(row["flops_per_step"] / seconds_per_step / 1e12, rel=1e-2)
        assert row["pipeline"] in ("alone", "full") and "mfu_percent" not in row  # no MFU without a GPU


def test_e2e_splits_the_step_into_data_path_and_model_and_projects_the_schedule(results):
    from benchmarks.e2e import EPOCHS, LUPERSON_IMAGES

    doc = load(results, "e2e")
    rows = {row["key"]: row for row in doc["rows"]}
    assert set(rows) == {f"{m}_{part}" for m in ("mmgl", "pass") for part in ("data", "model", "step")}
    for method in ("mmgl", "pass"):
        data, model, step = rows[f"{method}_data"], rows[f"{method}_model"], rows[f"{method}_step"]
        # the whole step's wall time holds both timed parts (one timed run in quick mode)
        assert step["seconds_median"] >= data["seconds_median"] + model["seconds_median"] - 1e-3
        assert data["items"] == model["items"] == step["items"]
    mmgl, batch = doc["settings"]["mmgl"], doc["settings"]["pass"]["batch"]
    assert mmgl["train_images"] > 0 and mmgl["steps_per_epoch"] > 0 and mmgl["cache_fill_seconds"] > 0
    assert doc["settings"]["pass"]["stream_images"] > 0
    pass_step = rows["pass_step"]
    seconds_per_step = pass_step["seconds_median"] / pass_step["steps_per_run"]
    assert pass_step["projected_hours"] == pytest.approx(EPOCHS * LUPERSON_IMAGES / batch * seconds_per_step / 3600,
                                                         rel=1e-2)
    mmgl_step = rows["mmgl_step"]
    epoch_hours = mmgl["steps_per_epoch"] * mmgl_step["seconds_median"] / mmgl_step["steps_per_run"] / 3600
    assert mmgl_step["projected_hours"] == pytest.approx(EPOCHS * epoch_hours + mmgl["cache_fill_seconds"] / 3600,
                                                         rel=1e-2)


def test_report_rebuilds_tables_charts_and_readme_from_json(results, capsys):
    machine = results / machine_name()
    for suite in SUITES:
        (machine / f"{suite}.md").unlink()
        (machine / f"{suite}.png").unlink()
    (results / "README.md").unlink()
    capsys.readouterr()
    assert main(["report", "--results", str(results)]) == 0
    printed = capsys.readouterr().out
    readme = (results / "README.md").read_text()
    assert printed.strip() == readme.strip()
    for suite in SUITES:
        assert (machine / f"{suite}.md").is_file() and (machine / f"{suite}.png").is_file()
        assert f"#### {suite}:" in readme and f"{machine_name()}/{suite}.png" in readme


def test_side_by_side_times_rounds_after_warmup():
    calls = []

    def case(name):
        def run():
            calls.append(name)
            return 10
        return run

    measured = side_by_side({"a": case("a"), "b": case("b")}, warmup=1, repeats=3, say=lambda _: None)
    assert calls == ["a", "b"] * 4  # round-robin, warm-up round first
    assert all(len(m.seconds) == 3 and m.items == [10, 10, 10] and m.items_per_s > 0 for m in measured.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--suite", "decode", "--device", "cuda", "--quick", "--results", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_report_rewrites_only_the_readme_results_section(tmp_path):
    from benchmarks.record import README_MARKERS, update_readme

    readme = tmp_path / "README.md"
    begin, end = README_MARKERS
    readme.write_text(f"# Title\n\nintro\n{begin}\nold table\n{end}\n\n## After\n")
    assert update_readme(readme, "| new | table |\n")
    assert readme.read_text() == f"# Title\n\nintro\n{begin}\n| new | table |\n{end}\n\n## After\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    assert not update_readme(plain, "x\n") and plain.read_text() == "no markers here\n"
