"""Host buffers of the sources: reused once the consumer has let go of a batch, never while any
view of it is alive, and the DALI CPU / webdataset sources give the same pixels whether their
consumer keeps every batch (fresh buffers) or drops each one (reused buffers)."""

from __future__ import annotations

import pytest
import torch

from pipelines.sources import make_source
from pipelines.sources.buffers import HostBuffers
from test_sources import H, W, shards  # noqa: F401  (the session fixture)


def test_a_buffer_comes_back_only_when_nothing_uses_it():
    pool = HostBuffers((4, 3), size=2)
    a, b = pool.take(), pool.take()
    assert a.data_ptr() != b.data_ptr() and pool.allocated == 2
    address = a.data_ptr()
    del a
    c = pool.take()
    assert c.data_ptr() == address  # a was dropped: its memory is handed out again
    tail = c[1:]  # a view keeps the memory in use
    del c
    d = pool.take()
    assert d.data_ptr() not in (address, b.data_ptr())
    assert pool.allocated == 2  # the pool keeps at most `size`; d is a fresh, unkept buffer
    del tail


@pytest.mark.parametrize("kind", ["dali", "wds"])
def test_reused_buffers_give_the_pixels_of_fresh_ones(shards, kind):  # noqa: F811
    args = dict(batch_size=24, size=(H, W), device="cpu", shuffle=False, drop_last=False, rank=0, world=1)
    if kind == "wds":
        args["num_workers"] = 2  # uneven worker parts: some batches join two chunks
    kept = [b for b in make_source(shards, "train", source=kind, **args)]  # every batch alive: fresh buffers
    source = make_source(shards, "train", source=kind, **args)
    addresses, copies = set(), []
    for batch in source:  # each batch dropped before the next: the same buffers again
        addresses.add(batch.images.data_ptr())
        copies.append(batch.images.clone())
    assert len(kept) == len(copies) == len(source)
    for a, b in zip(kept, copies):
        assert torch.equal(a.images, b)
    assert len({b.images.data_ptr() for b in kept}) == len(kept)
    if kind == "dali":
        assert len(addresses) <= 2 and source._host.allocated <= 2
