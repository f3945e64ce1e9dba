"""Test-only VHD writer and verifier, written from the VHD specification (no QEMU involved).

``build`` makes dynamic and differencing images with chosen blocks, sector bitmaps, parent
locators and geometry, so tests can produce what QEMU cannot (differencing chains, partial
bitmaps, other block sizes) and hostile variants (patch a field, optionally fix the checksums).
``verify`` is the structural checker used after nbdserve wrote an image (``qemu-img check`` does
not support vpc): footer checksum, footer copy equal to the trailing footer, BAT entries inside
the file, blocks not overlapping each other or the metadata, file ending with the footer.

Layout written: footer copy @0, dynamic header @512, BAT @1536 (padded with 0xFF to 512),
parent locator data after the BAT (one sector-aligned area each), then the blocks in BAT order,
then the trailing footer.
"""

from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass, field

SECTOR = 512
UNALLOCATED = 0xFFFFFFFF
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
DYN = struct.Struct(">8sQQIIII16sII512s")
LOCATOR = struct.Struct(">4sIIIQ")


def checksum(buf: bytes | bytearray, at: int) -> int:
    return ~(sum(buf) - sum(buf[at : at + 4])) & 0xFFFFFFFF


def geometry(sectors: int) -> tuple[int, int, int]:
    """CHS for a sector count (VHD specification appendix)."""
    sectors = min(sectors, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads, cth = 31, 16, sectors // 31
        if cth >= heads * 1024:
            spt, heads, cth = 63, 16, sectors // 63
    return cth // heads, heads, spt


@dataclass
class Block:
    """One allocated block: ``data`` (block_size bytes or shorter, zero-padded) and its bitmap.

    ``sectors``: the set bits (sector indexes in the block); None = all sectors present.
    """

    data: bytes
    sectors: set[int] | None = None


@dataclass
class Spec:
    size: int
    disk_type: int = 3
    block_size: int = 2 << 20
    blocks: dict[int, Block] = field(default_factory=dict)
    unique_id: uuid.UUID = field(default_factory=uuid.uuid4)
    creator_app: bytes = b"qem2"
    geometry: tuple[int, int, int] | None = None  # None: from size (CHS max for qem2, as QEMU)
    max_table_entries: int | None = None
    parent_uuid: uuid.UUID | None = None
    parent_name: str = ""
    locators: list[tuple[bytes, str]] = field(default_factory=list)  # (platform code, path)
    trailing_footer: bool = True


def bitmap_size(block_size: int) -> int:
    return -(-(block_size // SECTOR) // (8 * SECTOR)) * SECTOR


def footer_bytes(spec: Spec) -> bytes:
    if spec.geometry is not None:
        geo = spec.geometry
    elif spec.creator_app == b"qem2":
        geo = (65535, 16, 255)
    else:
        geo = geometry(spec.size // SECTOR)
    data_offset = 0xFFFFFFFFFFFFFFFF if spec.disk_type == 2 else 512
    raw = bytearray(512)
    FOOTER.pack_into(
        raw, 0, b"conectix", 2, 0x10000, data_offset, 0, spec.creator_app, 0x50003, b"Wi2k",
        spec.size, spec.size, *geo, spec.disk_type, 0, spec.unique_id.bytes, 0,
    )  # fmt: skip
    struct.pack_into(">I", raw, 64, checksum(raw, 64))
    return bytes(raw)


def build(spec: Spec) -> bytearray:
    """The bytes of a dynamic (3) or differencing (4) VHD described by ``spec``."""
    bs = spec.block_size
    entries = spec.max_table_entries if spec.max_table_entries is not None else -(-spec.size // bs)
    bat_at = 1536
    pos = bat_at + -(-entries * 4 // SECTOR) * SECTOR
    locs = []
    for code, text in spec.locators:
        data = text.encode("utf-8" if code in (b"MacX", b"Mac ") else "utf-16-le")
        space = -(-len(data) // SECTOR) * SECTOR
        locs.append((code, space // SECTOR, len(data), pos, data))
        pos += max(space, SECTOR)
    bm_size = bitmap_size(bs)
    bat = [UNALLOCATED] * entries
    out = bytearray(pos)
    for idx in sorted(spec.blocks):
        blk = spec.blocks[idx]
        bat[idx] = pos // SECTOR
        bm = bytearray(bm_size)
        for s in range(bs // SECTOR) if blk.sectors is None else blk.sectors:
            bm[s >> 3] |= 0x80 >> (s & 7)
        out += bm + blk.data.ljust(bs, b"\0")
        pos += bm_size + bs
    foot = footer_bytes(spec)
    out[0:512] = foot
    dyn = bytearray(1024)
    name = spec.parent_name.encode("utf-16-be")
    DYN.pack_into(
        dyn, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, bat_at, 0x10000, entries, bs, 0,
        (spec.parent_uuid or uuid.UUID(int=0)).bytes, 0, 0, name,
    )  # fmt: skip
    for i, (code, space, length, off, _) in enumerate(locs):
        LOCATOR.pack_into(dyn, 576 + 24 * i, code, space, length, 0, off)
    struct.pack_into(">I", dyn, 36, checksum(dyn, 36))
    out[512:1536] = dyn
    batb = b"".join(struct.pack(">I", x) for x in bat)
    out[bat_at : bat_at + len(batb)] = batb
    out[bat_at + len(batb) : bat_at + -(-len(batb) // SECTOR) * SECTOR] = b"\xff" * (-len(batb) % SECTOR)
    for _, _, _, off, data in locs:
        out[off : off + len(data)] = data
    if spec.trailing_footer:
        out += foot
    return out


def write(path, spec: Spec) -> bytearray:
    buf = build(spec)
    with open(path, "wb") as f:
        f.write(buf)
    return buf


def fix_checksums(buf: bytearray) -> None:
    """Recompute the checksums of the footer copy, the trailing footer and the dynamic header."""
    for at in (0, len(buf) - 512):
        if buf[at : at + 8] == b"conectix":
            struct.pack_into(">I", buf, at + 64, checksum(buf[at : at + 512], 64))
    if buf[512:520] == b"cxsparse":
        struct.pack_into(">I", buf, 512 + 36, checksum(buf[512:1536], 36))


def patch_footers(buf: bytearray, offset: int, fmt: str, value) -> None:
    """Set a footer field in both footer copies (offset within the footer) and fix checksums."""
    for at in (0, len(buf) - 512):
        if buf[at : at + 8] == b"conectix":
            struct.pack_into(fmt, buf, at + offset, value)
    fix_checksums(buf)


def expected(spec: Spec, parent: bytes | None = None) -> bytes:
    """The disk contents ``spec`` describes (clear bits read ``parent`` or zeroes)."""
    bs = spec.block_size
    out = bytearray(parent[: spec.size] if parent is not None else b"").ljust(spec.size, b"\0")
    for idx, blk in spec.blocks.items():
        data = blk.data.ljust(bs, b"\0")
        for s in range(bs // SECTOR):
            at = idx * bs + s * SECTOR
            if at >= spec.size:
                break
            if blk.sectors is None or s in blk.sectors:
                out[at : at + SECTOR] = data[s * SECTOR : (s + 1) * SECTOR]
    return bytes(out)


def verify(path) -> None:
    """Structural check of a dynamic/differencing VHD; raises AssertionError naming the problem."""
    with open(path, "rb") as f:
        buf = f.read()
    assert len(buf) >= 2048, f"{path}: too short"
    tail = buf[-512:]
    assert tail[:8] == b"conectix", f"{path}: file does not end with a footer"
    assert struct.unpack_from(">I", tail, 64)[0] == checksum(tail, 64), f"{path}: trailing footer checksum"
    assert buf[:512] == tail, f"{path}: footer copy at 0 differs from the trailing footer"
    dyn_at = struct.unpack_from(">Q", tail, 16)[0]
    dyn = buf[dyn_at : dyn_at + 1024]
    assert dyn[:8] == b"cxsparse", f"{path}: dynamic header cookie"
    assert struct.unpack_from(">I", dyn, 36)[0] == checksum(dyn, 36), f"{path}: dynamic header checksum"
    table, _, entries, bs = struct.unpack_from(">QIII", dyn, 16)
    span = bitmap_size(bs) + bs
    intervals = [(0, 512), (dyn_at, dyn_at + 1024), (table, table + 4 * entries), (len(buf) - 512, len(buf))]
    for i in range(entries):
        e = struct.unpack_from(">I", buf, table + 4 * i)[0]
        if e != UNALLOCATED:
            assert e * SECTOR + span <= len(buf) - 512, f"{path}: BAT entry {i} past the trailing footer"
            intervals.append((e * SECTOR, e * SECTOR + span))
    intervals.sort()
    for (s0, e0), (s1, _) in itertools.pairwise(intervals):
        assert s1 >= e0, f"{path}: region at 0x{s1:x} overlaps 0x{s0:x}-0x{e0:x}"


def layout(path) -> tuple[int, dict[int, tuple[int, bytes]]]:
    """(block_size, {BAT index: (file offset of the block's data, its sector bitmap)}) of a
    dynamic or differencing VHD as the file holds it now (read from the specification's layout,
    not through nbdserve)."""
    with open(path, "rb") as f:
        buf = f.read()
    dyn_at = struct.unpack_from(">Q", buf, len(buf) - 512 + 16)[0]
    table, _, entries, bs = struct.unpack_from(">QIII", buf, dyn_at + 16)
    bm = bitmap_size(bs)
    out = {}
    for i in range(entries):
        e = struct.unpack_from(">I", buf, table + 4 * i)[0]
        if e != UNALLOCATED:
            out[i] = (e * SECTOR + bm, bytes(buf[e * SECTOR : e * SECTOR + bm]))
    return bs, out


def chain(tmp, rng, *, levels: int, size: int = 4 << 20, block_size: int = 256 << 10) -> tuple[list, list[bytes]]:
    """A dynamic base and ``levels - 1`` differencing children named ``layer0.vhd`` ..., each
    block unallocated, whole, or with a random sector bitmap over a random payload (with zero
    stretches).  Returns the file paths, base first, and each layer's disk contents."""
    import os

    paths: list[str] = []
    models: list[bytes] = []
    parent: Spec | None = None
    for level in range(levels):
        blocks = {}
        for idx in range(-(-size // block_size)):
            r = rng.random()
            if r < 0.3:
                continue
            payload = bytearray(rng.randbytes(block_size))
            at = rng.randrange(block_size)
            payload[at : at + block_size // 3] = bytes(len(payload[at : at + block_size // 3]))
            whole = level == 0 or r < 0.45
            sectors = None if whole else {s for s in range(block_size // SECTOR) if rng.random() < 0.5}
            blocks[idx] = Block(bytes(payload), sectors)
        path = os.path.join(tmp, f"layer{level}.vhd")
        if parent is None:
            spec = Spec(size, block_size=block_size, blocks=blocks)
        else:
            name = os.path.basename(paths[-1])
            spec = Spec(
                size, disk_type=4, block_size=block_size, blocks=blocks, parent_uuid=parent.unique_id,
                parent_name=name, locators=[(b"W2ru", ".\\" + name)],
            )  # fmt: skip
        write(path, spec)
        models.append(expected(spec, models[-1] if models else None))
        paths.append(path)
        parent = spec
    return paths, models
