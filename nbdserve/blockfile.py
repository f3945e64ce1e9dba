"""Positioned I/O on one open host file: the only module that reads or writes image files.

Owns ``BlockFile``: pread/pwrite into caller buffers, durable flush, hole punching and
zero-range, SEEK_DATA/SEEK_HOLE, size and truncation.

I/O policy: reads and writes run synchronously on the event-loop thread.  On the page cache they
cost microseconds, far less than a thread hop, and keep eagerly started requests task-free.
``fdatasync`` (which can block for a long time) runs in the default executor.

Direct I/O (``--cache=none``/``directsync``): the file is opened a second time with O_DIRECT
(where the filesystem refuses it, a warning says so and the page cache is used).  Reads and writes
whose offset and length are multiples of ``DIRECT_ALIGN`` go through that descriptor, via a
page-aligned bounce buffer of the file's own (Python buffers have no alignment guarantee); the
others, and everything else, use the ordinary descriptor.  The kernel keeps the two coherent: a
direct read first writes back cached dirty pages of its range, a direct write drops them.

Invariants:
  * ``pread_into`` fills the whole buffer: short reads past EOF are zero-filled (the host file
    of a sparse image may be shorter than the virtual disk); metadata readers that must not
    read past EOF check ``size`` first.
  * ``pwrite`` writes everything or raises.
  * No method keeps a reference to a caller's buffer after returning.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import stat

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

DIRECT_ALIGN = 4096  # offsets and lengths O_DIRECT I/O uses (a multiple of every logical block size)
log = logging.getLogger("nbdserve")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _fallocate_or_raise(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlockFile:
    """One host file opened for positioned I/O.  ``path`` is kept for error messages."""

    def __init__(self, path: str, *, readonly: bool, direct: bool = False) -> None:
        self.path = path
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
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        # Feature probes: cleared the first time the filesystem says "not supported".
        self.can_punch = not readonly
        self.can_zero_range = not readonly
        self.can_seek_data = True

    @classmethod
    def try_writable(cls, path: str, readonly: bool, direct: bool = False) -> BlockFile:
        """Open read-write unless ``readonly`` or the file is not writable (then read-only)."""
        if not readonly:
            try:
                return cls(path, readonly=False, direct=direct)
            except PermissionError:
                pass
            except OSError as e:
                if e.errno != errno.EROFS:
                    raise
        return cls(path, readonly=True, direct=direct)

    def _bounce_view(self, n: int) -> memoryview:
        """A page-aligned buffer of at least ``n`` bytes (grown as needed; used synchronously)."""
        if self._bounce is None or len(self._bounce) < n:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, max(n, 1 << 20))
        return memoryview(self._bounce)[:n]

    def _direct(self, offset: int, length: int) -> bool:
        return self.dfd >= 0 and length > 0 and not (offset | length) & (DIRECT_ALIGN - 1)

    # -- data -------------------------------------------------------------------------------

    def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill ``buf`` from ``offset``; the part past EOF reads as zeroes."""
        if self._direct(offset, len(buf)):
            bounce = self._bounce_view(len(buf))
            n = os.preadv(self.dfd, [bounce], offset)  # short only at EOF (a multiple of 512)
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

    def pread(self, length: int, offset: int) -> bytearray:
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return buf

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        fd = self.fd
        if self._direct(offset, len(view)):
            bounce = self._bounce_view(len(view))
            bounce[:] = view
            view, fd = bounce, self.dfd
        n = os.pwritev(fd, [view], offset)
        while n < len(view):
            n += os.pwritev(fd, [view[n:]], offset + n)
        end = offset + len(view)
        if end > self.size:
            self.size = end

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync, off the loop thread)."""
        if self.readonly:
            return
        await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, self.fd)

    def flush_sync(self) -> None:
        if not self.readonly:
            os.fdatasync(self.fd)

    # -- allocation -------------------------------------------------------------------------

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate; the range then reads as zeroes.  False if the filesystem cannot."""
        if not self.can_punch or length <= 0:
            return False
        try:
            _fallocate_or_raise(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.can_punch = False
                return False
            raise

    def zero_range(self, offset: int, length: int) -> bool:
        """Zero without deallocating (FALLOC_FL_ZERO_RANGE).  False if the filesystem cannot."""
        if not self.can_zero_range or length <= 0:
            return False
        try:
            mode = FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if offset + length > self.size else 0)
            _fallocate_or_raise(self.fd, mode, offset, length)
            return True
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.can_zero_range = False
                return False
            raise

    def write_zeroes(self, offset: int, length: int, chunk: int = 1 << 20) -> None:
        """Write explicit zero bytes (the slow fallback)."""
        zeroes = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.pwrite(memoryview(zeroes)[:n], offset)
            offset += n

    def next_data(self, offset: int) -> int:
        """Start of the next data region at or after ``offset`` (``size`` if none).  Without
        SEEK_DATA support everything counts as data."""
        if not self.can_seek_data:
            return offset
        if offset >= self.size:
            return self.size
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self.size
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self.can_seek_data = False
                return offset
            raise

    def next_hole(self, offset: int) -> int:
        """Start of the next hole at or after ``offset`` (EOF counts as a hole)."""
        if not self.can_seek_data or offset >= self.size:
            return self.size if offset < self.size else offset
        try:
            return os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return offset
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self.can_seek_data = False
                return self.size
            raise

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self.size = size

    def refresh_size(self) -> int:
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else os.fstat(self.fd).st_size
        return self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
