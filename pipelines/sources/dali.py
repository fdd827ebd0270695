"""NVIDIA DALI source: ``fn.readers.webdataset`` over a split's shards, decode and resize on the
GPU (``mixed``) when CUDA is there, on the CPU (``device_id=None``) otherwise.

Where the CPU path resizes
--------------------------
On a GPU, DALI decodes (nvJPEG) and resizes (``fn.resize``) in the pipeline. On the CPU, DALI
only reads and decodes; the resize is done by torch (uint8 bilinear, antialiased when shrinking:
:func:`resize_into`), one image at a time, in the thread that iterates the source, while DALI's
threads decode the next batches. Why: DALI's CPU ``fn.resize`` costs ~0.4 ms of CPU per person
crop (to 288x144), four times its JPEG decode (~0.1 ms) and four times torch's uint8 resize
(~0.1 ms); ``antialias=False``, ``INTERP_TRIANGULAR``, ``dtype=UINT8``, ``fn.warp_affine``, other
thread counts and batch sizes and the legacy executor all stayed at 0.35 ms or more
(``python -m benchmarks run --suite decode`` compares the result with the usual way and the
decode limit). Torch's uint8 kernel also follows PIL's resampling, so the CPU path's pixels
stay within 1 of the webdataset/PIL path's (DALI's resize differed by up to 3). While it
resizes, torch's intra-op threads are held at one: a small resize split over a thread pool that
DALI's threads also need was 10-20x slower on 2 cores. The resizing thread then caps the
CPU path at roughly 1 / (torch resize time) images/s (~9,000/s on one core here), so DALI gets
one thread fewer than the cores by default.

Pixels and streams on the GPU
-----------------------------
The ``mixed`` decoder runs with ``jpeg_fancy_upsampling=True``: "use the same chroma upsampling
approach as the ``cpu`` one" (DALI's ``fn.decoders.image`` documentation), i.e. libjpeg-turbo's
fancy (triangular) upsampling of 4:2:0 chroma, which PIL and DALI's CPU decoder use. Without it
nvJPEG replicates chroma samples and the GPU pixels differ from the CPU/PIL ones by several levels
on colour edges. Outputs are asked for on torch's current stream (``pipe.run(stream)``: DALI's
executor makes them ready in that stream's order instead of synchronizing the host), copied on
that same stream into a torch tensor (``feed_ndarray``, as DALI's own PyTorch iterator does), and
the DALI output objects are kept until the copy that reads them has finished (a CUDA event checked
before they are dropped), so DALI never recycles a buffer the copy still reads.

CPU buffers
-----------
On the CPU the batch is resized into a buffer of :class:`pipelines.sources.buffers.HostBuffers`:
reused once the consumer has dropped the previous batches, so an epoch allocates no large buffer
per batch (see that module for the page faults this avoids).

One DALI pipeline per epoch
---------------------------
Each epoch builds a fresh pipeline whose reader gets the split's tar files in that epoch's
shard order (:func:`pipelines.sources.base.shard_order`), ``shard_id=rank``,
``num_shards=world``, ``stick_to_shard=True`` (a rank never reads another rank's part) and, with
``shuffle``, ``random_shuffle=True`` with a buffer of ``shuffle_buffer`` samples seeded from
``(seed, epoch, rank)``. The reader's first ``n_rank`` samples are then exactly the rank's part,
in a shuffled order (checked by the tests), and the source stops after
``batches_per_epoch`` batches (the rule in :mod:`pipelines.sources.base`). Building a pipeline
with index files takes milliseconds, and it makes the stream a pure function of
``(seed, epoch, rank, world, batch)``: that is what resuming relies on. A resumed epoch rebuilds
its pipeline and runs (decodes) the consumed batches again without yielding them -- at most one
epoch of decode, seconds for a ReID training set on a GPU. (DALI's own checkpointing would avoid
that, but it has to be kept in lockstep with the prefetch queue; replaying is simpler and exact.)

Damaged shards
--------------
DALI can crash the whole process (exit 139) on some damaged JPEG streams, so it must never see
one. Two guarantees protect it: the builder stores only JPEGs whose structure DALI's parser
accepts (:mod:`shards.jpeg`), and :func:`pipelines.sources.base.open_split` hands over only
tars whose every byte matches the manifest's sha256 (:mod:`pipelines.integrity`); a damaged tar
is a :class:`UserError` naming it, or, with ``skip_damaged``, is left out and counted. A DALI
error that still happens (a file changed while training runs) is turned into a
:class:`UserError` by :meth:`DaliSource._diagnose`, which names the shard(s) whose sha256 now
differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from pipelines.sources.buffers import HostBuffers
from pipelines.sources.base import (
    VERIFY_HINT,
    Source,
    SplitShards,
    batches_per_epoch,
    default_workers,
    labels_to_batch,
    rank_range,
    seed_of,
    shard_order,
)
from common.errors import UserError
from pipelines.sources.canvas import place_on_canvas

#: Hash the shards to name the damaged ones only below this many bytes (larger: name them all).
DIAGNOSE_HASH_LIMIT = 64 << 30


@contextmanager
def single_intra_op_thread():
    """Hold torch's intra-op thread count at 1 inside the block (see the module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resize_into(out: torch.Tensor, image: np.ndarray) -> None:
    """Resize one decoded uint8 ``(h, w, 3)`` image into ``out`` uint8 ``(3, H, W)``: bilinear,
    antialiased when shrinking (PIL's resampling); a plain copy when the size already matches."""
    x = torch.from_numpy(image).permute(2, 0, 1)  # a channels-last view: torch's fast uint8 path
    if tuple(x.shape[1:]) != tuple(out.shape[1:]):
        x = F.interpolate(x[None], size=tuple(out.shape[1:]), mode="bilinear", antialias=True, align_corners=False)[0]
    out.copy_(x)


