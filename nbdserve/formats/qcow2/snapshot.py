"""qcow2 internal snapshots: the snapshot table, listed and looked up by name or id.

Owns ``Snapshot`` (one table entry) and ``read_snapshots`` (the bounded walk of the table named
by the header).  Serving a snapshot means reading through its L1 table, read-only; the driver
does that with the L1 loaded here.

Invariants: the walk never reads past ``nb_snapshots`` entries or 64 MiB of table; every entry
has extra_size <= 1024 (v3: >= 16), its id and name inside the table, and an L1 table that is
cluster aligned, within the 32 MiB cap and inside the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import CorruptImage
from ...storage.base import Storage, read_at
from .header import MAX_L1_BYTES, Header

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_TABLE_BYTES = 64 << 20
MAX_EXTRA = 1024


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    disk_size: int | None  # from the extra data, when present
    vm_state_size: int
    date_sec: int


async def read_snapshots(path: str, h: Header, file: Storage) -> tuple[list[Snapshot], int]:
    """The snapshot table's entries and its length in bytes."""
    out: list[Snapshot] = []
    pos = h.snapshots_offset
    end_cap = h.snapshots_offset + MAX_TABLE_BYTES
    cs = h.cluster_size
    for i in range(h.nb_snapshots):
        if pos + _ENTRY.size > min(file.size, end_cap):
            raise CorruptImage(path, f"snapshot table entry {i} extends beyond end of file or the 64 MiB cap")
        l1_off, l1_size, id_len, name_len, date_sec, _nsec, _clock, vm_state, extra_size = _ENTRY.unpack(
            await read_at(file, pos, _ENTRY.size)
        )
        if extra_size > MAX_EXTRA:
            raise CorruptImage(path, f"snapshot {i}: extra_size {extra_size} too large (cap {MAX_EXTRA})")
        if h.version >= 3 and extra_size < 16:
            raise CorruptImage(path, f"snapshot {i}: extra_size {extra_size} too small for a v3 image")
        var_len = extra_size + id_len + name_len
        if pos + _ENTRY.size + var_len > min(file.size, end_cap):
            raise CorruptImage(path, f"snapshot {i}: id or name extends beyond the snapshot table")
        var = await read_at(file, pos + _ENTRY.size, var_len)
        extra = var[:extra_size]
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16 else None
        if extra_size >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0] or vm_state
        sid = var[extra_size : extra_size + id_len].decode("utf-8", "replace")
        name = var[extra_size + id_len :].decode("utf-8", "replace")
        if l1_off & (cs - 1):
            raise CorruptImage(path, f"snapshot {sid!r}: L1 table offset 0x{l1_off:x} is not cluster aligned")
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(path, f"snapshot {sid!r}: l1_size {l1_size} too large (cap 32 MiB)")
        if l1_size and l1_off + l1_size * 8 > file.size:
            raise CorruptImage(path, f"snapshot {sid!r}: L1 table extends beyond end of file")
        out.append(Snapshot(sid, name, l1_off, l1_size, disk_size, vm_state, date_sec))
        pos += (_ENTRY.size + var_len + 7) & ~7
    return out, pos - h.snapshots_offset


def find_snapshot(snapshots: list[Snapshot], key: str) -> Snapshot | None:
    """By id first, then by name (as ``qemu-nbd -l`` does)."""
    for s in snapshots:
        if s.id == key:
            return s
    for s in snapshots:
        if s.name == key:
            return s
    return None
