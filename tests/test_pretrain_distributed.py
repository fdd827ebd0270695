"""Two processes on the CPU (gloo) give the same centers and gradients as one process on the same
global batch; the pre-training loop runs on two processes.

Launching: accelerate 1.15's ``accelerate launch --cpu --num_processes 2`` starts ONE process
(its multi-CPU path needs mpirun); ``accelerate launch --multi_gpu --num_processes 2`` on a
machine without CUDA starts two processes (torchrun) that train on the CPU with gloo. The tests
check the world size they got.

This file is also the driver script: run as a script it takes one PASS step on a fixed global
batch of 2 x 4 images (each process its half, the views cut once for the whole batch so that
both set-ups see the same crops) and saves the centers, the gradients (after DDP's all-reduce)
and the loss averaged over processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


def one_step(out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from pipelines.batch import Batch
    from pipelines.views import PASSViewBatch
    from train.methods.base import Progress
    from train.methods.pass_method import PASS, pass_tiny

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(0)
    method = PASS(dataclasses.replace(pass_tiny().method_config, drop_path=0.0))  # no random drop paths
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 64, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    minus = torch.full((GLOBAL_BATCH,), -1)
    views = method.make_views(Batch(images, minus, minus, minus, torch.arange(GLOBAL_BATCH)),
                              torch.Generator().manual_seed(2))
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    mine = PASSViewBatch(views.global_views.unflatten(0, (2, GLOBAL_BATCH))[:, part].flatten(0, 1),
                         views.local_views.unflatten(0, (9, GLOBAL_BATCH))[:, part].flatten(0, 1),
                         views.local_region)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.0)
    model, optimizer = accelerator.prepare(method, optimizer)
    with torch.no_grad():  # non-zero centers, the same on every process
        method.loss.center.copy_(torch.linspace(-0.5, 0.5, method.loss.center.numel()).view_as(method.loss.center))
    method.on_step_start(Progress(step=0, total_steps=10, epoch=1, steps_per_epoch=5))
    result = model(mine)
    accelerator.backward(result.loss)
    loss = accelerator.reduce(result.loss.detach(), reduction="mean")
    if accelerator.is_main_process:
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        torch.save({"world": world, "center": method.loss.center.clone(), "grads": grads, "loss": loss}, out)
    # leave together and take the gloo group down before exit: a rank that exits with the group
    # alive can abort in its teardown ("terminate called without an active exception")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def launch(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


ACCELERATE_2CPU = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    processes = [launch(__file__, str(one), env=env), launch(*ACCELERATE_2CPU, __file__, str(two), env=env)]
    for process in processes:
        finish(process)
    single, double = torch.load(one), torch.load(two)
    assert (single["world"], double["world"]) == (1, 2)
    assert torch.count_nonzero(single["center"] - torch.linspace(-0.5, 0.5, single["center"].numel()).view_as(
        single["center"])) > 0  # the centers moved
    torch.testing.assert_close(double["center"], single["center"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(double["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    assert double["grads"].keys() == single["grads"].keys()
    assert any(k.endswith("last_layer.weight_v") for k in single["grads"])
    for name, grad in single["grads"].items():
        torch.testing.assert_close(double["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pass_tiny_data import tiny_shards

    return tiny_shards(tmp_path_factory)


def test_the_loop_runs_on_two_processes_and_checkpoints(shards, tmp_path):
    from pass_tiny_data import tiny_args
    from train.checkpointing import list_checkpoints, load_model_state

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    # 48 images, 2 processes x 4: 6 steps per epoch, as one process with batch 8
    args = tiny_args(shards, run, "--batch_size", "4", "--max_steps", "2", "--log_every", "1")
    finish(launch(*ACCELERATE_2CPU, "-m", "train.pretrain", *args, env=env))
    (checkpoint,) = list_checkpoints(run / "checkpoints")
    assert checkpoint.name == "step_00000002"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not any(k.startswith("module.") for k in load_model_state(checkpoint))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world"] == 2


if __name__ == "__main__":
    one_step(Path(sys.argv[1]))
