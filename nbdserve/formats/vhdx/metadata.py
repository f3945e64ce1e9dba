"""VHDX metadata region: the metadata table and the items nbdserve understands (MS-VHDX 2.6).

Owns parsing of the table (signature ``metadata``, at most 2047 entries, no duplicates, unknown
required items refused) and of the items: File Parameters, Virtual Disk Size, Page 83 Data,
Logical and Physical Sector Size, and the Parent Locator of differencing disks.

Invariants of a returned ``Metadata``: block_size is a power of two in [1 MiB, 256 MiB]; the
logical sector is 512 or 4096 and divides the virtual size; the size is at most 64 TiB; every
item lies inside the region; a file with HasParent has a VHDX parent locator with a
parent_linkage and at least one path.  The physical sector size is only a hint (QEMU ignores
it too): any value is accepted, with a note in ``warnings`` when it is not 512 or 4096.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ...errors import CorruptImage, UnsupportedImage
from .header import KiB, MiB, guid_str

TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
MAX_VIRTUAL_SIZE = 64 << 40

FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
PAGE83_DATA = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746").bytes_le
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556").bytes_le
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913").bytes_le

_NAMES = {
    FILE_PARAMETERS: "File Parameters",
    VIRTUAL_DISK_SIZE: "Virtual Disk Size",
    PAGE83_DATA: "Page 83 Data",
    LOGICAL_SECTOR_SIZE: "Logical Sector Size",
    PHYSICAL_SECTOR_SIZE: "Physical Sector Size",
    PARENT_LOCATOR: "Parent Locator",
}
_LENGTHS = {FILE_PARAMETERS: 8, VIRTUAL_DISK_SIZE: 8, PAGE83_DATA: 16, LOGICAL_SECTOR_SIZE: 4, PHYSICAL_SECTOR_SIZE: 4}

_TABLE_HEADER = struct.Struct("<8sHH20s")  # signature, reserved, entry_count, reserved
_TABLE_ENTRY = struct.Struct("<16sIII4x")  # item_id, offset, length, flags (IsUser, IsVirtualDisk, IsRequired)
_LOCATOR_HEADER = struct.Struct("<16sHH")  # locator_type, reserved, key_value_count
_LOCATOR_ENTRY = struct.Struct("<IIHH")  # key_offset, value_offset, key_length, value_length


@dataclass(frozen=True)
class Metadata:
    block_size: int
    leave_block_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: bytes
    parent_locator: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # fields accepted although out of spec (the opener logs them)


async def parse_metadata(path: str, read: Callable[[int, int], Awaitable[bytes]], region_length: int) -> Metadata:
    """Parse the metadata region; ``await read(offset, length)`` reads inside it (each read <= 1 MiB)."""
    region = await read(0, TABLE_SIZE)
    sig, _, count, _ = _TABLE_HEADER.unpack_from(region)
    if sig != b"metadata":
        raise CorruptImage(path, f"metadata table: bad signature {sig!r}")
    if count > MAX_ENTRIES:
        raise CorruptImage(path, f"metadata table: entry_count {count} > {MAX_ENTRIES}")
    items: dict[bytes, bytes] = {}
    for i in range(count):
        guid, off, length, flags = _TABLE_ENTRY.unpack_from(region, _TABLE_HEADER.size + i * _TABLE_ENTRY.size)
        name = _NAMES.get(guid, f"item {guid_str(guid)}")
        if guid in items:
            raise CorruptImage(path, f"metadata table: {name} listed twice")
        if guid not in _NAMES:
            if flags & 4:
                raise UnsupportedImage(path, f"metadata table: unknown required {name}")
            continue
        if length > MiB or (length and off < TABLE_SIZE) or off + length > region_length:
            raise CorruptImage(path, f"metadata {name}: offset 0x{off:x} length 0x{length:x} outside the region")
        want = _LENGTHS.get(guid)
        if want is not None and length < want:
            raise CorruptImage(path, f"metadata {name}: length {length} < {want}")
        items[guid] = bytes(await read(off, length)) if length else b""
    for guid in (FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE):
        if guid not in items:
            raise CorruptImage(path, f"metadata table: no {_NAMES[guid]} item")

    block_size, fp_flags = struct.unpack_from("<II", items[FILE_PARAMETERS])
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise CorruptImage(path, f"metadata File Parameters: block_size {block_size} is not a power of 2 in 1..256 MiB")
    has_parent = bool(fp_flags & 2)
    lss = struct.unpack_from("<I", items[LOGICAL_SECTOR_SIZE])[0]
    if lss not in (512, 4096):
        raise CorruptImage(path, f"metadata Logical Sector Size: {lss} (expected 512 or 4096)")
    pss = struct.unpack_from("<I", items[PHYSICAL_SECTOR_SIZE])[0]
    notes = []
    if pss not in (512, 4096):  # a hint about the host's sectors; nothing here depends on it
        notes.append(f"metadata Physical Sector Size {pss} is not 512 or 4096 (ignored)")
    size = struct.unpack_from("<Q", items[VIRTUAL_DISK_SIZE])[0]
    if size % lss or size > MAX_VIRTUAL_SIZE:
        raise CorruptImage(path, f"metadata Virtual Disk Size: {size} is not a multiple of {lss} up to 64 TiB")
    locator: dict[str, str] = {}
    if has_parent:
        if PARENT_LOCATOR not in items:
            raise CorruptImage(path, "metadata: HasParent is set but there is no Parent Locator")
        locator = _parse_locator(path, items[PARENT_LOCATOR])
    return Metadata(
        block_size=block_size,
        leave_block_allocated=bool(fp_flags & 1) and not has_parent,
        has_parent=has_parent,
        virtual_disk_size=size,
        logical_sector_size=lss,
        physical_sector_size=pss,
        page83=bytes(items[PAGE83_DATA][:16]),
        parent_locator=locator,
        warnings=tuple(notes),
    )


def _parse_locator(path: str, item: bytes) -> dict[str, str]:
    if len(item) < _LOCATOR_HEADER.size:
        raise CorruptImage(path, "metadata Parent Locator: shorter than its header")
    ltype, _, count = _LOCATOR_HEADER.unpack_from(item)
    if ltype != VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedImage(path, f"metadata Parent Locator: unknown locator type {guid_str(ltype)}")
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(item):
        raise CorruptImage(path, f"metadata Parent Locator: {count} entries do not fit in the item")
    out: dict[str, str] = {}
    for i in range(count):
        koff, voff, klen, vlen = _LOCATOR_ENTRY.unpack_from(item, _LOCATOR_HEADER.size + i * _LOCATOR_ENTRY.size)
        if koff + klen > len(item) or voff + vlen > len(item) or klen == 0:
            raise CorruptImage(path, f"metadata Parent Locator: entry {i} key or value outside the item")
        try:
            key = item[koff : koff + klen].decode("utf-16-le")
            value = item[voff : voff + vlen].decode("utf-16-le")
        except UnicodeDecodeError:
            raise CorruptImage(path, f"metadata Parent Locator: entry {i} is not UTF-16LE") from None
        if key in out:
            raise CorruptImage(path, f"metadata Parent Locator: key {key!r} listed twice")
        out[key] = value
    if "parent_linkage" not in out:
        raise CorruptImage(path, "metadata Parent Locator: no parent_linkage")
    if not any(k in out for k in ("relative_path", "volume_path", "absolute_win32_path")):
        raise CorruptImage(path, "metadata Parent Locator: no parent path")
    return out


def parse_linkage(path: str, value: str) -> bytes:
    """A parent_linkage value "{GUID}" as on-disk GUID bytes."""
    try:
        return uuid.UUID(value.strip().strip("{}")).bytes_le
    except ValueError:
        raise CorruptImage(path, f"metadata Parent Locator: parent_linkage {value!r} is not a GUID") from None
