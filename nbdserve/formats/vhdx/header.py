"""VHDX fixed header section: file identifier, the two headers, the two region tables.

Owns the first 1 MiB of a VHDX file (MS-VHDX 2.2):
  * @0 the file identifier ``vhdxfile``;
  * @64 KiB and @128 KiB the two 4 KiB headers, each protected by CRC-32C over 4 KiB with the
    checksum field zeroed; the current one is the valid header with the larger sequence number;
  * @192 KiB and @256 KiB the two 64 KiB region tables (same CRC rule), which place the BAT and
    the metadata region.

Invariants: a ``Header`` returned by ``choose_header`` passed every check here (signature,
version 1, log version 0, log placement); ``Regions`` are inside the file, 1 MiB aligned, and
overlap neither each other, the first MiB, nor the log.  Headers are always rewritten through
the non-current slot with sequence + 1, so one valid header survives any torn write.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, replace

import crc32c

from ...errors import CorruptImage, UnsupportedImage

KiB = 1 << 10
MiB = 1 << 20

FILE_IDENTIFIER = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
REGION_MAX_ENTRIES = 2047

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
ZERO_GUID = bytes(16)

# head, checksum, sequence_number, file_write_guid, data_write_guid, log_guid,
# log_version, version, log_length, log_offset
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")  # regi, checksum, entry_count, reserved
_REGION_ENTRY = struct.Struct("<16sQII")  # guid, file_offset, length, flags (bit0 Required)


def crc_valid(buf: bytes | bytearray | memoryview, crc_at: int) -> bool:
    """CRC-32C of ``buf`` with the 4-byte checksum at ``crc_at`` taken as zero."""
    view = memoryview(buf)
    stored = struct.unpack_from("<I", view, crc_at)[0]
    crc = crc32c.crc32c(view[:crc_at])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    return crc32c.crc32c(view[crc_at + 4 :], crc) == stored


def set_crc(buf: bytearray, crc_at: int) -> None:
    buf[crc_at : crc_at + 4] = b"\0\0\0\0"
    struct.pack_into("<I", buf, crc_at, crc32c.crc32c(buf))


def guid_str(g: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=bytes(g))).upper() + "}"


@dataclass(frozen=True)
class Header:
    slot: int  # 0 or 1: which copy this is
    sequence_number: int
    file_write_guid: bytes
    data_write_guid: bytes
    log_guid: bytes
    log_version: int
    version: int
    log_length: int
    log_offset: int
    raw: bytes  # the whole 4 KiB, so reserved bytes survive a rewrite

    def encode(self) -> bytearray:
        buf = bytearray(self.raw)
        _HEADER.pack_into(
            buf,
            0,
            b"head",
            0,
            self.sequence_number,
            self.file_write_guid,
            self.data_write_guid,
            self.log_guid,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        )
        set_crc(buf, 4)
        return buf

    def successor(self, **changes: bytes) -> Header:
        """The next header: the other slot, sequence + 1, ``changes`` applied."""
        return replace(self, slot=1 - self.slot, sequence_number=self.sequence_number + 1, **changes)


def _parse_header(buf: bytes, slot: int) -> Header | str:
    """A Header, or a short reason why this copy is invalid."""
    if buf[:4] != b"head":
        return "bad signature"
    if not crc_valid(buf, 4):
        return "bad checksum"
    _, _, seq, fwg, dwg, lg, log_version, version, log_length, log_offset = _HEADER.unpack_from(buf)
    if version != 1:
        return f"version {version} (expected 1)"
    return Header(slot, seq, fwg, dwg, lg, log_version, version, log_length, log_offset, bytes(buf))


def choose_header(path: str, copies: tuple[bytes, bytes], file_size: int) -> Header:
    """The current header among the two copies (MS-VHDX 2.2.2.1), fully validated."""
    parsed = [_parse_header(c, i) for i, c in enumerate(copies)]
    valid = [h for h in parsed if isinstance(h, Header)]
    if not valid:
        raise CorruptImage(path, f"no valid VHDX header (header 1: {parsed[0]}; header 2: {parsed[1]})")
    if len(valid) == 2 and valid[0].sequence_number == valid[1].sequence_number and valid[0].raw != valid[1].raw:
        raise CorruptImage(path, f"both VHDX headers have sequence number {valid[0].sequence_number} but differ")
    h = max(valid, key=lambda h: h.sequence_number)
    name = f"header {h.slot + 1}"
    if h.log_version != 0:
        raise UnsupportedImage(path, f"{name}: log_version {h.log_version} (only 0 is defined)")
    if h.log_length % MiB:
        raise CorruptImage(path, f"{name}: log_length 0x{h.log_length:x} is not a multiple of 1 MiB")
    if h.log_offset % MiB or h.log_offset < MiB:
        raise CorruptImage(path, f"{name}: log_offset 0x{h.log_offset:x} is not a 1 MiB multiple >= 1 MiB")
    if h.log_offset + h.log_length > file_size:
        raise CorruptImage(path, f"{name}: log at 0x{h.log_offset:x}+0x{h.log_length:x} extends past end of file")
    return h


@dataclass(frozen=True)
class Regions:
    bat_offset: int
    bat_length: int
    metadata_offset: int
    metadata_length: int


def _parse_region_table(path: str, buf: bytes, which: int, header: Header, file_size: int) -> Regions:
    name = f"region table {which}"
    sig, _, count, _ = _REGION_HEADER.unpack_from(buf)
    if sig != b"regi":
        raise CorruptImage(path, f"{name}: bad signature {sig!r}")
    if not crc_valid(buf, 4):
        raise CorruptImage(path, f"{name}: bad checksum")
    if count > REGION_MAX_ENTRIES:
        raise CorruptImage(path, f"{name}: entry_count {count} > {REGION_MAX_ENTRIES}")
    found: dict[bytes, tuple[int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    if header.log_length:
        spans.append((header.log_offset, header.log_offset + header.log_length, "the log"))
    for i in range(count):
        guid, off, length, flags = _REGION_ENTRY.unpack_from(buf, _REGION_HEADER.size + i * _REGION_ENTRY.size)
        what = {BAT_GUID: "BAT region", METADATA_GUID: "metadata region"}.get(guid)
        if what is None:
            if flags & 1:
                raise UnsupportedImage(path, f"{name}: unknown required region {guid_str(guid)}")
            what = f"region {guid_str(guid)}"
        elif guid in found:
            raise CorruptImage(path, f"{name}: {what} listed twice")
        if off % MiB or off < MiB or length == 0 or length % MiB:
            raise CorruptImage(path, f"{name}: {what} at 0x{off:x}+0x{length:x} is not 1 MiB aligned")
        if off + length > file_size:
            raise CorruptImage(path, f"{name}: {what} at 0x{off:x}+0x{length:x} extends past end of file")
        for s, e, other in spans:
            if off < e and s < off + length:
                raise CorruptImage(path, f"{name}: {what} overlaps {other}")
        spans.append((off, off + length, what))
        if guid in (BAT_GUID, METADATA_GUID):
            found[guid] = (off, length)
    for guid, what in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
        if guid not in found:
            raise CorruptImage(path, f"{name}: no {what} region")
    return Regions(*found[BAT_GUID], *found[METADATA_GUID])


def parse_region_tables(path: str, tables: tuple[bytes, bytes], header: Header, file_size: int) -> Regions:
    """Validate both region tables; use table 1, or table 2 when table 1 is damaged."""
    try:
        return _parse_region_table(path, tables[0], 1, header, file_size)
    except CorruptImage as first:
        try:
            return _parse_region_table(path, tables[1], 2, header, file_size)
        except CorruptImage:
            raise first from None
