"""VMDK over NBD: nbdserve against qemu-nbd on the same images, and kill -9 crash safety.

Differential (read): every VMDK variant ``qemu-img create``/``convert`` makes (each subformat,
zeroed grains, compat6, adapter types; twoGbMaxExtent images larger than 2 GiB so they have two
extents), streamOptimized by convert, a parent chain, and the images QEMU only reads (seSparse,
VMware's streamOptimized layout), filled and served by both servers (each from its own copy):
same size, ``qemu-img compare`` of the two URIs equal, the same merged ``base:allocation`` and
``qemu:allocation-depth`` maps.

Differential (write): one libnbd trace (writes, zeroes with and without NO_HOLE, FUA, flushes,
unaligned offsets and lengths) replayed on both servers; afterwards the two images compare equal
and ours passes ``qemu-img check``.  streamOptimized: the whole-grain writes QEMU allows.

Hostile: a grain entry past the end of the file fails the READs of that grain with EIO, the
connection and other clients go on.

Crash: write through NBD with flushes, kill -9 the server with requests in flight; the image
reads back (through nbdserve and QEMU) with every flushed write and passes ``qemu-img check``.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import struct
from pathlib import Path

import nbd
import pytest

from tests import vmdkgen
from tests.conftest import SLOW
from tests.imagetest import (
    FILL,
    CrashOracle,
    assert_same_export,
    check_clean,
    crash_workload,
    qemu_raw,
    random_trace,
    replay_on_both,
)
from tests.util import nbd_connect, qemu_img, qemu_io, qemu_nbd, serve

MiB = 1 << 20
GiB = 1 << 30
VARIANTS = {
    "monolithicSparse": ["-o", "subformat=monolithicSparse"],
    "monolithicFlat": ["-o", "subformat=monolithicFlat"],
    "twoGbMaxExtentSparse": ["-o", "subformat=twoGbMaxExtentSparse"],
    "twoGbMaxExtentFlat": ["-o", "subformat=twoGbMaxExtentFlat"],
    "zeroed_grain": ["-o", "zeroed_grain=on"],
    "compat6-lsilogic": ["-o", "compat6=on,adapter_type=lsilogic"],
    "buslogic-hw7": ["-o", "adapter_type=buslogic,hwversion=7"],
    "legacyESX": ["-o", "adapter_type=legacyESX"],
}
BIG = {"twoGbMaxExtentSparse", "twoGbMaxExtentFlat"}  # 2 GiB + 64 MiB: two extents
ACROSS = ["write -P 0x44 2016M 64M"]  # over the 2 GiB extent boundary


def _copy_image(src: Path, dst_dir: Path) -> Path:
    """Copy a VMDK with its extent files (same base names) into ``dst_dir``."""
    dst_dir.mkdir()
    stem = src.stem
    for p in src.parent.iterdir():
        if p.is_file() and p.name.startswith(stem) and p.suffix == ".vmdk":
            _copy_file(p, dst_dir / p.name)
    return dst_dir / src.name


def _copy_file(src: Path, dst: Path) -> None:
    """Copy the data ranges only: holes stay holes (2 GiB flat extents), data stays data (cp
    --sparse turns zero-filled data into holes, which QEMU would then map differently)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        size = os.fstat(f.fileno()).st_size
        g.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            f.seek(start)
            g.seek(start)
            while start < end:
                chunk = f.read(min(end - start, 8 << 20))
                g.write(chunk)
                start += len(chunk)
            pos = end


def _serve_both(tmp: Path, img: Path):
    ours = _copy_image(img, tmp / "ours")
    return qemu_nbd(tmp, img, "vmdk", "-r", "-A"), serve(tmp, "-r", "-f", "vmdk", ours)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vmdk_differential_vs_qemu_nbd(tmp_path, variant):
    img = tmp_path / "a.vmdk"
    size = "2112M" if variant in BIG else "64M"
    qemu_img("create", "-q", "-f", "vmdk", *VARIANTS[variant], img, size)
    qemu_io("vmdk", img, *FILL, *(ACROSS if variant in BIG else []))
    theirs, ours = _serve_both(tmp_path, img)
    with theirs as q, ours as o:
        assert_same_export(o, q)


