"""The raw driver: the virtual disk is the host file, byte for byte.

Owns: reads/writes straight to the file, block status from SEEK_DATA/SEEK_HOLE (a host hole is
ALLOCATED|ZERO: it reads as zeroes and no backing image sits below raw), TRIM by punching holes,
WRITE_ZEROES by punching (may_trim) or FALLOC_FL_ZERO_RANGE (NO_HOLE), both "fast" only when the
filesystem supports them.

No metadata, so no lock: concurrent requests go straight to the file.
"""

from __future__ import annotations

import errno

from ..blockfile import BlockFile
from ..cache import ClusterCache
from ..errors import NbdError
from .base import ALLOCATED, DATA, ZERO, Caps, Extent, FormatDriver, Limits, OpenOptions


class RawDriver(FormatDriver):
    format_name = "raw"

    def __init__(self, file: BlockFile, readonly: bool) -> None:
        self.file = file
        self.readonly = readonly
        self.size = file.size
        self.limits = Limits(align=1)
        self.caps = Caps(native_zero=not readonly, native_trim=not readonly, fast_zero=not readonly)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 1  # anything is raw, but only as a last resort chosen explicitly (see formats.probe)

    @classmethod
    async def open(cls, file: BlockFile, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> RawDriver:
        return cls(file, readonly or file.readonly)

    async def preadv(self, offset: int, buf: memoryview) -> None:
        self.file.pread_into(buf, offset)

    async def pwritev(self, offset: int, data: memoryview, *, fua: bool) -> None:
        self.file.pwrite(data, offset)
        if fua:
            await self.file.flush()

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        done = (may_trim and self.file.punch_hole(offset, length)) or self.file.zero_range(offset, length)
        if not done:
            if fast:
                raise NbdError(errno.ENOTSUP, "zeroing is not faster than writing on this file")
            self.file.write_zeroes(offset, length)
        if fua:
            await self.file.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        self.file.punch_hole(offset, length)

    async def flush(self) -> None:
        await self.file.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        end = offset + length
        hole = self.file.next_hole(offset)
        if hole > offset:
            return Extent(min(hole, end) - offset, ALLOCATED | DATA)
        data = self.file.next_data(offset)
        return Extent(min(data, end) - offset, ALLOCATED | ZERO)

    async def close(self) -> None:
        if not self.readonly:
            await self.file.flush()
