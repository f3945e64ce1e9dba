"""VHDX metadata log: finding and replaying the active sequence, and writing entries (MS-VHDX 2.3).

The log is a circular buffer of 4 KiB sectors at the header's log_offset / log_length.  An entry
is ``[header + descriptors][more descriptor sectors][data sectors]``; its CRC-32C covers the whole
entry_length with the checksum field zeroed.  A data descriptor carries bytes 0..7 and
4092..4095 of its target sector, the data sector the other 4084 bytes plus the sequence number
split in two halves.  A zero descriptor zeroes a 4 KiB-multiple range.

Owns:
  * ``find_active_sequence``: scan every sector for valid entries (signature, length, sequence,
    log GUID, descriptors, data sectors, CRC), chain them (next entry right after, sequence + 1),
    and pick the chain ending with the highest sequence; replay starts at the last entry's tail
    when that entry is in the chain (the spec's rule), else at the chain's start (QEMU's rule);
  * ``iter_changes``: the (file offset, data or zero length) writes an entry describes, each
    checked against the header section, the log region and the image's possible extent (the
    caller's bound; docs/vhdx.md says how replay is bounded);
  * ``build_entry``: the bytes of a new entry of data descriptors (the writer side).

Bounded memory: an entry is streamed sector by sector, descriptors included.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import crc32c

from ...errors import CorruptImage
from ...storage.base import Storage, read_at
from .header import Header, MiB

SECTOR = 4096
# loge, checksum, entry_length, tail, sequence_number, descriptor_count, reserved, log_guid,
# flushed_file_offset, last_file_offset
ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
# desc: signature, trailing_bytes, leading_bytes, file_offset, sequence_number
# zero: signature, reserved, zero_length, file_offset, sequence_number
DESCRIPTOR = struct.Struct("<4sIQQQ")
MAX_FILE_END = 1 << 48  # no VHDX reaches 256 TiB (virtual disks stop at 64 TiB)
# Descriptors per entry we write: all fit the first sector.  QEMU 7.2 reads every descriptor
# sector into the same 4 KiB buffer, so it cannot replay an entry with more than 126.
MAX_DESCRIPTORS = 126


def desc_sectors(count: int) -> int:
    """Sectors holding the entry header (two descriptor slots) and ``count`` descriptors."""
    return -(-(count + 2) // 128)


@dataclass(frozen=True)
class EntryInfo:
    pos: int  # offset inside the log
    length: int
    sequence: int
    tail: int
    descriptor_count: int
    flushed_file_offset: int
    last_file_offset: int


class LogReader:
    """Reads the circular log of one file as described by ``header``."""

    def __init__(self, storage: Storage, header: Header) -> None:
        self.storage = storage
        self.header = header
        self.offset = header.log_offset
        self.length = header.log_length

    async def sector(self, pos: int) -> bytearray:
        return await read_at(self.storage, self.offset + pos % self.length, SECTOR)

    async def descriptors(self, pos: int, count: int, first: bytes | None = None) -> AsyncIterator[tuple[bytes, bytes]]:
        """(descriptor, its descriptor sector) for the ``count`` descriptors of the entry at
        ``pos``, one sector in memory at a time (the header fills the first two slots)."""
        slot, sector = 2, first if first is not None else bytes(await self.sector(pos))
        at = pos
        for _ in range(count):
            if slot == 128:
                at += SECTOR
                slot, sector = 0, bytes(await self.sector(at))
            yield sector[slot * 32 : slot * 32 + 32], sector
            slot += 1

    async def entry_at(self, pos: int) -> EntryInfo | None:
        """The valid entry starting at ``pos``, or None."""
        first = bytes(await self.sector(pos))
        sig, stored, length, tail, seq, count, _, guid, flushed, last = ENTRY_HEADER.unpack_from(first)
        if sig != b"loge" or guid != self.header.log_guid or seq == 0:
            return None
        if length == 0 or length % SECTOR or length > self.length or tail % SECTOR or tail >= self.length:
            return None
        nd = desc_sectors(count)
        if nd * SECTOR > length:
            return None
        crc = crc32c.crc32c(first[:4])
        crc = crc32c.crc32c(b"\0\0\0\0", crc)
        crc = crc32c.crc32c(first[8:], crc)
        data_needed = 0
        sector = first
        async for desc, in_sector in self.descriptors(pos, count, first):
            if in_sector is not sector:
                sector = in_sector
                crc = crc32c.crc32c(sector, crc)
            dsig, _, zlen, foff, dseq = DESCRIPTOR.unpack(desc)
            if dseq != seq or foff % SECTOR:
                return None
            if dsig == b"desc":
                data_needed += 1
            elif dsig != b"zero" or zlen % SECTOR:
                return None
        if (nd + data_needed) * SECTOR > length:
            return None
        for i in range(nd, length // SECTOR):  # the nd descriptor sectors are in the CRC already
            sec = await self.sector(pos + i * SECTOR)
            if nd <= i < nd + data_needed:
                dsig, hi = struct.unpack_from("<4sI", sec)
                (lo,) = struct.unpack_from("<I", sec, SECTOR - 4)
                if dsig != b"data" or (hi << 32 | lo) != seq:
                    return None
            crc = crc32c.crc32c(sec, crc)
        if crc != stored:
            return None
        return EntryInfo(pos, length, seq, tail, count, flushed, last)


async def find_active_sequence(reader: LogReader) -> list[EntryInfo]:
    """The entries to replay, oldest first (empty: nothing to replay)."""
    if reader.header.log_guid == bytes(16) or reader.length == 0:
        return []
    found: dict[int, EntryInfo] = {}
    pos = 0
    while pos < reader.length:
        e = await reader.entry_at(pos)
        if e is None:
            pos += SECTOR
        else:
            found[e.pos] = e
            pos += e.length

    def successor(e: EntryInfo) -> EntryInfo | None:
        nxt = found.get((e.pos + e.length) % reader.length)
        return nxt if nxt is not None and nxt.sequence == e.sequence + 1 else None

    # Walk each chain once, from its first entry (entries do not overlap, so chains are short
    # of the log's length and sequence numbers rule out cycles).
    followers = {id(n) for e in found.values() if (n := successor(e)) is not None}
    best: list[EntryInfo] = []
    for start in found.values():
        if id(start) in followers:
            continue
        chain = [start]
        while (nxt := successor(chain[-1])) is not None:
            chain.append(nxt)
        if not best or chain[-1].sequence > best[-1].sequence:
            best = chain
    if best:
        tail = best[-1].tail
        for i, e in enumerate(best):
            if e.pos == tail:
                return best[i:]
    return best


async def iter_changes(
    reader: LogReader, info: EntryInfo, file_size: int, limit: int = MAX_FILE_END
) -> AsyncIterator[tuple[int, bytes | None, int]]:
    """(file_offset, 4 KiB data or None for zeroes, length) for each descriptor of ``info``.

    Every target must lie past the header section, outside the log and below ``limit`` (the end
    of the image's possible extent, computed by the caller), and so must last_file_offset;
    flushed_file_offset must not exceed ``file_size`` (else the file was truncated).
    """
    path = reader.storage.name
    if info.flushed_file_offset > file_size:
        raise CorruptImage(
            path, f"log entry {info.sequence}: flushed_file_offset 0x{info.flushed_file_offset:x} is past end of file"
        )
    if info.last_file_offset > limit:
        raise CorruptImage(
            path,
            f"log entry {info.sequence}: last_file_offset 0x{info.last_file_offset:x} is beyond the image's extent"
            f" (0x{limit:x})",
        )
    data_pos = info.pos + desc_sectors(info.descriptor_count) * SECTOR
    log_start, log_end = reader.offset, reader.offset + reader.length
    i = -1
    async for desc, _ in reader.descriptors(info.pos, info.descriptor_count):
        i += 1
        sig, trailing, lead_or_len, foff, _ = DESCRIPTOR.unpack(desc)
        length = SECTOR if sig == b"desc" else lead_or_len
        what = f"log entry {info.sequence}: descriptor {i} target 0x{foff:x}+0x{length:x}"
        if foff < MiB or (foff < log_end and log_start < foff + length):
            raise CorruptImage(path, f"{what} is inside the header section or the log")
        if foff + length > limit:
            raise CorruptImage(path, f"{what} is beyond the image's extent (0x{limit:x})")
        if sig == b"desc":
            sec = await reader.sector(data_pos)
            data_pos += SECTOR
            yield foff, struct.pack("<Q", lead_or_len) + bytes(sec[8:4092]) + struct.pack("<I", trailing), SECTOR
        elif length:
            yield foff, None, length


def build_entry(
    log_guid: bytes, sequence: int, tail: int, sectors: list[tuple[int, bytes]], file_size: int
) -> bytearray:
    """A log entry of one data descriptor per (4 KiB-aligned file offset, 4 KiB contents)."""
    count = len(sectors)
    nd = desc_sectors(count)
    length = (nd + count) * SECTOR
    buf = bytearray(length)
    ENTRY_HEADER.pack_into(buf, 0, b"loge", 0, length, tail, sequence, count, 0, log_guid, file_size, file_size)
    for i, (foff, data) in enumerate(sectors):
        (lead,) = struct.unpack_from("<Q", data)
        (trail,) = struct.unpack_from("<I", data, SECTOR - 4)
        DESCRIPTOR.pack_into(buf, ENTRY_HEADER.size + i * DESCRIPTOR.size, b"desc", trail, lead, foff, sequence)
        at = (nd + i) * SECTOR
        struct.pack_into("<4sI", buf, at, b"data", sequence >> 32)
        buf[at + 8 : at + 4092] = data[8:4092]
        struct.pack_into("<I", buf, at + 4092, sequence & 0xFFFFFFFF)
    struct.pack_into("<I", buf, 4, crc32c.crc32c(buf))
    return buf