def test_vmdk_stream_optimized_differential_vs_qemu_nbd(tmp_path):
    src = tmp_path / "src.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", src, "64M")
    qemu_io("vmdk", src, *FILL)
    img = tmp_path / "s.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img)
    theirs, ours = _serve_both(tmp_path, img)
    with theirs as q, ours as o:
        assert_same_export(o, q)


def test_vmdk_chain_differential_vs_qemu_nbd(tmp_path):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "64M")
    qemu_io("vmdk", base, "write -P 0x5a 0 64M")
    mid, top = tmp_path / "mid.vmdk", tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", mid, "64M")
    qemu_io("vmdk", mid, "write -P 0x61 1M 6k", "write -z 2M 64k", "write -P 0x62 40M 1M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", mid.name, "-F", "vmdk", top, "64M")
    qemu_io("vmdk", top, *FILL)
    with qemu_nbd(tmp_path, top, "vmdk", "-r", "-A") as q, serve(tmp_path, "-r", "-f", "vmdk", top) as o:
        assert_same_export(o, q)


def test_vmdk_generated_images_differential_vs_qemu_nbd(tmp_path):
    """Images QEMU reads but cannot make: seSparse and VMware's streamOptimized layout."""
    g = vmdkgen.SE_GT_ENTRIES
    grains: dict[int, bytes | str] = {k: bytes([k % 200 + 1]) * vmdkgen.SE_GRAIN for k in (0, 5, 6, g + 1)}
    grains.update({7: vmdkgen.ZERO, 8: vmdkgen.UNMAPPED})
    vmdkgen.write_sesparse(tmp_path / "x-sesparse.vmdk", vmdkgen.SeSparse(capacity=32 * MiB, grains=grains))
    (tmp_path / "x.vmdk").write_text(vmdkgen.descriptor("seSparse", ['RW 65536 SESPARSE "x-sesparse.vmdk"']))
    stream = {0: os.urandom(vmdkgen.GRAIN), 3: b"\x33" * vmdkgen.GRAIN, 700: b"\x70" * vmdkgen.GRAIN}
    vmdkgen.write_stream(tmp_path / "ova.vmdk", 64 * MiB, stream)
    for name in ("x.vmdk", "ova.vmdk"):
        img = tmp_path / name
        with qemu_nbd(tmp_path, img, "vmdk", "-r", "-A") as q, serve(tmp_path, "-r", "-f", "vmdk", img) as o:
            assert_same_export(o, q)


WRITE_VARIANTS = {
    "monolithicSparse": ["-o", "subformat=monolithicSparse"],
    "zeroed_grain": ["-o", "zeroed_grain=on"],
    "twoGbMaxExtentSparse": ["-o", "subformat=twoGbMaxExtentSparse"],
    "monolithicFlat": ["-o", "subformat=monolithicFlat"],
    "twoGbMaxExtentFlat": ["-o", "subformat=twoGbMaxExtentFlat"],
}


@pytest.mark.parametrize("variant", list(WRITE_VARIANTS))
def test_vmdk_writes_same_as_qemu_nbd(tmp_path, variant):
    size = 24 * MiB
    seed = tmp_path / "seed.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", *WRITE_VARIANTS[variant], seed, str(size))
    qemu_io("vmdk", seed, "write -P 0x5a 1M 3M", "write -z 6M 1M")
    theirs = _copy_image(seed, tmp_path / "theirs")
    ours = _copy_image(seed, tmp_path / "ours")
    ops = random_trace(random.Random(variant), size, 60, max_len=600 * 512)
    replay_on_both(tmp_path, "vmdk", ours, theirs, ops)
    check_clean(ours, "vmdk")


