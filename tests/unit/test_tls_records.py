"""``session._records``: replies regrouped for a TLS transport keep their bytes and order, small
ones joined up to one record's payload, large ones untouched (the same object, not a copy)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdserve.server.session import _TLS_RECORD, _records


def test_small_replies_are_joined_up_to_a_record() -> None:
    replies = [bytes([i]) * 4112 for i in range(9)]  # 4 KiB reads with their 16-byte headers
    out = _records(replies)
    assert b"".join(out) == b"".join(replies)
    assert [len(b) for b in out] == [3 * 4112, 3 * 4112, 3 * 4112]


def test_a_large_reply_passes_as_it_is() -> None:
    big = memoryview(bytearray(1 << 20))
    head, tail = b"h" * 20, b"t" * 100
    out = _records([head, big, tail])
    assert out[0] == head and out[1] is big and out[2] == tail


@given(st.lists(st.binary(min_size=1, max_size=40000), max_size=40))
def test_bytes_and_order_kept_and_joined_buffers_fit_a_record(chunks) -> None:
    out = _records(chunks)
    assert b"".join(out) == b"".join(chunks)
    originals = {id(c) for c in chunks}
    for b in out:
        assert id(b) in originals or len(b) <= _TLS_RECORD  # a join never exceeds a record
