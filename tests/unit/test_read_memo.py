"""The image layer's mapping memo (inside ``Image.read``) never serves a stale mapping.

Hypothesis sequences of write / zero / trim / read on images QEMU made, in-process.  Every read
goes through ``Image.read`` (the server's route, which fills and uses the memo) and must equal
both a byte model and the driver's own table walk (``driver.read``, below the memo).  The sequences target the
events that move or drop a mapped granule: zeroing and trimming data (qcow2, VHDX; QED and VHD
never move a data granule), and copy-on-write of clusters shared with an internal snapshot
(qcow2: a write relocates the cluster, and a stale memo entry would still point at the
snapshot's copy).  ``test_a_mapping_change_drops_the_memo`` checks each such event directly.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.cache import ClusterCache
from nbdserve.storage.base import settled
from tests.imagetest import opened, run
from tests.util import qemu_img, qemu_io

K, M = 1 << 10, 1 << 20

# name: (format, qemu-img create options, virtual size, largest op, internal snapshot first)
VARIANTS = {
    "qcow2": ("qcow2", ["-o", "cluster_size=4k"], 2 * M, 24 * K, False),
    "qcow2-snapshot": ("qcow2", ["-o", "cluster_size=4k"], 2 * M, 24 * K, True),
    "qcow2-v2": ("qcow2", ["-o", "cluster_size=4k,compat=0.10"], 2 * M, 24 * K, False),
    "qed": ("qed", ["-o", "cluster_size=4k,table_size=2"], 2 * M, 24 * K, False),
    "vpc": ("vpc", ["-o", "force_size=on"], 6 * M, 64 * K, False),
    "vhdx": ("vhdx", ["-o", "block_size=1M"], 4 * M, 2 * M + 64 * K, False),
}

# (kind, slot, sectors in, length as a fraction of the largest op): operations land in one of 4
# slots, so reads often meet granules a previous read mapped and a later change moved.
ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "read", "read", "write", "write", "zero", "zero_nohole", "trim"]),
        st.integers(0, 3),
        st.integers(0, 16),
        st.floats(0, 1),
    ),
    min_size=1,
    max_size=50,
)


def make_image(tmp_path, variant: str):
    fmt, opts, size, _, snapshot = VARIANTS[variant]
    path = tmp_path / f"memo.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *opts, str(path), str(size))
    # data everywhere, so reads start out mapped
    qemu_io(fmt, path, *[f"write -P {1 + i % 250} {i * 256 * K} {256 * K}" for i in range(size // (256 * K))])
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(path))
    return path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=ops, seed=st.integers(0, 2**32 - 1))
def test_hot_reads_follow_every_mapping_change(tmp_path, variant, plan, seed):
    fmt, _, size, max_len, _ = VARIANTS[variant]
    path = make_image(tmp_path, variant)
    rng = random.Random(seed)

    async def body():
        img = await opened(path, fmt=fmt)
        try:
            model = bytearray(size)
            await settled(img.read(0, memoryview(model)))
            for kind, slot, sectors, frac in plan:
                n = max(512, int(frac * max_len) // 512 * 512)
                off = min(slot * (size // 4) + sectors * 512, size - n)
                if kind == "read":  # mostly one 4 KiB block: inside one granule, the memo's case
                    n, off = (4 * K, off // (4 * K) * 4 * K) if frac < 0.7 else (n, off)
                    hot = memoryview(bytearray(n))
                    await settled(img.read(off, hot))
                    walked = memoryview(bytearray(n))
                    await settled(img.driver.read(off, walked))
                    assert bytes(walked) == bytes(model[off : off + n]), (kind, off, n)
                    assert bytes(hot) == bytes(walked), (kind, off, n)
                elif kind == "write":
                    data = rng.randbytes(n)
                    await settled(img.write(off, memoryview(data), fua=False))
                    model[off : off + n] = data
                elif kind in ("zero", "zero_nohole"):
                    await img.write_zeroes(off, n, may_trim=kind == "zero", fast=False, fua=False)
                    model[off : off + n] = bytes(n)
                else:  # TRIM leaves the range unspecified: learn it from the table walk
                    await img.trim(off, n, fua=False)
                    await settled(img.read(off, memoryview(model)[off : off + n]))
            # the memo was used at all (otherwise this test would prove nothing)
            probe = memoryview(bytearray(4 * K))
            for off in range(0, size, 64 * K):
                await settled(img.read(off, probe))
            assert img._memo, "no read went through the mapping memo"
        finally:
            await img.close()

    run(body())


# (variant, change, granule): each change moves or drops the mapping of a granule just served hot.
CHANGES = [
    ("qcow2", "zero", 4 * K),
    ("qcow2", "trim", 4 * K),
    ("qcow2-v2", "zero", 4 * K),
    ("qcow2-v2", "trim", 4 * K),
    ("qcow2-snapshot", "write", 4 * K),
    ("vhdx", "zero", M),
    ("vhdx", "trim", M),
]


@pytest.mark.parametrize(("variant", "change", "granule"), CHANGES)
def test_a_mapping_change_drops_the_memo(tmp_path, variant, change, granule):
    fmt, _, size, _, _ = VARIANTS[variant]
    path = make_image(tmp_path, variant)
    off = size // 2

    async def body():
        img = await opened(path, fmt=fmt)
        try:
            buf = memoryview(bytearray(4 * K))
            await settled(img.read(off, buf))  # loads the tables
            assert img.read(off, buf) is None  # synchronous: the memo's case
            assert img._memo, "the hot read did not go through the memo"
            if change == "write":
                await settled(img.write(off, memoryview(b"\x5a" * granule), fua=False))
            elif change == "zero":
                await img.write_zeroes(off, granule, may_trim=True, fast=False, fua=False)
            else:
                await img.trim(off, granule, fua=False)
            seen = set()
            for rewrite in (False, True):  # after the change, and after new data goes there
                if rewrite:
                    await settled(img.write(off, memoryview(b"\xa5" * (4 * K)), fua=False))
                walked = memoryview(bytearray(4 * K))
                await settled(img.driver.read(off, walked))
                hot = memoryview(bytearray(4 * K))
                await settled(img.read(off, hot))
                assert bytes(hot) == bytes(walked), f"stale hot read (rewrite={rewrite})"
                seen.add(bytes(walked))
            assert bytes(buf) not in seen and len(seen) == 2, "the changes did not change what the granule reads"
        finally:
            await img.close()

    run(body())


def test_memos_share_one_bounded_budget(tmp_path):
    """Two images' memos together never hold more than the cache's ``memo_limit`` entries,
    and hot reads stay right while the memos start over."""
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), str(24 * M))
        qemu_io("qcow2", path, f"write -P {ord(name)} 0 24M")
        paths.append(path)
    cache = ClusterCache(1 << 20)  # memo_limit: the floor of 4096 entries

    async def body():
        a, b = [await opened(p, fmt="qcow2", cache=cache) for p in paths]
        try:
            buf = memoryview(bytearray(4 * K))
            for img in (a, b):
                await settled(img.read(0, memoryview(bytearray(24 * M))))  # loads every L2 table
            for off in range(0, 24 * M, 4 * K):  # 6144 granules in each image
                for img, fill in ((a, b"a"), (b, b"b")):
                    assert img.read(off, buf) is None
                    assert bytes(buf) == fill * (4 * K)
                    assert cache.memo_used == len(a._memo) + len(b._memo) <= cache.memo_limit == 4096
            assert cache.memo_used > 2048  # the memos were in use, not starting over every time
        finally:
            await a.close()
            await b.close()
        assert cache.memo_used == 0 and not cache.memo_owners

    run(body())