def canvas_graph(jpegs, images, size: tuple[int, int]):
    """The ``canvas`` fit step inside a DALI pipeline (:mod:`pipelines.sources.canvas`): decoded
    HWC ``images`` -> ``(canvas HWC uint8 of size, valid int32 (2,) per sample)``.

    The size rule is :func:`pipelines.sources.canvas.fitted_size`, computed from the encoded
    image's shape (``fn.peek_image_shape``) with DALI's arithmetic; the resize gets that integer
    size (bilinear, antialiased), then ``fn.crop`` with ``out_of_bounds_policy="pad"`` at
    position (0, 0) pads the right and bottom with zeros up to the canvas.
    """
    from nvidia.dali import fn, math as dmath, types

    canvas_h, canvas_w = size
    shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.FLOAT)  # (h, w, c)
    h, w = shape[0], shape[1]
    scale = dmath.min(dmath.min(canvas_h / h, canvas_w / w), 1.0)
    vh = dmath.max(dmath.floor(h * scale + 0.5), 1.0)
    vw = dmath.max(dmath.floor(w * scale + 0.5), 1.0)
    images = fn.resize(images, resize_y=vh, resize_x=vw, interp_type=types.INTERP_LINEAR, antialias=True)
    images = fn.crop(images, crop_h=canvas_h, crop_w=canvas_w, crop_pos_x=0.0, crop_pos_y=0.0,
                     out_of_bounds_policy="pad", fill_values=0)
    valid = fn.cast(fn.stack(vh, vw), dtype=types.INT32)
    return images, valid


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


