"""qcow2 images nbdserve wrote, read by two readers nobody here wrote, and by QEMU.

Each image starts as QEMU makes it (data, zero and compressed clusters, an internal snapshot,
optionally a backing file), is served by a real ``nbdserve`` and gets a seeded workload through
libnbd: unaligned writes, WRITE_ZEROES with and without holes, TRIM, flushes.  Afterwards the
whole disk must read the same in QEMU (``qemu-img convert``), in libyal's libqcow (Debian
``python3-libqcow``, module ``pyqcow``) and in Fox-IT's ``dissect.hypervisor`` (PyPI), and equal a
bytearray model of the workload; ``qemu-img check`` finds nothing and the snapshot still reads as
before.  Either reader caught bugs QEMU's tolerance hid (issue 14: a cluster cut short at the end
of the file read short in dissect and wrong in libqcow).

Known bugs of the readers, worked around here rather than trusted:
  * libqcow 20201213 ignores the version 3 "reads as zeroes" flag (bit 0 of an L2 entry), in
    the image and in its parent: such clusters read as whatever the entry's host offset holds
    (the header, for offset 0).  Its output is compared only outside the clusters ``qemu-img
    map`` calls zero, present and without data.
  * libqcow with a parent (backing) file: a read that starts in a range the parent serves keeps
    reading the parent past the end of that range, over the image's own clusters.  Chains are
    read one cluster per call.
  * libqcow refuses images with extended L2 entries or zstd compression (unsupported incompatible
    feature bits), and takes only a qcow2 file as the parent of a backing chain (no raw base):
    those images are judged by QEMU and dissect only.
  * dissect.hypervisor 3.21 misreads extended L2 tables: it counts contiguous subclusters from
    the L2 entry instead of its subcluster bitmap and then fails with "read length must be
    non-negative".  Extended L2 images are judged by QEMU alone (and by the unit tests).
  * dissect decompresses zstd clusters only with ``backports.zstd`` (or Python 3.14's
    ``compression.zstd``) importable; it never opens a backing file by itself (it is handed
    the backing image as a stream).
  * Neither reader reads internal snapshots: QEMU checks the snapshot.
"""

from __future__ import annotations

import json
import random
import shutil

import nbd
import pyqcow
import pytest
from dissect.hypervisor.disk.qcow2 import QCow2

from tests.conftest import SLOW
from tests.imagetest import check_clean, qemu_raw
from tests.util import nbd_connect, qemu_img, qemu_io, serve

K = 1024
M = 1024 * K
SIZE = 16 * M

# name: (create options, backing: None | "raw" | "qcow2")
VARIANTS = {
    "v3": ("compat=1.1", None),
    "v2": ("compat=0.10", None),
    "512-refcount64": ("cluster_size=512,refcount_bits=64", None),
    "4k-refcount1": ("cluster_size=4k,refcount_bits=1", None),
    "2M": ("cluster_size=2M", None),
    "zstd": ("compression_type=zstd", None),
    "v3-qcow2-backing": ("cluster_size=4k", "qcow2"),
    "v3-raw-backing": ("compat=1.1", "raw"),
    "v2-raw-backing": ("compat=0.10,cluster_size=4k", "raw"),
}


def cluster_size(opts: str) -> int:
    for part in opts.split(","):
        if part.startswith("cluster_size="):
            v = part.split("=")[1]
            return int(v[:-1]) << (10 if v[-1] == "k" else 20) if v[-1] in "kM" else int(v)
    return 64 * K


def make(tmp, opts: str, backing: str | None):
    """The image QEMU makes, its backing file (or None), and the disk as QEMU reads it."""
    base = None
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        base = tmp / f"base.{backing}"
        qemu_img("create", "-q", "-f", backing, base, str(SIZE))
        qemu_io(backing, base, "write -P 0x5b 0 3M", "write -P 0x6c 9M 2M", "write -z 10M 64k")
        args += ["-b", base.name, "-F", backing]
    path = tmp / "w.qcow2"
    qemu_img(*args, path, str(SIZE))
    cs = cluster_size(opts)
    compressed = [f"write -c -P 0x44 {8 * M + k * max(cs, 64 * K)} {max(cs, 64 * K)}" for k in range(3)]
    qemu_io("qcow2", path, "write -P 0xab 64k 300k", "write -z 1M 128k", "write -P 0x12 6M 1M", *compressed)
    if "refcount_bits=1" not in opts:  # 1-bit refcounts cannot share a cluster with a snapshot
        qemu_img("snapshot", "-c", "snap", path)
    qemu_io("qcow2", path, "write -P 0x99 5M 8k")
    return path, base


