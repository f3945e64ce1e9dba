"""``BufferPool``: a pooled buffer is reused only once nothing else refers to it."""

from __future__ import annotations

from nbdserve.buffers import BufferPool


def test_an_idle_buffer_is_reused():
    pool = BufferPool(min_size=1)
    a = pool.get(4096)
    a_id = id(a)
    del a
    assert id(pool.get(4096)) == a_id


def test_a_buffer_still_referenced_is_not_handed_out_again():
    pool = BufferPool(min_size=1)
    a = pool.get(4096)
    a_id = id(a)
    in_flight = memoryview(a)[16:]  # what a transport keeps until the bytes are sent
    del a
    b = pool.get(4096)
    assert id(b) != a_id
    del b
    assert id(pool.get(4096)) != a_id  # still in flight: the second buffer again
    del in_flight
    assert id(pool.get(4096)) == a_id  # sent: reusable


def test_sizes_and_counts_are_bounded():
    pool = BufferPool(min_size=1, per_size=2, sizes=2)
    keep = [pool.get(1000) for _ in range(5)]  # all in use: 5 buffers, only 2 pooled
    assert len({id(b) for b in keep}) == 5
    assert len(pool._pools[1000]) == 2
    pool.get(2000)
    pool.get(3000)  # a third size pushes out the oldest (1000)
    assert sorted(pool._pools) == [2000, 3000]


def test_buffers_under_the_minimum_are_fresh_and_zeroed():
    pool = BufferPool(min_size=8192)
    a = pool.get(4096)
    a[:] = b"x" * 4096
    del a
    assert pool.get(4096) == bytearray(4096)
    assert not pool._pools


def test_buffers_over_the_maximum_are_fresh_and_not_kept():
    pool = BufferPool(min_size=1, max_size=4096)
    a = pool.get(8192)
    a[:] = b"x" * 8192
    del a
    assert pool.get(8192) == bytearray(8192)
    assert not pool._pools
    b = pool.get(4096)  # at the maximum: pooled
    b_id = id(b)
    del b
    assert id(pool.get(4096)) == b_id


def test_a_ctypes_export_keeps_a_buffer_in_use():
    """What the RBD backend hands librbd: the buffer is busy until the export is dropped."""
    import ctypes

    pool = BufferPool(min_size=1)
    a = pool.get(4096)
    a_id = id(a)
    export = (ctypes.c_char * 4096).from_buffer(a)
    del a
    assert id(pool.get(4096)) != a_id
    del export
    assert id(pool.get(4096)) == a_id