class DaliSource(Source):
    """Batches of a split decoded by DALI.

    size:            ``(H, W)`` every image is resized to (bilinear, antialiased when shrinking)
    device:          ``cuda[:i]`` decodes with nvJPEG (``mixed``) and resizes on that GPU;
                     ``cpu`` decodes with DALI's CPU decoder on ``num_threads`` threads (default:
                     the cores but one) and resizes with torch (module docstring)
    shuffle:         shard order per epoch + a ``shuffle_buffer``-sample shuffle buffer
    prefetch:        DALI ``prefetch_queue_depth`` (batches prepared ahead)
    drop_last:       the epoch-length rule of :mod:`pipelines.sources.base`
    fit:             ``resize`` to ``size``, or ``canvas``: keep the source resolution and aspect
                     ratio on a ``size`` canvas, with the valid size per image
                     (:mod:`pipelines.sources.canvas`; on a GPU :func:`canvas_graph`)
    """

    backend = "dali"

    def __init__(
        self,
        split: SplitShards,
        *,
        batch_size: int,
        size: tuple[int, int],
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
        shuffle_buffer: int = 1024,
        prefetch: int = 2,
        num_threads: int | None = None,
        fit: str = "resize",
    ):
        if not dali_available():
            raise UserError("the DALI source needs nvidia-dali (pip install -e '.[dali]', or '.[dali-cuda13]' "
                            "with torch for CUDA 13); use --source wds")
        super().__init__(batch_size=batch_size, seed=seed, rank=rank, world=world, drop_last=drop_last, device=device)
        self._leave_out_damaged(split)  # open_split already took them out of split.shards
        self.split = split
        self.size = (int(size[0]), int(size[1]))
        self.fit = fit
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.prefetch = max(1, int(prefetch))
        gpu = self.device.type == "cuda"
        # On the CPU the iterating thread resizes: leave it a core (module docstring).
        self.num_threads = num_threads or (default_workers() if gpu else max(1, default_workers() - 1))
        self.total = split.total
        lo, hi = rank_range(self.total, rank, world)
        self.rank_samples = hi - lo
        self._len = batches_per_epoch(self.total, rank, world, self.batch_size, drop_last)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device} was asked for but CUDA is not available")
        self._host = HostBuffers((self.batch_size, 3, *self.size))
        self._in_flight: tuple | None = None  # (DALI outputs, event after the copy that reads them)

    def __len__(self) -> int:
        return self._len

    # -- the pipeline -------------------------------------------------------------------------
    def _pipeline(self, epoch: int):
        from nvidia.dali import Pipeline, fn, types

        order = shard_order(len(self.split.shards), self.seed, epoch, self.shuffle)
        shards = [self.split.shards[i] for i in order]
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=seed_of(self.seed, epoch, self.rank, 1),
            prefetch_queue_depth=self.prefetch,
        )
        with pipe:
            jpegs, labels = fn.readers.webdataset(
                paths=[str(s.path) for s in shards],
                index_paths=[str(s.index) for s in shards],
                ext=["jpg", "lbl"],
                dtypes=[types.UINT8, types.INT32],
                missing_component_behavior="error",
                random_shuffle=self.shuffle,
                initial_fill=min(self.shuffle_buffer, max(1, self.rank_samples)),
                seed=seed_of(self.seed, epoch, self.rank, 2),
                shard_id=self.rank,
                num_shards=self.world,
                stick_to_shard=True,
                prefetch_queue_depth=self.prefetch,
                name="reader",
            )
            # fancy upsampling: the GPU's chroma upsampling made libjpeg-turbo's (module docstring)
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       jpeg_fancy_upsampling=gpu)
            if gpu and self.fit == "canvas":
                images, valid = canvas_graph(jpegs, images, self.size)
                labels = fn.cat(labels, valid, axis=0)  # labels_to_batch reads columns 4, 5
                images = fn.transpose(images, perm=[2, 0, 1])
            elif gpu:  # on the CPU, torch resizes after the pipeline (module docstring)
                h, w = self.size
                images = fn.resize(images, resize_y=h, resize_x=w, interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.transpose(images, perm=[2, 0, 1])
            pipe.set_outputs(images, labels)
        pipe.build()
        return pipe

    def _run(self, pipe):
        """The next outputs; on a GPU bound to torch's current stream (module docstring)."""
        if self.device.type == "cuda":
            return pipe.run(torch.cuda.current_stream(self.device))
        return pipe.run()

    def _to_batch(self, images, labels, take: int) -> Batch:
        lab = torch.from_dlpack(labels.as_tensor())[:take]
        if self.device.type == "cuda":
            return labels_to_batch(self._copy_to_device(images, labels)[:take], lab.clone(), self.device)
        out = self._host.take()[:take]
        with single_intra_op_thread():
            if self.fit == "canvas":
                valid = torch.tensor([place_on_canvas(out[i], np.asarray(images[i])) for i in range(take)],
                                     dtype=torch.int32).view(take, 2)
                lab = torch.cat([lab, valid], dim=1)
            else:
                for i in range(take):
                    resize_into(out[i], np.asarray(images[i]))
        return labels_to_batch(out, lab, self.device)  # int32 -> int64 copies the labels

    def _copy_to_device(self, images, labels) -> torch.Tensor:
        """DALI's GPU batch copied, on torch's current stream, into a new device tensor; the
        outputs stay referenced until that copy has finished (module docstring)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        stream = torch.cuda.current_stream(self.device)
        out = torch.empty((self.batch_size, 3, *self.size), dtype=torch.uint8, device=self.device)
        feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        self._release_in_flight()
        self._in_flight = (images, labels, done)
        return out

    def _release_in_flight(self) -> None:
        """Drop the previous batch's DALI outputs once the copy reading them has finished (by
        then it has, a step later; the wait only bounds how far the host runs ahead)."""
        if self._in_flight is not None:
            self._in_flight[-1].synchronize()
            self._in_flight = None

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        try:
            pipe = self._pipeline(epoch)
        except RuntimeError as err:
            raise self._diagnose(err) from None
        try:
            for i in range(self._len):
                try:
                    images, labels = self._run(pipe)
                except RuntimeError as err:
                    raise self._diagnose(err) from None
                if i < skip:
                    continue
                take = self.batch_size
                if not self.drop_last and i == self._len - 1:
                    take = self.rank_samples - i * self.batch_size
                yield self._to_batch(images, labels, take)
        finally:
            self._release_in_flight()
            del pipe

    def _diagnose(self, err: Exception) -> UserError:
        """A UserError naming the shard(s) that differ from the manifest, for a DALI failure."""
        folder = self.split.folder
        hint = VERIFY_HINT.format(folder=folder)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        bad = []
        for s in self.split.shards:
            if not s.path.is_file() or s.path.stat().st_size != s.bytes:
                bad.append(s)
        if not bad and sum(s.bytes for s in self.split.shards) <= DIAGNOSE_HASH_LIMIT:
            for s in self.split.shards:
                digest = hashlib.sha256()
                with open(s.path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                if digest.hexdigest() != s.sha256:
                    bad.append(s)
        if bad:
            names = ", ".join(str(s.path) for s in bad)
            return UserError(f"DALI could not read split {self.split.split!r}: damaged shard(s) {names} "
                             f"(contents differ from the manifest); {hint}")
        return UserError(
            f"DALI failed reading split {self.split.split!r} of {folder} ({first_line}); every shard "
            f"matches its manifest checksum, so an image inside may be undecodable; {hint}"
        )


__all__ = ["DaliSource", "canvas_graph", "dali_available"]