def workload(seed: int, n: int):
    rng = random.Random(seed)
    ops = []
    for i in range(n):
        off = rng.randrange(0, SIZE - 1)
        length = min(rng.choice([1, 511, 513, 4095, 4 * K + 7, 65 * K, 300 * K]), SIZE - off)
        kind = rng.choice(["write"] * 5 + ["zero", "zero_nohole", "trim", "flush"])
        ops.append((kind, off, length, i % 250 + 1))
    # Land in the compressed and snapshot-shared clusters for certain.
    ops += [("write", 8 * M + 70000, 100, 0xC1), ("zero", 8 * M + 200 * K, 5000, 0), ("write", 100 * K + 3, 7, 0xC2)]
    return ops


def replay(uri: str, ops, model: bytearray, cs: int, trim_shows_backing: bytes | None) -> None:
    h = nbd_connect(uri)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    for kind, off, n, byte in ops:
        if kind == "write":
            data = bytes([byte]) * n
            h.pwrite(data, off)
            model[off : off + n] = data
        elif kind in ("zero", "zero_nohole"):
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if kind == "zero_nohole" else 0)
            model[off : off + n] = bytes(n)
        elif kind == "trim":
            h.trim(n, off)
            start, end = -(-off // cs) * cs, (off + n) // cs * cs
            if end > start:  # v3: zero clusters; v2 drops them, the backing file shows through
                model[start:end] = trim_shows_backing[start:end] if trim_shows_backing else bytes(end - start)
        else:
            h.flush()
    h.flush()
    h.shutdown()


def read_dissect(path, base) -> bytes:
    backing = None
    if base is not None:
        fh = open(base, "rb")  # noqa: SIM115 (closed with the reader's streams at exit)
        backing = fh if base.suffix == ".raw" else QCow2(fh).open()
    with open(path, "rb") as fh:
        return QCow2(fh, backing_file=backing).open().read(SIZE)


def read_libqcow(path, base, cs: int = 64 * K) -> bytes:
    f = pyqcow.file()
    f.open(str(path))
    parent = None
    if base is not None:
        parent = pyqcow.file()
        parent.open(str(base))
        f.set_parent(parent)
    try:
        if parent is None:
            return f.read_buffer(SIZE)
        # One cluster per call: a longer read that starts in a run served by the parent goes on
        # reading the parent past the end of that run.
        return b"".join(f.read_buffer_at_offset(cs, pos) for pos in range(0, SIZE, cs))
    finally:
        f.close()
        if parent is not None:
            parent.close()


def zero_flag_ranges(path) -> list[tuple[int, int]]:
    """Ranges QEMU reads from zero clusters of the image or its qcow2 backing file (libqcow
    ignores the zero flag)."""
    out = []
    for e in json.loads(qemu_img("map", "--output=json", path).stdout):
        if e["zero"] and not e["data"] and e["present"]:
            out.append((e["start"], e["length"]))
    return out


def without(data: bytes | bytearray, ranges) -> bytes:
    out = bytearray(data)
    for start, length in ranges:
        out[start : start + length] = b"\xa5" * length
    return bytes(out)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_written_image_reads_the_same_everywhere(tmp_path, variant):
    opts, backing = VARIANTS[variant]
    cs = cluster_size(opts)
    path, base = make(tmp_path, opts, backing)
    model = bytearray(qemu_raw(path, tmp_path))
    has_snapshot = "refcount_bits=1" not in opts
    snap = qemu_raw(path, tmp_path, "-l", "snapshot.name=snap") if has_snapshot else None
    v2_backing = backing and "0.10" in opts
    trim_shows = qemu_raw(base, tmp_path, fmt=backing) if v2_backing else None
    for round_ in range(3 if SLOW else 1):
        with serve(tmp_path, "-f", "qcow2", path) as o:
            replay(o.uri, workload(hash((variant, round_)) & 0xFFFF, 120 if SLOW else 40), model, cs, trim_shows)
        assert qemu_raw(path, tmp_path) == model  # QEMU
        check_clean(path)
        if has_snapshot:
            assert qemu_raw(path, tmp_path, "-l", "snapshot.name=snap") == snap
        if "extended_l2" not in opts:
            assert read_dissect(path, base) == model  # dissect.hypervisor
        if "zstd" not in opts and backing != "raw":
            zeroes = zero_flag_ranges(path)
            got = read_libqcow(path, base, cs)
            assert without(got, zeroes) == without(model, zeroes)  # libqcow


def test_small_writes_at_the_end_read_whole_in_every_reader(tmp_path):
    """Issue 14 item 4 as the readers saw it: one small write into a fresh cluster at the end
    of the file; dissect read the disk short and libqcow read wrong bytes."""
    path = tmp_path / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    model = bytearray(SIZE)
    with serve(tmp_path, "-f", "qcow2", path) as o:
        h = nbd_connect(o.uri)
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        for off in (100, 5 * M + 7, 9 * M + 65535):
            h.pwrite(b"\x3d" * 10, off)
            model[off : off + 10] = b"\x3d" * 10
        h.shutdown()
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(path, copy)
    assert read_dissect(copy, None) == model
    assert read_libqcow(copy, None) == model
    assert qemu_raw(copy, tmp_path) == model
