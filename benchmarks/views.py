"""views: MMGL and PASS views made the usual way vs in batch with Kornia, side by side.

- usual way: per sample, PIL operations in DataLoader workers (one per core), as the AGW
  cross-modal code and PASS / DINO make them (:mod:`benchmarks.pil_views`), collated into
  batches;
- Kornia on the CPU: :class:`pipelines.views.MMGLViews` / :class:`pipelines.views.PASSViews` on
  uint8 batches in memory, torch's intra-op threads on every core;
- Kornia on the GPU (``--device cuda``): the same with the batches and the generator on the GPU.

Both start from the same decoded source images in memory (the train split of the synthetic
set, PIL-decoded and resized to the source size: 288x144 for MMGL, 256x128 for PASS), so the
suite times view making only; decoding is the ``decode`` suite's. The figure is *source*
images per second: an MMGL slot counts its two images (RGB and IR), a PASS image counts once
for its 11 views.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.pil_views import MMGLPilViews, PASSPilViews
from benchmarks.record import SuiteResult
from benchmarks.registry import RunContext
from benchmarks.timing import Case, side_by_side
from pipelines.views import MMGLViews, PASSViews

MMGL_SIZE, PASS_SIZE = (288, 144), (256, 128)

#: Per device and mode: (MMGL slots per batch, MMGL batches per run, PASS images per batch, PASS batches per run).
WORKLOAD = {
    ("cpu", False): (32, 8, 16, 4),
    ("cuda", False): (256, 40, 128, 40),
    ("cpu", True): (4, 1, 2, 1),
    ("cuda", True): (8, 2, 4, 2),
}


def decoded(jpegs: list[bytes], size: tuple[int, int]) -> list[np.ndarray]:
    """PIL decode + bilinear resize to ``size`` (H, W): uint8 ``(H, W, 3)`` arrays."""
    out = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as image:
            out.append(np.array(image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)))
    return out


def stacked(images: list[np.ndarray], count: int, device: torch.device) -> torch.Tensor:
    """``count`` images (cycling through ``images``) as one uint8 ``(count, 3, H, W)`` tensor."""
    picked = np.stack([images[i % len(images)] for i in range(count)])
    return torch.from_numpy(picked).permute(0, 3, 1, 2).contiguous().to(device)


def per_sample(dataset, *, batch: int, workers: int, images_per_item: int) -> Case:
    """The usual way: a DataLoader over ``dataset``, collating view batches; source images."""
    def case() -> int:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                            persistent_workers=False)
        return sum(len(views[0]) for views in loader) * images_per_item
    return case


def mmgl_batched(views: MMGLViews, rgb: torch.Tensor, ir: torch.Tensor, batch: int, device: torch.device) -> Case:
    generator = torch.Generator(device).manual_seed(0)

    def case() -> int:
        for start in range(0, len(rgb), batch):
            views(rgb[start:start + batch], ir[start:start + batch], generator)
        return 2 * len(rgb)
    return case


def pass_batched(views: PASSViews, images: torch.Tensor, batch: int, device: torch.device) -> Case:
    generator = torch.Generator(device).manual_seed(0)

    def case() -> int:
        for start in range(0, len(images), batch):
            views(images[start:start + batch], generator)
        return len(images)
    return case


def run(ctx: RunContext) -> SuiteResult:
    device = torch.device(ctx.device)
    records = ctx.data.train_records
    rgb_jpegs = [r.jpeg for r in records if r.modality == "rgb"]
    ir_jpegs = [r.jpeg for r in records if r.modality == "ir"]
    mmgl_batch, mmgl_batches, pass_batch, pass_batches = WORKLOAD[(device.type, ctx.quick)]
    slots, pass_images = mmgl_batch * mmgl_batches, pass_batch * pass_batches
    workers = ctx.cores

    rgb, ir = decoded(rgb_jpegs, MMGL_SIZE), decoded(ir_jpegs, MMGL_SIZE)
    people = decoded(rgb_jpegs + ir_jpegs, PASS_SIZE)
    cases = {
        "mmgl_usual": per_sample(MMGLPilViews(rgb, ir, slots), batch=mmgl_batch, workers=workers, images_per_item=2),
        "mmgl_kornia": mmgl_batched(MMGLViews(size=MMGL_SIZE), stacked(rgb, slots, device), stacked(ir, slots, device),
                                    mmgl_batch, device),
        "pass_usual": per_sample(PASSPilViews(people, pass_images), batch=pass_batch, workers=workers,
                                 images_per_item=1),
        "pass_kornia": pass_batched(PASSViews(), stacked(people, pass_images, device), pass_batch, device),
    }
    measured = side_by_side(cases, warmup=ctx.warmup, repeats=ctx.repeats, device=device, say=ctx.say)

    where = "GPU" if device.type == "cuda" else "CPU"
    result = SuiteResult(
        suite="views",
        title=f"MMGL and PASS views, per-sample PIL vs batched Kornia on {where}",
        primary="images_per_s",
        columns=[("images_per_s", "source images/s"), ("cpu_ms_per_image", "CPU ms/image"),
                 ("images_per_cpu_s", "images per CPU-second")],
        settings={**ctx.base_settings(), "mmgl_size": list(MMGL_SIZE), "pass_source_size": list(PASS_SIZE),
                  "mmgl_slots_per_batch": mmgl_batch, "mmgl_slots_per_run": slots,
                  "pass_images_per_batch": pass_batch, "pass_images_per_run": pass_images,
                  "dataloader_workers": workers, "torch_threads": torch.get_num_threads()},
    )
    result.add_row("mmgl_usual", "MMGL, usual way (PIL per sample, DataLoader workers)", measured["mmgl_usual"])
    result.add_row("mmgl_kornia", f"MMGL, Kornia in batch on {where}", measured["mmgl_kornia"])
    result.add_row("pass_usual", "PASS, usual way (PIL per sample, DataLoader workers)", measured["pass_usual"])
    result.add_row("pass_kornia", f"PASS, Kornia in batch on {where}", measured["pass_kornia"])
    result.add_ratio(f"MMGL: Kornia {where} / usual way", "mmgl_kornia", "mmgl_usual")
    result.add_ratio(f"PASS: Kornia {where} / usual way", "pass_kornia", "pass_usual")
    result.add_ratio(f"MMGL: Kornia {where} / usual way", "mmgl_kornia", "mmgl_usual", metric="images_per_cpu_s")
    result.add_ratio(f"PASS: Kornia {where} / usual way", "pass_kornia", "pass_usual", metric="images_per_cpu_s")
    result.notes += [
        "Source images/s: an MMGL slot (one RGB + one IR image, 2 views) counts 2; a PASS image "
        "(2 global + 9 local views) counts 1. Decoding is not included (see the decode suite).",
        "Each run of the usual way starts and ends its DataLoader workers (their CPU time is counted).",
    ]
    return result


__all__ = ["run"]
