"""How shards are split per rank, under a real 2-process launch (``accelerate launch``, gloo on the
CPU): each process reads its own part of every epoch, the parts are disjoint and cover the split,
and each equals what the source gives for that rank in one process (the rule of
:mod:`pipelines.sources.base`, as a multi-node launch applies it with rank = machine_rank x
processes per machine + local rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pass_tiny_data import tiny_shards
from pipelines.sources import make_source
from shards.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--machine_rank", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
SETTINGS = dict(batch_size=4, size=(64, 32), device="cpu", source="wds", num_workers=0, seed=3, drop_last=False)

DRIVER = """
import json, sys
from accelerate import Accelerator
from pipelines.sources import make_source
shards, out = sys.argv[1:]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
settings = json.loads(%r)
source = make_source(shards, "train", rank=rank, world=world, **settings)
epochs = [[int(i) for batch in source for i in batch.index.tolist()] for _ in range(2)]
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": world, "epochs": epochs}, f)
accelerator.wait_for_everyone()
accelerator.end_training()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory)


def one_process(shards: Path, rank: int) -> list[list[int]]:
    source = make_source(shards, "train", rank=rank, world=2, **SETTINGS)
    return [[int(i) for batch in source for i in batch.index.tolist()] for _ in range(2)]


def test_two_launched_processes_split_every_epoch(shards, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER % json.dumps(SETTINGS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, *LAUNCH, str(driver), str(shards), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    parts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [p["world"] for p in parts] == [2, 2]
    total = load_manifest(shards).splits["train"].total.images
    for epoch in range(2):
        a, b = (set(p["epochs"][epoch]) for p in parts)
        assert not a & b and a | b == set(range(total))  # disjoint, covering
        assert abs(len(a) - len(b)) <= SETTINGS["batch_size"]
    assert parts[0]["epochs"][0] != parts[0]["epochs"][1]  # every epoch reshuffles
    for rank, part in enumerate(parts):
        assert part["epochs"] == one_process(shards, rank)  # the same rule in one process
