"""A full file system, per format: the image lives on a small file system (tmpfs, and ext4 on a
loop device); a client fills the disk until writes fail.  They must fail with ENOSPC replies (not
EIO, not a dropped connection, not a dead server); what was acknowledged must read back, through
the server and through QEMU afterwards; once space is freed, writes and flushes work again; and
QEMU's check finds no corruption.

Needs root (mount); skipped, with the reason, where the file system cannot be mounted.
"""

from __future__ import annotations

import contextlib
import errno
import random
import subprocess
import tempfile
from pathlib import Path

import nbd
import pytest

from tests.conftest import SLOW
from tests.util import nbd_connect, qemu_img, serve

MiB = 1 << 20
SIZE = 64 * MiB  # virtual: far more than the filesystem holds
FS_SIZE = 12 * MiB
BALLAST = 3 * MiB  # freed after the first ENOSPC
FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "vmdk", "vdi")
CREATE = {"vpc": ["-o", "force_size=on"], "vhdx": ["-o", "block_size=1M"], "qcow2": ["-o", "cluster_size=64k"]}
# (vmdk: monolithicSparse, 64 KiB grains; vdi: dynamic, 1 MiB blocks: qemu-img's defaults)


@contextlib.contextmanager
def small_fs(kind: str, size: int, scratch: Path):
    """A mounted file system of ``size`` bytes: tmpfs, or ext4 in a file on a loop device."""
    d = Path(tempfile.mkdtemp(prefix="nbdserve-enospc-"))
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)]
    else:
        backing = scratch / "fs.ext4"
        subprocess.run(["fallocate", "-l", str(size), str(backing)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(backing)], check=True, capture_output=True)
        cmd = ["mount", "-o", "loop", str(backing), str(d)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a small {kind}: {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False, capture_output=True)
        d.rmdir()


def errnum(call, *args) -> int | None:
    try:
        call(*args)
    except nbd.Error as e:
        return e.errnum
    return None


@pytest.mark.parametrize("round", range(5 if SLOW else 1))
@pytest.mark.parametrize("fs_kind", ("tmpfs", "ext4"))
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_filesystem_gives_enospc_and_loses_nothing_acknowledged(tmp_path, fmt, fs_kind, round):
    rng = random.Random(f"{fmt}:{round}")
    model = bytearray(SIZE)
    unsure: list[tuple[int, int]] = []  # failed writes: those bytes may or may not have landed
    with small_fs(fs_kind, FS_SIZE, tmp_path) as fs:
        img = fs / f"disk.{fmt}"
        qemu_img("create", "-q", "-f", fmt, *CREATE.get(fmt, []), img, str(SIZE))
        ballast = fs / "ballast"
        ballast.write_bytes(b"\xff" * BALLAST)
        with serve(tmp_path, "-f", fmt, img) as srv:
            h = nbd_connect(srv.uri)
            failures: list[int] = []
            off = 0
            while off < SIZE and len(failures) < 3:  # fill until three writes fail
                n = rng.choice((64 << 10, 256 << 10, MiB))
                n = min(n, SIZE - off)
                data = rng.randbytes(n)
                err = errnum(h.pwrite, data, off)
                if err is None:
                    model[off : off + n] = data
                else:
                    failures.append(err)
                    unsure.append((off, n))
                off += n
                if err is None and rng.random() < 0.3:
                    assert errnum(h.flush) in (None, errno.ENOSPC)
            assert failures, "the filesystem never filled up"
            print(f"\nENOSPC {fmt} on {fs_kind} #{round}: {off / MiB:.0f} MiB sent, {len(failures)} writes got ENOSPC")
            assert set(failures) == {errno.ENOSPC}, f"failed writes answered {failures}, not only ENOSPC"
            assert srv.alive()
            # what was acknowledged reads back
            for pos in range(0, off, 4 * MiB):
                n = min(4 * MiB, off - pos)
                got = h.pread(n, pos)
                for u_off, u_len in unsure:
                    lo, hi = max(u_off, pos), min(u_off + u_len, pos + n)
                    if lo < hi:
                        got = got[: lo - pos] + model[lo:hi] + got[hi - pos :]
                assert got == model[pos : pos + n], f"acknowledged data lost in [{pos}, {pos + n})"
            # free space: writes and flushes work again
            ballast.unlink()
            for u_off, u_len in unsure:
                data = rng.randbytes(min(u_len, 256 << 10))
                h.pwrite(data, u_off)
                model[u_off : u_off + len(data)] = data
                unsure[unsure.index((u_off, u_len))] = (u_off + len(data), u_len - len(data))
            h.flush()
            h.shutdown()
        # QEMU's view after a clean stop: no corruption, the acknowledged bytes
        check = subprocess.run(["qemu-img", "check", "-f", fmt, img], capture_output=True, text=True)
        assert check.returncode in (0, 3) or fmt in ("raw", "vpc"), check.stdout + check.stderr  # 3: leaks
        out = tmp_path / "out.raw"
        qemu_img("convert", "-f", fmt, "-O", "raw", img, out)
    disk = bytearray(out.read_bytes())
    for u_off, u_len in unsure:
        disk[u_off : u_off + u_len] = model[u_off : u_off + u_len]
    assert disk == model
