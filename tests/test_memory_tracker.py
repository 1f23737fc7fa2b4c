"""The test utility tests/memory_tracker.py: live bytes of storages made inside the block, each once."""

from __future__ import annotations

import torch

from memory_tracker import LiveBytes


def test_counts_new_storages_once_and_frees_them():
    before = torch.ones(1000)  # made outside: never counted, nor its views
    with LiveBytes() as mem:
        a = torch.empty(256)  # 1 KiB
        v = a.view(16, 16)[2:]  # a view: the same storage, no new bytes
        assert mem.live == 1024
        b = a * 2  # new memory
        assert mem.live == 2048 and mem.peak == 2048
        del a
        assert mem.live == 2048  # the view keeps the storage alive
        del v
        assert mem.live == 1024
        w = before[:10].view(2, 5)
        before.add_(1)  # in place on old memory
        c = before.contiguous()  # returns its input: nothing new
        d = before.view(10, 100).t().contiguous()  # a copy: new
        assert mem.live == 1024 + 4000 and mem.peak == 5024
        del b, d
        assert mem.live == 0
        e = torch.empty(10, dtype=torch.float16)
        del e
    assert mem.peak == 5024 and mem.live == 0
    assert c is before and w.untyped_storage().data_ptr() == before.untyped_storage().data_ptr()


def test_meta_tensors_count_by_size():
    """Shapes only, no memory: how tests size the real SD geometry (data_ptr is 0 on meta)."""
    with LiveBytes() as mem:
        a = torch.empty(10, device="meta")
        b = torch.empty(6, 2, device="meta", dtype=torch.float16)
        c = a.view(2, 5)
        assert mem.live == 40 + 24
        del a, b
        assert mem.live == 40
    assert mem.peak == 64 and c.shape == (2, 5)
