"""Every CUDA path, against its CPU counterpart or an independent reference. All ``gpu``-marked
and skipped without CUDA; ``make gpu-check`` runs them (with the DALI decode and device-cache
test in tests/test_sources.py and the views test in tests/test_views.py).

- views made on CUDA equal the views made on the CPU from the same random draws;
- a bf16 step of each method at full model size gives a finite loss close to float32's;
- both methods compiled with inductor on CUDA do not recompile on the 2nd or 10th step;
- the two-stream routing with a known RGB count and the MMGL forward never synchronize;
- the DINO loss on CUDA matches a float64 CPU reference and needs less memory than the plain form;
- the webdataset source joins batches into page-locked memory before its non-blocking copy.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.dino_memory import plain_terms
from models.resnet import resnet_tiny_test
from pipelines.sources import make_source
from pipelines.views import MMGLViews, PASSViews
from pipelines.views.finetune import FinetuneViews
from shards.build import build
from train.losses.dino import ViewCrossEntropy
from train.methods.base import Progress
from train.methods.mmgl import MMGL, mmgl_sysu, mmgl_tiny
from train.methods.pass_method import PASS, pass_tiny, pass_vits_lup

from test_compile import STEPS, random_batch
from test_sources import H, W, make_sysu_tree

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_views_on_cuda_match_views_on_the_cpu_from_the_same_draws():
    rgb, ir, person = images(4, 288, 144, 1), images(4, 288, 144, 2), images(4, 256, 128, 3)
    makers = {
        "mmgl": lambda x, g: MMGLViews()(x[0], x[1], generator=g),
        "pass": lambda x, g: PASSViews()(x[2], generator=g),
        "finetune": lambda x, g: FinetuneViews(size=(256, 128))(x[2], generator=g),
    }
    for name, make in makers.items():
        cpu = make((rgb, ir, person), torch.Generator().manual_seed(7))  # draws on the CPU generator,
        gpu = make((rgb.cuda(), ir.cuda(), person.cuda()), torch.Generator().manual_seed(7))  # moved
        pairs = ([(cpu.rgb, gpu.rgb), (cpu.ir, gpu.ir), (cpu.perm, gpu.perm)] if name == "mmgl" else
                 [(cpu.global_views, gpu.global_views), (cpu.local_views, gpu.local_views)] if name == "pass" else
                 [(cpu, gpu)])
        for a, b in pairs:
            assert b.is_cuda
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=2e-3, msg=lambda m: f"{name}: {m}")


def one_step_loss(method, batch, bf16: bool) -> torch.Tensor:
    torch.manual_seed(0)
    views = method.make_views(batch, torch.Generator(device=CUDA).manual_seed(0))
    method.on_step_start(Progress(20, 40, 2, 10))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = method(views)
    out.loss.backward()
    return out.loss.detach().float()


@pytest.mark.parametrize("name", ["pass", "mmgl"])
def test_a_bf16_step_at_full_model_size_is_finite_and_close_to_float32(name):
    torch.manual_seed(0)
    if name == "pass":
        method, batch = PASS(pass_vits_lup().method_config).to(CUDA), random_batch(8, (256, 128), 1)
    else:
        method, batch = MMGL(mmgl_sysu().method_config).to(CUDA), random_batch(16, (288, 144), 1)
    batch = batch.to(CUDA)
    if name == "mmgl":  # as the preset runs it
        method.to(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    full = one_step_loss(method, batch, bf16=False)
    method.load_state_dict(state)
    method.zero_grad(set_to_none=True)
    half = one_step_loss(method, batch, bf16=True)
    assert torch.isfinite(half) and torch.isfinite(full)
    assert abs(half - full) <= 0.05 * abs(full) + 1e-3
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["pass", "mmgl"])
def test_inductor_on_cuda_reuses_the_first_steps_graphs(name):
    torch.manual_seed(0)
    torch._dynamo.reset()
    method = (PASS(pass_tiny().method_config) if name == "pass" else MMGL(mmgl_tiny().method_config)).to(CUDA)
    counter = CompileCounterWithBackend("inductor")
    model = torch.compile(method, backend=counter)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    frames = []
    for step in range(STEPS):
        progress = Progress(step, 2 * STEPS, 0, STEPS)
        views = method.make_views(random_batch(8, method.data_spec().size, step).to(CUDA),
                                  torch.Generator(device=CUDA).manual_seed(step))
        method.on_step_start(progress)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(views)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(progress)
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    assert torch.isfinite(out.loss)
    assert frames[1] == frames[0] and frames[-1] == frames[0], f"recompiled: {frames}"


def test_routing_with_a_known_count_and_the_mmgl_forward_never_synchronize():
    torch.manual_seed(0)
    model = resnet_tiny_test(two_stream=True).to(CUDA)
    x = torch.randn(8, 3, 64, 32, device=CUDA)
    modality = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], device=CUDA)
    method = MMGL(mmgl_tiny().method_config).to(CUDA)
    views = method.make_views(random_batch(8, method.data_spec().size, 0).to(CUDA), torch.Generator(device=CUDA))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x, modality, rgb_count=4).sum().backward()
        method(views).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dino_terms_on_cuda_match_float64_and_need_less_memory_than_the_plain_form():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(11, 64, 65536, generator=gen)
    targets = F.softmax(torch.randn(2, 64, 65536, generator=gen) / 0.04, dim=-1)
    peaks = {}
    for name, terms in (("plain", plain_terms), ("per_view", lambda s, t: ViewCrossEntropy.apply(s, t, 0.1))):
        s = student.cuda().bfloat16().requires_grad_(True)
        t = targets.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = terms(s, t)
        out.sum().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        torch.testing.assert_close(out.double().cpu(), plain_terms(s.detach().double().cpu(), targets.double()),
                                   rtol=1e-4, atol=1e-3)
        del s, out
    assert peaks["per_view"] < 0.6 * peaks["plain"], peaks


def test_webdataset_joins_into_page_locked_memory(tmp_path):
    build("sysu-mm01", make_sysu_tree(tmp_path / "raw"), tmp_path / "shards", shard_size=40, workers=1)
    source = make_source(tmp_path / "shards", "train", source="wds", device="cuda", batch_size=16, size=(H, W),
                         num_workers=0, rank=0, world=1)
    chunks = [torch.zeros(10, 3, H, W, dtype=torch.uint8), torch.ones(10, 3, H, W, dtype=torch.uint8)]
    joined = source._join(chunks, 16)
    assert joined.is_pinned() and joined.shape == (16, 3, H, W)
    assert joined[:10].eq(0).all() and joined[10:].eq(1).all()
    batch = next(iter(source))
    assert batch.images.is_cuda and batch.images.shape == (16, 3, H, W)
