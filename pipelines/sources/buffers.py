"""Host buffers for the sources' batches: reused on the CPU, pinned when the batch goes to a GPU.

Why reuse: a training batch of 64 images at 256x128 is a 6 MiB uint8 tensor; allocated fresh per
batch, glibc gives such blocks back to the kernel when they are freed (they are above its mmap
threshold) and the next batch faults the same pages in again: hundreds of thousands of minor page
faults and up to a second of system time per epoch, and epochs whose speed swings with the
machine's load (measured with the decode suite's fault and system-time columns; tuning glibc with
``MALLOC_MMAP_THRESHOLD_`` hides it, but a library cannot rely on its users' environment).

:class:`HostBuffers` keeps a few buffers of one shape and hands one out again only when nothing
outside the pool still uses its memory (no batch, view or slice of it is alive: the storage's use
count is back to what it was when the pool alone held it). A consumer that keeps every batch (a
test collecting an epoch) therefore gets fresh buffers, and a training loop that drops each batch
before asking for the next gets the same two or three buffers over and over. Nothing about the
contract of :class:`pipelines.batch.Batch` changes.

Pinned: a buffer whose contents go to a GPU with ``.to(cuda, non_blocking=True)`` must be in
page-locked memory, or the copy is synchronous (the host waits for it). Pinned buffers come from
PyTorch's caching host allocator, which itself reuses a block only once the copies that read it
have finished (it records the copy's stream), so for them the pool adds nothing and is not used:
:func:`pinned_empty` allocates from that cache.
"""

from __future__ import annotations

import torch

#: Buffers kept per pool; more in use at once are allocated fresh (and not kept).
POOL_SIZE = 4


def _use_count(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (its storage's reference count)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class HostBuffers:
    """Reusable CPU buffers of ``shape`` and ``dtype`` (module docstring).

    ``take()`` returns a buffer no one else uses, allocating one when all are in use. The caller
    fills it and hands it (or views of it) on; once those are gone it can come back. What
    ``take()`` returns is always a view (a tensor of its own sharing the pool's memory), so that
    holding it is what keeps the memory from being handed out again.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8, size: int = POOL_SIZE) -> None:
        self.shape, self.dtype, self.size = tuple(int(s) for s in shape), dtype, size
        self._buffers: list[tuple[torch.Tensor, int]] = []  # buffer, its use count when free

    def take(self) -> torch.Tensor:
        for buffer, idle in self._buffers:
            if _use_count(buffer) == idle:
                return buffer.view(self.shape)
        buffer = torch.empty(self.shape, dtype=self.dtype)
        if len(self._buffers) < self.size:
            self._buffers.append((buffer, _use_count(buffer)))
        return buffer.view(self.shape)

    @property
    def allocated(self) -> int:
        """Buffers the pool keeps (for tests and reports)."""
        return len(self._buffers)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialized page-locked CPU tensor from PyTorch's caching host allocator (module
    docstring); a plain one where CUDA is not available (nothing to pin for)."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


__all__ = ["HostBuffers", "POOL_SIZE", "pinned_empty"]
