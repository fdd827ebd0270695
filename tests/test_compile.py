"""torch.compile of the methods' training forward: the graphs of the first step are reused by
every later step (no recompilation on the 2nd or the 10th step), read from dynamo's own counter
(a CompileCounter backend counts the frames dynamo hands to the backend), on tiny models, CPU,
bf16 autocast as in the presets. The GPU twin (inductor, CUDA) is in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from pipelines.batch import Batch
from train.methods.base import Progress
from train.methods.mmgl import MMGL, mmgl_tiny
from train.methods.pass_method import PASS, pass_tiny

STEPS = 10


def random_batch(n: int, size: tuple[int, int], seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=gen)
    modality = torch.cat([torch.zeros(n // 2), torch.ones(n - n // 2)]).long()  # RGB half, IR half
    minus = torch.full((n,), -1)
    return Batch(images, minus, minus, modality, torch.arange(n))


def frames_per_step(method, batch_size: int) -> list[int]:
    """Frames compiled after each of STEPS forward/backward/optimizer steps."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model = torch.compile(method, backend=counter)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    size = method.data_spec().size
    frames = []
    for step in range(STEPS):
        progress = Progress(step, 2 * STEPS, 0, STEPS)
        views = method.make_views(random_batch(batch_size, size, step), torch.Generator().manual_seed(step))
        method.on_step_start(progress)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(views)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(progress)
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    return frames


@pytest.mark.parametrize("name", ["pass", "mmgl"])
def test_second_and_tenth_step_reuse_the_first_steps_graphs(name):
    torch.manual_seed(0)
    method = PASS(pass_tiny().method_config) if name == "pass" else MMGL(mmgl_tiny().method_config)
    frames = frames_per_step(method, 4)
    assert frames[0] >= 1
    assert frames[1] == frames[0] and frames[9] == frames[0], f"recompiled: frames after each step {frames}"
    if name == "pass":  # the center update runs outside the graphs (DINOLoss._move_centers), but runs
        assert torch.count_nonzero(method.loss.center) > 0
