"""``ReplyBuffers``: a pooled reply buffer is reused only once nothing else refers to it."""

from __future__ import annotations

from nbdserve.server.buffers import ReplyBuffers


def test_an_idle_buffer_is_reused():
    pool = ReplyBuffers(min_size=1)
    a = pool.get(4096)
    a_id = id(a)
    del a
    assert id(pool.get(4096)) == a_id


def test_a_buffer_still_referenced_is_not_handed_out_again():
    pool = ReplyBuffers(min_size=1)
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
    pool = ReplyBuffers(min_size=1, per_size=2, sizes=2)
    keep = [pool.get(1000) for _ in range(5)]  # all in use: 5 buffers, only 2 pooled
    assert len({id(b) for b in keep}) == 5
    assert len(pool._pools[1000]) == 2
    pool.get(2000)
    pool.get(3000)  # a third size pushes out the oldest (1000)
    assert sorted(pool._pools) == [2000, 3000]


def test_buffers_under_the_minimum_are_fresh_and_zeroed():
    pool = ReplyBuffers(min_size=8192)
    a = pool.get(4096)
    a[:] = b"x" * 4096
    del a
    assert pool.get(4096) == bytearray(4096)
    assert not pool._pools
