"""FLAT (and VMFS) extents: the guest bytes lie in a plain file from a fixed offset on.

Every byte is this layer's data, so the parent is never read.  Block status asks the host file
(SEEK_DATA/SEEK_HOLE): a host hole is reported as data that reads as zeroes (ALLOCATED | DATA |
ZERO), which is what QEMU reports for flat extents.  Zeroes punch or zero-range the host file,
TRIM punches holes.  No metadata, so no lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...storage.local import LocalFile
from ..base import ALLOCATED, DATA, ZERO, zero_in_place
from ..raw import DataRanges
from .extent import Extent

if TYPE_CHECKING:
    from .driver import VmdkDriver


class FlatExtent(Extent):
    grain_bits = 0

    def __init__(self, owner: VmdkDriver, start: int, size: int, file: LocalFile, offset: int) -> None:
        super().__init__(owner, start, size)
        self.file = file
        self.offset = offset  # byte offset of the extent's first byte inside ``file``
        self.readonly = file.readonly
        self.why_readonly = f"extent file {file.path} is not writable"
        self.known_data = DataRanges()

    async def status(self, rel: int, end: int) -> tuple[int, int]:
        at, stop = self.offset + rel, self.offset + end
        known = self.known_data.end_of(at)
        if known:
            return ALLOCATED | DATA, min(known, stop) - self.offset
        hole = self.file.next_hole(at)
        if hole > at:
            self.known_data.add(at, hole)
            return ALLOCATED | DATA, min(hole, stop) - self.offset
        data = self.file.next_data(at)
        return ALLOCATED | DATA | ZERO, min(max(data, at + 1), stop) - self.offset

    def map_now(self, rel: int) -> int | None:
        return self.offset + rel

    async def read(self, rel: int, buf: memoryview) -> None:
        self.file.pread_into(buf, self.offset + rel)

    async def write(self, rel: int, data: memoryview) -> None:
        self.file.pwrite(data, self.offset + rel)

    async def zero(self, rel: int, length: int, may_trim: bool) -> None:
        at = self.offset + rel
        if may_trim:
            self.known_data.forget(at, at + length)
        zero_in_place(self.file, at, length, may_trim)

    async def trim(self, rel: int, length: int) -> None:
        at = self.offset + rel
        if self.file.punch_hole(at, length):
            self.known_data.forget(at, at + length)

    async def flush(self) -> None:
        await self.file.flush()
