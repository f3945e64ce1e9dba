"""A backing read that fails during copy-on-write, for every format that copies from a backing
file on a partial write (qcow2 standard and extended L2, QED, VMDK; VHDX differencing disks are
in test_vhdx, built by vhdxgen since QEMU cannot make them).

Several writers at once into the same unallocated clusters, the backing read failing (EIO, after
a yield, so the writers really overlap: qcow2 writers wait on the cluster in flight, the others
on the driver's lock): every writer fails with EIO and none hangs; nothing is left allocated
(``qemu-img check`` finds no leak and the file did not grow); once the backing reads again the
same writes succeed and the image reads as the model.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests.imagetest import (
    CountingQueue,
    FlakyBacking,
    check_clean,
    compare_with_model,
    opened,
    read_image,
    run,
    write_all,
)
from tests.util import qemu_img, qemu_io

K = 1024
M = 1024 * K

# (format, create options, backing format): each backing filled with 0x3c.
CASES = {
    "qcow2": ("qcow2", "cluster_size=4k", "raw"),
    "qcow2-extended-l2": ("qcow2", "cluster_size=64k,extended_l2=on", "raw"),
    "qed": ("qed", "cluster_size=4k", "raw"),
    "vmdk": ("vmdk", "subformat=monolithicSparse", "vmdk"),
}

# Partial writes into clusters 1..3 of a 4 KiB-cluster image (several per cluster, disjoint
# bytes), one across clusters, one into a 64 KiB cluster's second subcluster.
WRITES = [(4 * K + i * 512 + 100, bytes([i + 1]) * 300) for i in range(4)]
WRITES += [(8 * K - 200, b"\x55" * 5000), (64 * K + 2 * K + 7, b"\x66" * 100)]


@pytest.mark.parametrize("case", list(CASES))
def test_failed_backing_read_fails_every_writer_and_allocates_nothing(tmp_path: Path, case: str) -> None:
    fmt, opts, bfmt = CASES[case]
    base = tmp_path / f"b.{bfmt}"
    qemu_img("create", "-q", "-f", bfmt, base, "1M")
    qemu_io(bfmt, base, "write -P 0x3c 0 1M")
    path = tmp_path / f"t.{fmt}"
    qemu_img("create", "-q", "-f", fmt, "-o", opts, "-b", base.name, "-F", bfmt, path, "1M")
    size = path.stat().st_size
    model = bytearray(b"\x3c" * M)
    queue = CountingQueue()

    async def session(recover: bool) -> None:
        """Every writer fails while the backing does; with ``recover`` the backing then reads
        again and the same writes succeed on the same open image."""
        img = await opened(path)
        backing = FlakyBacking(img)
        if fmt == "qcow2":
            img.driver._inflight_q = queue
        try:
            # (A writer left waiting for a cluster that never leaves flight would hang here.)
            results = await write_all(img, WRITES, errors=True)
            assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
            if fmt == "qcow2":  # some writer really waited for a cluster whose copy-on-write failed
                assert queue.waits > 0
                queue.waits = 0
            if recover:
                backing.failing = False
                await write_all(img, WRITES)
                for o, d in WRITES:
                    model[o : o + len(d)] = d
                assert await read_image(img) == model
        finally:
            await img.close()

    run(session(recover=False))
    check_clean(path, fmt)  # nothing leaked, no half-linked cluster
    if fmt != "qcow2":  # (qcow2 keeps its new L2 table and freed clusters: refcounts say so)
        assert path.stat().st_size == size  # append allocators gave the space back
    run(session(recover=True))
    check_clean(path, fmt)
    compare_with_model(path, model, tmp_path, fmt)
