"""Test generator for VMDK images QEMU cannot make: seSparse extents and VMware-style
streamOptimized files (grain directory at the end, read through the footer).

Written from the layout in docs/vmdk.md, independently of the driver (it shares no code with
``nbdserve.formats.vmdk``).  ``expected_*`` give the disk each spec describes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
K = 1024
M = 1024 * K


def descriptor(
    create_type: str, extents: list[str], *, cid: int = 0x1234ABCD, parent: tuple[str, int] | None = None
) -> str:
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid:08x}"]
    lines.append(f"parentCID={parent[1]:08x}" if parent else "parentCID=ffffffff")
    lines.append(f'createType="{create_type}"')
    if parent:
        lines.append(f'parentFileNameHint="{parent[0]}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", 'ddb.adapterType = "lsilogic"']
    return "\n".join(lines) + "\n"


# -- seSparse ---------------------------------------------------------------------------------

SE_GRAIN = 4 * K
SE_GT_ENTRIES = 4096
SE_SPAN = SE_GT_ENTRIES * SE_GRAIN
ZERO = "zero"
UNMAPPED = "unmapped"


@dataclass
class SeSparse:
    capacity: int  # bytes, a multiple of 4 KiB
    grains: dict[int, bytes | str] = field(default_factory=dict)  # grain index -> 4 KiB | ZERO | UNMAPPED
    first_cluster: int = 5000  # grain slots are numbered from here (exercises the split index)
    pad: bytes = b""  # non-zero: corrupt the constant header's padding
    replay: int = 0  # volatile header replay_journal


def write_sesparse(path: Path, spec: SeSparse) -> None:
    """The extent file (no descriptor) for ``spec``."""
    n_gd = -(-spec.capacity // SE_SPAN)
    tables = sorted({g // SE_GT_ENTRIES for g in spec.grains})
    data_grains = sorted(g for g, v in spec.grains.items() if isinstance(v, bytes))
    gd_at, gd_sectors = 4, max(1, -(-n_gd * 8 // SECTOR))
    gt_at = gd_at + gd_sectors
    gt_sectors = max(1, len(tables)) * 64
    bitmap_at = gt_at + gt_sectors
    backmap_at = bitmap_at + 1
    grains_at = backmap_at + 1
    slots = spec.first_cluster + len(data_grains)
    grains_sectors = slots * 8
    const = [0xCAFEBABE, 0x200000001, spec.capacity // SECTOR, 8, 64, 0, 0, 0, 0, 0]
    const += [1, 1, 2, 1, 3, 1, gd_at, gd_sectors, gt_at, gt_sectors, bitmap_at, 1, backmap_at, 1, grains_at]
    const += [grains_sectors]
    head = struct.pack("<26Q", *const).ljust(SECTOR, b"\0")
    if spec.pad:
        head = head[: SECTOR - len(spec.pad)] + spec.pad
    volatile = struct.pack("<4Q", 0xCAFECAFE, 0, 1, spec.replay).ljust(SECTOR, b"\0")
    gd = bytearray(gd_sectors * SECTOR)
    gts = bytearray(gt_sectors * SECTOR)
    for k, t in enumerate(tables):
        struct.pack_into("<Q", gd, 8 * t, 0x1000000000000000 | k)
    with open(path, "wb") as f:
        f.truncate((grains_at + grains_sectors) * SECTOR)
        f.write(head)
        f.write(volatile)
        for g, v in spec.grains.items():
            t = tables.index(g // SE_GT_ENTRIES)
            at = t * SE_GT_ENTRIES * 8 + (g % SE_GT_ENTRIES) * 8
            if v == ZERO:
                e = 0x2000000000000000
            elif v == UNMAPPED:
                e = 0x1000000000000000
            else:
                c = spec.first_cluster + len(data_grains) - 1 - data_grains.index(g)  # reversed slots
                e = 0x3000000000000000 | ((c & 0xFFF) << 48) | (c >> 12)
                f.seek((grains_at + c * 8) * SECTOR)
                f.write(v)
            struct.pack_into("<Q", gts, at, e)
        f.seek(gd_at * SECTOR)
        f.write(gd)
        f.seek(gt_at * SECTOR)
        f.write(gts)


def expected_sesparse(spec: SeSparse, parent: bytes | None = None) -> bytes:
    out = bytearray(parent[: spec.capacity] if parent else bytes(spec.capacity))
    out += bytes(spec.capacity - len(out))
    for g, v in spec.grains.items():
        out[g * SE_GRAIN : (g + 1) * SE_GRAIN] = v if isinstance(v, bytes) else bytes(SE_GRAIN)
    return bytes(out)


# -- VMware-style streamOptimized ---------------------------------------------------------------

GRAIN = 64 * K
GTES = 512


def write_stream(path: Path, capacity: int, grains: dict[int, bytes], *, text: str | None = None) -> None:
    """A streamOptimized extent with the GD at the end: header (gdOffset = ~0), descriptor,
    compressed grains with markers, GT markers + tables (only non-empty ones), GD marker + GD,
    footer marker + footer, end-of-stream marker."""
    sectors = capacity // SECTOR
    n_gd = -(-sectors // (GTES * 128))
    text = text or descriptor("streamOptimized", [f'RW {sectors} SPARSE "{path.name}"'])
    desc = text.encode().ljust(20 * SECTOR, b"\0")

    def header(gd_offset: int) -> bytes:
        fields = (b"KDMV", 3, 0x30001, sectors, 128, 1, 20, GTES, 0, gd_offset, 128, 0, b"\n \r\n", 1)
        return struct.pack("<4sIIQQQQIQQQB4sH", *fields).ljust(SECTOR, b"\0")

    def meta(n: int, kind: int) -> bytes:
        return struct.pack("<QII", n, 0, kind).ljust(SECTOR, b"\0")

    out = bytearray(header(0xFFFFFFFFFFFFFFFF) + desc)
    out += bytes(128 * SECTOR - len(out))
    where: dict[int, int] = {}
    for g in sorted(grains):
        where[g] = len(out) // SECTOR
        packed = zlib.compress(grains[g])
        blob = struct.pack("<QI", g * 128, len(packed)) + packed
        out += blob + bytes(-len(blob) % SECTOR)
    gd = [0] * n_gd
    for t in sorted({g // GTES for g in grains}):
        out += meta(4, 1)
        gd[t] = len(out) // SECTOR
        table = [0] * GTES
        for g in grains:
            if g // GTES == t:
                table[g % GTES] = where[g]
        out += struct.pack(f"<{GTES}I", *table)
    gd_sectors = -(-n_gd * 4 // SECTOR)
    out += meta(gd_sectors, 2)
    gd_at = len(out) // SECTOR
    out += struct.pack(f"<{n_gd}I", *gd).ljust(gd_sectors * SECTOR, b"\0")
    out += meta(1, 3) + header(gd_at) + meta(0, 0)
    path.write_bytes(out)


def expected_stream(capacity: int, grains: dict[int, bytes]) -> bytes:
    out = bytearray(capacity)
    for g, v in grains.items():
        out[g * GRAIN : g * GRAIN + len(v)] = v
    return bytes(out)
