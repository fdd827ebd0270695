"""Two-stream ResNet routing by modality: the ways to send each row through its modality's stem.

    python -m benchmarks.routing [--arch narrow|resnet50] [--batch 32] [--size 144 72] [--repeats 5]

Forward + backward of :class:`models.resnet.TwoStreamResNet` in training mode on a batch half RGB
and half IR (rows mixed), median milliseconds of ``repeats`` runs after one warm-up, side by side:

- ``nonzero``: the former routing, one ``nonzero`` per modality (on a GPU each waits for the device);
- ``argsort + count read``: :meth:`TwoStreamResNet.forward` without ``rgb_count`` (one read);
- ``argsort + known count``: with ``rgb_count`` (nothing read from the device);
- ``both stems + where``: each stem on the whole batch, rows chosen with ``torch.where`` (no
  read, but twice the stem work, and each stem's BatchNorm then normalizes with statistics of
  both modalities: not the two-stream model's training semantics, timed only for the cost).

On a CPU no read waits for anything, so these figures give the compute each way adds; on a GPU
the reads cost a host synchronization each on top (the host stops queueing kernels until the
device has caught up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.resnet import TwoStreamResNet, resnet50_two_stream, resnet_narrow
from shards.format import MODALITY_CODE


def nonzero_routing(model: TwoStreamResNet, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """The former routing (reference for the timing)."""
    subsets = [(name, torch.nonzero(modality == code).squeeze(1)) for name, code in MODALITY_CODE.items()]
    present = [(name, idx) for name, idx in subsets if idx.numel()]
    features = torch.cat([model.stems[name](images[idx]) for name, idx in present])
    order = torch.cat([idx for _, idx in present])
    return model.forward_layers(features[torch.argsort(order)])


def where_routing(model: TwoStreamResNet, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    rgb, ir = model.stems["rgb"](images), model.stems["ir"](images)
    return model.forward_layers(torch.where((modality == MODALITY_CODE["ir"])[:, None, None, None], ir, rgb))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["narrow", "resnet50"], default="narrow")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(144, 72))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = resnet50_two_stream() if args.arch == "resnet50" else resnet_narrow(two_stream=True)
    images = torch.randn(args.batch, 3, *args.size)
    modality = (torch.arange(args.batch) % 2)[torch.randperm(args.batch)]
    half = int((modality == 0).sum())
    ways = {
        "nonzero": lambda: nonzero_routing(model, images, modality),
        "argsort + count read": lambda: model(images, modality),
        "argsort + known count": lambda: model(images, modality, rgb_count=half),
        "both stems + where": lambda: where_routing(model, images, modality),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(1 + args.repeats):
        for name, way in ways.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            way().float().mean().backward()
            if round_:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["nonzero"])
    print(f"{args.arch} two-stream, batch {args.batch}, {args.size[0]}x{args.size[1]}, forward + backward, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        print(f"  {name:24s} {ms:9.1f} ms   {statistics.median(values) / base:5.2f} x nonzero")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