def test_vmdk_writes_over_parent_same_as_qemu_nbd(tmp_path):
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, "24M")
    qemu_io("vmdk", base, "write -P 0x77 0 24M")
    theirs, ours = tmp_path / "theirs.vmdk", tmp_path / "ours.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", theirs, "24M")
    shutil.copyfile(theirs, ours)
    ops = random_trace(random.Random(7), 24 * MiB, 60, max_len=300 * 512)
    replay_on_both(tmp_path, "vmdk", ours, theirs, ops)
    check_clean(ours, "vmdk")


def test_vmdk_stream_optimized_writes_same_as_qemu_nbd(tmp_path):
    """streamOptimized: whole grains into grains not yet written, the only writes QEMU takes."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * (4 * 65536) + bytes(16 * MiB - 4 * 65536))
    theirs, ours = tmp_path / "theirs.vmdk", tmp_path / "ours.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, theirs)
    shutil.copyfile(theirs, ours)
    ops = [("write", g * 65536, 65536, g % 250 + 1) for g in random.Random(3).sample(range(8, 240), 40)]
    ops += [("flush", 0, 0, 0), ("write", 250 * 65536, 6 * 65536, 9)]  # six grains in one request
    replay_on_both(tmp_path, "vmdk", ours, theirs, ops)
    check_clean(ours, "vmdk")
    assert qemu_raw(ours, tmp_path, fmt="vmdk") == qemu_raw(theirs, tmp_path, fmt="vmdk")


@pytest.mark.parametrize("round", range(20 if SLOW else 4))
def test_vmdk_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    size = 40 * MiB  # two grain tables
    img = tmp_path / "k.vmdk"
    if round % 2:
        base = tmp_path / "base.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", base, str(32 * MiB))
        qemu_io("vmdk", base, f"write -P 0x77 0 {32 * MiB}")
        qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", img, str(size))
        model = bytearray(b"\x77" * (32 * MiB) + bytes(8 * MiB))
    else:
        qemu_img("create", "-q", "-f", "vmdk", img, str(size))
        model = bytearray(size)
    oracle = CrashOracle(model)
    with serve(tmp_path, "-f", "vmdk", img, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=200 * 512, ops=rng.randint(5, 40), in_flight=rng.randint(0, 8)
        )
        srv.stop(signal.SIGKILL)
    check_clean(img, "vmdk")
    with serve(tmp_path, "-f", "vmdk", img) as srv:
        h = nbd_connect(srv.uri)
        got = b"".join(h.pread(4 * MiB, pos) for pos in range(0, size, 4 * MiB))
        h.shutdown()
    oracle.verify(got)
    assert qemu_raw(img, tmp_path, fmt="vmdk") == got
    check_clean(img, "vmdk")


def test_hostile_grain_entry_fails_only_its_reads(tmp_path):
    """A grain table entry that points past the end of the file: every READ of that grain gets
    EIO (the first while its table loads, the next from the cached table), on a connection that
    goes on serving, and a second client reads the good grains meanwhile."""
    path = tmp_path / "g.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", path, "8M")
    qemu_io("vmdk", path, "write -P 1 0 64k", "write -P 2 64k 64k")
    raw = bytearray(path.read_bytes())
    gd = struct.unpack_from("<Q", raw, 56)[0]
    gt = struct.unpack_from("<I", raw, gd * 512)[0]
    struct.pack_into("<I", raw, gt * 512 + 4, len(raw) // 512 + 128)  # grain 1: past the end
    path.write_bytes(raw)
    with serve(tmp_path, "-r", "-f", "vmdk", path) as srv:
        h, other = nbd_connect(srv.uri), nbd_connect(srv.uri)
        for offset, length in ((64 * 1024, 4096), (64 * 1024 + 777, 1000), (60 * 1024, 8192)):
            with pytest.raises(nbd.Error) as info:
                h.pread(length, offset)
            assert info.value.errnum == errno.EIO, (offset, length)
            assert h.pread(4096, 4096) == b"\x01" * 4096
            assert other.pread(512, 1000) == b"\x01" * 512
        h.shutdown()
        other.shutdown()
