"""Local files and block devices: the ``storage.base`` contract on one open file descriptor.

Owns ``LocalFile``: positioned reads and writes into caller buffers, durable flush, hole punching
and zero-range, SEEK_DATA/SEEK_HOLE, size and truncation; and the file's image lock
(``LocalFile.lock``), the byte-range scheme QEMU uses, so QEMU, qemu-nbd and nbdserve never write
one image at the same time (docs/image-locks.md).  ``open_locked`` opens and locks an image file
the way the image layer and drivers that open more files (VMDK extents) need it.

I/O policy: ``read`` and ``write`` run synchronously on the event-loop thread and return None
(``sync_io``).  On the page cache they cost microseconds, far less than a thread hop, and keep
eagerly started requests task-free.  ``fdatasync`` (which can block for a long time) runs in the
default executor.

Direct I/O (``--cache=none``/``directsync``): the file is opened a second time with O_DIRECT
(where the filesystem refuses it, a warning says so and the page cache is used).  Reads and writes
whose offset and length are multiples of ``DIRECT_ALIGN`` go through that descriptor, via a
page-aligned bounce buffer of the file's own (Python buffers have no alignment guarantee); the
others, and everything else, use the ordinary descriptor.  The kernel keeps the two coherent: a
direct read first writes back cached dirty pages of its range, a direct write drops them.  Locks
are taken on the ordinary descriptor only.

Invariants:
  * ``read`` fills the whole buffer: short reads past EOF are zero-filled (the host file of a
    sparse image may be shorter than the virtual disk).
  * ``write`` writes everything or raises; ``size`` follows writes past the end.
  * No method keeps a reference to a caller's buffer after returning.
  * A file opened for writing is never opened without ``O_RDWR``: a file the process may not
    write is an error for a read-write open, never a silent downgrade.
  * Locks are OFD locks: they belong to this open file description, so a second ``LocalFile`` on
    the same file (in this process or another) conflicts exactly as another QEMU process would,
    and closing the file drops them.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct

from ..errors import ImageError
from .base import Buffer, Storage

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

DIRECT_ALIGN = 4096  # offsets and lengths O_DIRECT I/O uses (a multiple of every logical block size)
log = logging.getLogger("nbdserve")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# errnos that mean "this file system cannot do that" (the feature is then not tried again)
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _fallocate_or_raise(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Perm(enum.IntFlag):
    """What a user of an image file does with it (QEMU's block permissions, same bit values)."""

    CONSISTENT_READ = 0x01  # reads see consistent data (metadata included)
    WRITE = 0x02  # changes the contents
    WRITE_UNCHANGED = 0x04  # writes that leave the contents as they are
    RESIZE = 0x08  # changes the file's size

    @property
    def label(self) -> str:
        """QEMU's name for the permission, as its lock errors show it."""
        return (self.name or "").lower().replace("_", " ")


PERM_ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
PERM_LOCK_BASE = 100  # byte 100 + bit index: "I hold this permission"
UNSHARE_LOCK_BASE = 200  # byte 200 + bit index: "I do not let others hold this permission"
# struct flock (Linux, 64-bit off_t): l_type, l_whence, l_start, l_len, l_pid, padding
_FLOCK = struct.Struct("hhqqi4x")


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One OFD lock call on ``byte``; returns the l_type the kernel hands back (for GETLK)."""
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(out)[0]


class LocalFile(Storage):
    """One host file (or block device) opened for positioned I/O; ``name`` is its path."""

    sync_io = True

    def __init__(self, path: str, *, readonly: bool, direct: bool = False) -> None:
        self.name = path
        flags = os.O_RDONLY if readonly else os.O_RDWR
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        self.dfd = -1  # the O_DIRECT descriptor, if direct I/O was asked for and is possible
        self._bounce: mmap.mmap | None = None
        if direct:
            try:
                self.dfd = os.open(path, flags | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    os.close(self.fd)
                    raise
                log.warning("%s: the filesystem refuses O_DIRECT; using the page cache", path)
        self.readonly = readonly
        st = os.fstat(self.fd)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        # Feature probes: cleared the first time the file system says "not supported".
        self._can_punch = not readonly
        self._can_zero_range = not readonly
        self._can_seek_data = True
        # Lock bytes this file holds (see lock()).
        self._perm = Perm(0)
        self._unshared = Perm(0)

    def __repr__(self) -> str:
        return f"<LocalFile {self.name}>"

    @property
    def splice_fd(self) -> int | None:  # type: ignore[override]
        """The file's descriptor, unless it is read-only, closed or in direct I/O mode (bytes
        spliced in go through the page cache, which direct I/O promises to bypass)."""
        return None if self.readonly or self.dfd >= 0 or self.fd < 0 else self.fd

    # -- the contract: data -----------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; the part past EOF reads as zeroes."""
        if self._direct(offset, len(buf)):
            bounce = self._bounce_view(len(buf))
            n = os.preadv(self.dfd, [bounce], offset)  # short only at EOF
            buf[:n] = bounce[:n]
            if n < len(buf):
                memoryview(buf)[n:] = bytes(len(buf) - n)
            return
        n = os.preadv(self.fd, [buf], offset)
        length = len(buf)
        while n < length:
            view = memoryview(buf)[n:]
            got = os.preadv(self.fd, [view], offset + n)
            if got == 0:
                view[:] = bytes(len(view))
                return
            n += got

    def write(self, offset: int, data: Buffer | list[Buffer]) -> None:
        """Write ``data`` (a buffer, or a list of buffers written one after the other) at
        ``offset``: one ``pwritev``."""
        if type(data) is list:
            bufs, length = data, sum(map(len, data))
        else:
            bufs, length = [data], len(data)
        fd = self.fd
        if self._direct(offset, length):
            bounce = self._bounce_view(length)
            pos = 0
            for b in bufs:
                bounce[pos : pos + len(b)] = memoryview(b).cast("B")
                pos += len(b)
            bufs, fd = [bounce], self.dfd
        n = os.pwritev(fd, bufs, offset)
        if n < length:  # rare (a signal, a full file system about to fail): finish piecewise
            rest = memoryview(b"".join(bufs) if len(bufs) > 1 else bufs[0]).cast("B")
            while n < length:
                n += os.pwritev(fd, [rest[n:]], offset + n)
        end = offset + length
        if end > self.size:
            self.size = end

    def _bounce_view(self, n: int) -> memoryview:
        """A page-aligned buffer of at least ``n`` bytes (grown as needed; used synchronously)."""
        if self._bounce is None or len(self._bounce) < n:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, max(n, 1 << 20))
        return memoryview(self._bounce)[:n]

    def _direct(self, offset: int, length: int) -> bool:
        return self.dfd >= 0 and length > 0 and not (offset | length) & (DIRECT_ALIGN - 1)

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync, off the loop thread)."""
        if self.readonly:
            return
        await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)

    # -- the contract: allocation -----------------------------------------------------------

    async def discard(self, offset: int, length: int) -> bool:
        """Deallocate (punch a hole); the range then reads as zeroes."""
        return self._punch(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> bool:
        """Punch (``may_unmap``) or zero-range; False, having changed nothing, if neither works."""
        return (may_unmap and self._punch(offset, length)) or self._zero_range(offset, length)

    def can_zero_fast(self) -> bool:
        """Whether ``write_zeroes`` may still work natively (False once both ways failed)."""
        return self._can_punch or self._can_zero_range

    def _punch(self, offset: int, length: int) -> bool:
        if not self._can_punch or length <= 0:
            return False
        try:
            _fallocate_or_raise(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self._can_punch = False
                return False
            raise

    def _zero_range(self, offset: int, length: int) -> bool:
        """Zero without deallocating (FALLOC_FL_ZERO_RANGE)."""
        if not self._can_zero_range or length <= 0:
            return False
        try:
            mode = FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if offset + length > self.size else 0)
            _fallocate_or_raise(self.fd, mode, offset, length)
            return True
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self._can_zero_range = False
                return False
            raise

    async def extent(self, offset: int, length: int) -> tuple[int, bool]:
        """(run length, is data) from SEEK_HOLE/SEEK_DATA; past EOF is a hole; without SEEK_DATA
        support everything counts as data."""
        size = self.size
        if offset >= size:
            return length, False
        if self._can_seek_data:
            try:
                hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
                if hole > offset:
                    return min(hole - offset, length), True
                data = os.lseek(self.fd, offset, os.SEEK_DATA)
                return min(data - offset, length), False
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after offset (the file shrank meanwhile)
                    return length, False
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._can_seek_data = False
        return min(length, size - offset), True

    async def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """``close`` for synchronous cleanup paths (nothing here needs to wait)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    # -- image locks ------------------------------------------------------------------------

    def lock(self, perm: Perm, shared: Perm) -> None:
        """Hold ``perm`` and let others hold only ``shared``, or raise ``ImageError`` naming the
        permission another user's lock denies (QEMU's "Failed to get ... lock").

        First take the new lock bytes, then test the other side's bytes: two users starting at
        the same moment then both see the conflict (neither can slip past the other).  On a
        conflict the previous locks are restored; on success bytes no longer needed are released
        (so this also downgrades a writer to a reader).
        """
        unshared = PERM_ALL & ~shared
        old = (self._perm, self._unshared)
        try:
            self._apply(self._perm | perm, self._unshared | unshared)
            for p in perm:
                if self._held_by_others(UNSHARE_LOCK_BASE, p):
                    raise self._conflict(f'Failed to get "{p.label}" lock')
            for p in unshared:
                if self._held_by_others(PERM_LOCK_BASE, p):
                    raise self._conflict(f'Failed to get shared "{p.label}" lock')
        except BaseException:
            try:
                self._apply(*old)
            except ImageError:
                pass  # only releases: cannot fail on a working file; the first error says more
            raise
        self._apply(perm, unshared)

    def _conflict(self, what: str) -> ImageError:
        return ImageError(self.name, f"{what}: is another process (QEMU, qemu-nbd, nbdserve) using the image?")

    def _apply(self, perm: Perm, unshared: Perm) -> None:
        """Make the held lock bytes exactly ``perm`` and ``unshared``.  They are shared (read)
        locks, which conflict only with another user's test, never with each other."""
        for p in Perm:
            for base, attr, want in ((PERM_LOCK_BASE, "_perm", perm), (UNSHARE_LOCK_BASE, "_unshared", unshared)):
                have = getattr(self, attr)
                if (want ^ have) & p:
                    kind = fcntl.F_RDLCK if want & p else fcntl.F_UNLCK
                    try:
                        _flock(self.fd, fcntl.F_OFD_SETLK, kind, base + p.bit_length() - 1)
                    except OSError as e:
                        raise ImageError(self.name, f"cannot lock the image: {e.strerror}") from None
                    setattr(self, attr, have ^ p)

    def _held_by_others(self, base: int, p: Perm) -> bool:
        try:
            return _flock(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, base + p.bit_length() - 1) != fcntl.F_UNLCK
        except OSError as e:
            raise ImageError(self.name, f"cannot test the image's locks: {e.strerror}") from None


def lock_perms(*, writable: bool, force_share: bool = False) -> tuple[Perm, Perm]:
    """(held, shared) lock permissions for an image file, as QEMU takes them: a writer holds
    read, write and resize and lets others only read; a reader holds read and refuses writers,
    unless ``force_share`` (``-U``), when it shares everything."""
    if writable:
        return Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    if force_share:
        return Perm.CONSISTENT_READ, PERM_ALL
    return Perm.CONSISTENT_READ, PERM_ALL & ~(Perm.WRITE | Perm.RESIZE)


def open_locked(path: str, *, readonly: bool, force_share: bool = False, direct: bool = False) -> LocalFile:
    """Open and lock one image file (``lock_perms``): what the image layer and drivers that open
    more files (VMDK extents) use.  Read-write is exactly what ``readonly`` says: a file this
    process may not write is refused (as qemu-nbd does), never silently served read-only."""
    try:
        file = LocalFile(path, readonly=readonly, direct=direct)
    except OSError as e:
        if not readonly and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ImageError(path, f"cannot open for writing: {e.strerror} (serve it read-only: -r)") from None
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    try:
        file.lock(*lock_perms(writable=not readonly, force_share=force_share))
    except BaseException:
        file.close_now()
        raise
    return file
