"""Every format, written through nbdserve by several libnbd connections at once, against a model.

Hypothesis draws, per connection, a sequence of WRITE / WRITE_ZEROES (with and without NO_HOLE) /
TRIM / FLUSH requests on its own stripe of the disk (connections interleave freely in time; only
the byte ranges are disjoint, so the model is well defined).  All requests are issued
asynchronously, several in flight per connection.  After each example:
  * every connection flushes, then each connection reads every other connection's stripe and sees
    exactly the model (multi-conn: a flush makes all writes visible on all connections);
  * the server is stopped (SIGTERM: flush, mark clean), QEMU checks the file where it has a
    checker, and ``qemu-img compare`` with the raw model is equal.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SLOW
from tests.imagetest import check_clean, compare_with_model, run_streams
from tests.util import qemu_img, qemu_io, serve

MiB = 1 << 20
SIZE = 24 * MiB
CONNS = 3
STRIPE = SIZE // CONNS

# (format, qemu-img create options, has a qemu-img checker)
FORMATS = {
    "raw": ([], False),
    "qcow2": (["-o", "cluster_size=4k"], True),
    "qed": (["-o", "cluster_size=4k,table_size=2"], True),
    "vpc": (["-o", "force_size=on"], False),
    "vhdx": (["-o", "block_size=1M"], True),
    "vmdk": (["-o", "zeroed_grain=on"], True),
    "vdi": ([], True),
}

op = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "zero_nohole", "trim", "flush"]),
    st.integers(0, STRIPE - 1),
    st.integers(1, 300_000),
)
streams = st.lists(st.lists(op, max_size=60), min_size=CONNS, max_size=CONNS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_concurrent_connections_match_model(tmp_path_factory, fmt):
    opts, has_check = FORMATS[fmt]

    @settings(
        max_examples=25 if SLOW else 6,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(plan=streams, seed=st.integers(0, 2**32))
    def check(plan, seed):
        tmp = tmp_path_factory.mktemp(fmt)
        img = tmp / f"w.{fmt}"
        qemu_img("create", "-q", "-f", fmt, *opts, img, str(SIZE))
        model = bytearray(SIZE)
        with serve(tmp, "-f", fmt, img) as srv:
            run_streams(srv.uri, plan, model, seed, stripe=STRIPE)
        if has_check:
            check_clean(img, fmt)
        compare_with_model(img, model, tmp, fmt)

    check()


def test_sub_sector_writes_of_many_connections_into_the_same_sectors_all_land(tmp_path):
    """VHD has 512-byte sectors: a smaller write is a read-modify-write of its sector, holding
    that sector exclusively in the image's range lock.  Four connections keep 64 requests each in
    flight: 8-byte writes into slots of their own in the same five sectors (so read-modify-writes
    of one sector, most for exactly the same range, queue behind each other), between aligned
    4 KiB writes to the sectors after them (shared holds in the same neighbourhood), while one
    WRITE_ZEROES over the last 192 MiB holds a range too wide for the lock's buckets (every
    search of the lock reads it).  Every slot, every aligned write and the zeroes must be there
    afterwards, as QEMU reads the image: a lost update would show as a slot of zeroes or of
    another connection's bytes."""
    import nbd

    from tests.util import nbd_connect

    img = tmp_path / "p.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", img, str(256 * MiB))
    qemu_io("vpc", img, "write -P 0xee 100M 1M")
    model = bytearray(256 * MiB)  # that megabyte is zeroed below
    slots, aligned = 64, 16  # per connection
    with serve(tmp_path, "-f", "vpc", img) as srv:
        handles = [nbd_connect(srv.uri) for _ in range(4)]
        handles[0].aio_zero(192 * MiB, 64 * MiB)
        keep = []
        for k in range(slots):
            for c, h in enumerate(handles):
                slot = 100 + 8 * (k * len(handles) + c)  # bytes 100..2147: sectors 0-4
                data = bytes([(c * slots + k) % 255 + 1]) * 8
                model[slot : slot + 8] = data
                keep.append(nbd.Buffer.from_bytearray(bytearray(data)))
                h.aio_pwrite(keep[-1], slot)
                if k < aligned:
                    at = 4096 * (1 + k * len(handles) + c)
                    block = bytes([0x80 | c]) * 4096
                    model[at : at + 4096] = block
                    keep.append(nbd.Buffer.from_bytearray(bytearray(block)))
                    h.aio_pwrite(keep[-1], at)
        for h in handles:
            while h.aio_in_flight():
                h.poll(-1)
            h.flush()
        for h in handles:
            assert h.pread(4 * MiB, 0) == model[: 4 * MiB]
            assert h.pread(MiB, 100 * MiB) == bytes(MiB)
            h.shutdown()
    compare_with_model(img, model, tmp_path, "vpc")
