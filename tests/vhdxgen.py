"""Test-only VHDX writer: builds images byte by byte, independently of nbdserve's parser.

It makes what QEMU cannot: 4096-byte logical sectors, differencing disks with parent locators
and sector bitmaps, hand-built logs (several entries, wrapped, torn, bad CRC) and hostile
variants (every field can be overwritten after building).  Images made with 512-byte sectors
and no parent are checked against QEMU in the tests, which validates this writer.

Layout: header section (1 MiB) | log (log_length) | BAT region | metadata region (1 MiB) | blocks.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field

import crc32c

MiB = 1 << 20
KiB = 1 << 10
BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746").bytes_le
LOGICAL_SECTOR = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").bytes_le
PHYSICAL_SECTOR = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556").bytes_le
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913").bytes_le


def crc_fill(buf: bytearray, at: int, end: int | None = None) -> None:
    """Store CRC-32C of buf[:end] (checksum field at ``at`` zeroed) at ``at``."""
    end = len(buf) if end is None else end
    buf[at : at + 4] = bytes(4)
    struct.pack_into("<I", buf, at, crc32c.crc32c(bytes(buf[:end])))


def guid_text(g: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=g)) + "}"


@dataclass
class Vhdx:
    path: str
    size: int
    block_size: int = MiB
    lss: int = 512
    pss: int = 4096
    has_parent: bool = False
    leave_allocated: bool = False
    log_length: int = MiB
    locator: dict[str, str] = field(default_factory=dict)
    data_write_guid: bytes = field(default_factory=lambda: uuid.uuid4().bytes_le)
    seq: int = 10

    def __post_init__(self) -> None:
        self.chunk_ratio = (1 << 23) * self.lss // self.block_size
        n = -(-self.size // self.block_size)
        if self.has_parent:
            self.entries = -(-n // self.chunk_ratio) * (self.chunk_ratio + 1)
        else:
            self.entries = n + (n - 1) // self.chunk_ratio
        self.log_offset = MiB
        self.bat_offset = self.log_offset + self.log_length
        self.bat_length = max(MiB, -(-self.entries * 8 // MiB) * MiB)
        self.metadata_offset = self.bat_offset + self.bat_length
        self.end = self.metadata_offset + MiB
        self.log_guid = bytes(16)
        with open(self.path, "wb") as f:
            f.truncate(self.end)
        self.write(0, b"vhdxfile" + "nbdserve tests".encode("utf-16-le"))
        self.write_header(0, self.seq, self.log_guid)
        self.write_header(1, self.seq + 1, self.log_guid)
        for off in (192 * KiB, 256 * KiB):
            self.write_region_table(
                off, [(BAT_GUID, self.bat_offset, self.bat_length, 1), (METADATA_GUID, self.metadata_offset, MiB, 1)]
            )
        self.write_metadata()

    # -- raw access -------------------------------------------------------------------------

    def write(self, off: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)

    def read(self, off: int, n: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    # -- structures -------------------------------------------------------------------------

    def write_header(
        self,
        slot: int,
        seq: int,
        log_guid: bytes,
        *,
        version: int = 1,
        corrupt: bool = False,
        log_offset: int | None = None,
        log_length: int | None = None,
    ) -> None:
        buf = bytearray(4 * KiB)
        struct.pack_into(
            "<4sIQ16s16s16sHHIQ",
            buf,
            0,
            b"head",
            0,
            seq,
            uuid.uuid4().bytes_le,
            self.data_write_guid,
            log_guid,
            0,
            version,
            self.log_length if log_length is None else log_length,
            self.log_offset if log_offset is None else log_offset,
        )
        crc_fill(buf, 4)
        if corrupt:
            buf[100] ^= 1
        self.write((64 + 64 * slot) * KiB, bytes(buf))

    def write_region_table(self, off: int, entries: list[tuple[bytes, int, int, int]], corrupt: bool = False) -> None:
        buf = bytearray(64 * KiB)
        struct.pack_into("<4sIII", buf, 0, b"regi", 0, len(entries), 0)
        for i, (g, o, n, flags) in enumerate(entries):
            struct.pack_into("<16sQII", buf, 16 + 32 * i, g, o, n, flags)
        crc_fill(buf, 4)
        if corrupt:
            buf[20] ^= 1
        self.write(off, bytes(buf))

    def metadata_items(self) -> list[tuple[bytes, bytes, int]]:
        flags = (1 if self.leave_allocated else 0) | (2 if self.has_parent else 0)
        items = [
            (FILE_PARAMETERS, struct.pack("<II", self.block_size, flags), 4),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", self.size), 6),
            (PAGE83, uuid.uuid4().bytes_le, 6),
            (LOGICAL_SECTOR, struct.pack("<I", self.lss), 6),
            (PHYSICAL_SECTOR, struct.pack("<I", self.pss), 6),
        ]
        if self.has_parent:
            items.append((PARENT_LOCATOR, self.locator_bytes(), 6))
        return items

    def locator_bytes(self) -> bytes:
        keys = list(self.locator.items())
        head = struct.pack("<16sHH", VHDX_LOCATOR_TYPE, 0, len(keys))
        table = b""
        blob = b""
        base = len(head) + 12 * len(keys)
        for k, v in keys:
            kb, vb = k.encode("utf-16-le"), v.encode("utf-16-le")
            table += struct.pack("<IIHH", base + len(blob), base + len(blob) + len(kb), len(kb), len(vb))
            blob += kb + vb
        return head + table + blob

    def write_metadata(self, items: list[tuple[bytes, bytes, int]] | None = None) -> None:
        items = self.metadata_items() if items is None else items
        table = bytearray(64 * KiB)
        struct.pack_into("<8sHH", table, 0, b"metadata", 0, len(items))
        pos = 64 * KiB
        payload = bytearray()
        for i, (g, data, flags) in enumerate(items):
            struct.pack_into("<16sIII", table, 32 + 32 * i, g, pos + len(payload), len(data), flags)
            payload += data
            payload += bytes(-len(payload) % 8)
        self.write(self.metadata_offset, bytes(table) + bytes(payload))

    # -- BAT and blocks ---------------------------------------------------------------------

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, block: int) -> int:
        return (block // self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio

    def set_entry(self, index: int, value: int) -> None:
        self.write(self.bat_offset + 8 * index, struct.pack("<Q", value))

    def entry(self, index: int) -> int:
        return struct.unpack("<Q", self.read(self.bat_offset + 8 * index, 8))[0]

    def state(self, block: int) -> int:
        """Payload block ``block``'s BAT state as the file holds it now."""
        return self.entry(self.payload_index(block)) & 7

    def sector_bits(self, block: int) -> list[bool]:
        """The sector bitmap bits of payload block ``block`` as the file holds them now."""
        sb = self.entry(self.bitmap_index(block))
        per = self.block_size // self.lss
        first = (block % self.chunk_ratio) * per  # a multiple of 8: blocks hold >= 256 sectors
        raw = self.read((sb & ~0xFFFFF) + first // 8, per // 8)
        return [bool(raw[i // 8] >> (i % 8) & 1) for i in range(per)]

    def new_space(self, length: int) -> int:
        off = self.end
        self.end += -(-length // MiB) * MiB
        with open(self.path, "r+b") as f:
            f.truncate(self.end)
        return off

    def put_block(self, block: int, data: bytes, state: int = 6) -> int:
        """Allocate a payload block holding ``data`` (padded with zeroes) in ``state``."""
        off = self.new_space(self.block_size)
        self.write(off, data)
        self.set_entry(self.payload_index(block), off | state)
        return off

    def put_partial(self, block: int, data: bytes, present: list[bool]) -> None:
        """A PARTIALLY_PRESENT block: sector i comes from this file iff present[i]."""
        self.put_block(block, data, 7)
        sb_index = self.bitmap_index(block)
        sb = self.entry(sb_index)
        if sb & 7 != 6:
            sb = self.new_space(MiB) | 6
            self.set_entry(sb_index, sb)
        first = (block % self.chunk_ratio) * (self.block_size // self.lss)
        bits = bytearray(self.read((sb & ~0xFFFFF) + first // 8, -(-len(present) // 8) + 1))
        for i, p in enumerate(present):
            if p:
                bits[(first % 8 + i) // 8] |= 1 << ((first % 8 + i) % 8)
        self.write((sb & ~0xFFFFF) + first // 8, bytes(bits))

    # -- log --------------------------------------------------------------------------------

    def log_entry(
        self,
        pos: int,
        seq: int,
        tail: int,
        descs: list[tuple],
        *,
        guid: bytes | None = None,
        flushed: int | None = None,
        last: int | None = None,
        bad_crc: bool = False,
        torn: bool = False,
    ) -> int:
        """Write a log entry at log position ``pos`` (wrapping); returns the next position.

        ``descs``: ("data", file_offset, 4096 bytes) or ("zero", file_offset, length).
        """
        guid = self.log_guid if guid is None else guid
        n = len(descs)
        nd = -(-(n + 2) // 128)
        ndata = sum(1 for d in descs if d[0] == "data")
        length = (nd + ndata) * 4096
        buf = bytearray(length)
        flushed = self.end if flushed is None else flushed
        last = self.end if last is None else last
        struct.pack_into("<4sIIIQII16sQQ", buf, 0, b"loge", 0, length, tail, seq, n, 0, guid, flushed, last)
        at = nd * 4096
        for i, d in enumerate(descs):
            o = 64 + 32 * i
            if d[0] == "data":
                data = d[2]
                struct.pack_into(
                    "<4sIQQQ",
                    buf,
                    o,
                    b"desc",
                    struct.unpack_from("<I", data, 4092)[0],
                    struct.unpack_from("<Q", data)[0],
                    d[1],
                    seq,
                )
                struct.pack_into("<4sI", buf, at, b"data", seq >> 32)
                buf[at + 8 : at + 4092] = data[8:4092]
                struct.pack_into("<I", buf, at + 4092, seq & 0xFFFFFFFF)
                at += 4096
            else:
                struct.pack_into("<4sIQQQ", buf, o, b"zero", 0, d[2], d[1], seq)
        crc_fill(buf, 4)
        if bad_crc:
            buf[4] ^= 0xFF
        if torn:
            buf[-100:] = bytes(100)
        for s in range(length // 4096):
            p = (pos + s * 4096) % self.log_length
            self.write(self.log_offset + p, bytes(buf[s * 4096 : (s + 1) * 4096]))
        return (pos + length) % self.log_length

    def open_log(self, guid: bytes | None = None) -> bytes:
        """Set a log GUID in the current header (higher sequence), as after a crash."""
        self.log_guid = guid or uuid.uuid4().bytes_le
        self.seq += 2
        self.write_header(1, self.seq + 1, self.log_guid)
        return self.log_guid

    def bat_sector(self, index: int) -> tuple[int, bytearray]:
        """(file offset, current 4 KiB contents) of the BAT sector holding entry ``index``."""
        off = self.bat_offset + (index * 8) // 4096 * 4096
        return off, bytearray(self.read(off, 4096))


# -- differencing chains with a model ---------------------------------------------------------

NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7


def locator_for(parent: Vhdx) -> dict[str, str]:
    """A parent locator naming ``parent`` by its file name (relative to the child's directory)."""
    return {"parent_linkage": guid_text(parent.data_write_guid), "relative_path": os.path.basename(parent.path)}


def chain(
    tmp: str | os.PathLike,
    rng,
    *,
    levels: int,
    lss: int,
    size: int = 8 * MiB,
    block_size: int = MiB,
    top_runs: int = 1,
) -> tuple[list[Vhdx], list[bytes]]:
    """A base image and ``levels - 1`` differencing children over it, each block in a random
    state, with the disk contents MS-VHDX gives them: NOT_PRESENT reads the parent (zeroes in the
    base), UNDEFINED / ZERO / UNMAPPED read zeroes, FULLY_PRESENT the block, PARTIALLY_PRESENT
    sector by sector through the bitmap (1: this file, 0: the parent).

    Payloads are random bytes with zero stretches, so a parent often holds zeroes under a
    partially present block.  Bitmap runs in the top layer are multiples of ``top_runs`` sectors
    (the other layers' are single sectors).  Returns the layers, base first, and each layer's
    disk contents.
    """
    layers: list[Vhdx] = []
    models: list[bytes] = []
    model = bytearray(size)
    blocks = -(-size // block_size)
    per_block = block_size // lss
    for level in range(levels):
        top = level == levels - 1
        name = os.path.join(tmp, f"layer{level}.vhdx")
        if level == 0:
            g = Vhdx(name, size, block_size=block_size, lss=lss)
        else:
            g = Vhdx(name, size, block_size=block_size, lss=lss, has_parent=True, locator=locator_for(layers[-1]))
        for b in range(blocks):
            lo, hi = b * block_size, min(size, (b + 1) * block_size)
            payload = bytearray(rng.randbytes(block_size))
            for _ in range(rng.randrange(3)):  # zero stretches
                at = rng.randrange(block_size)
                end = min(block_size, at + rng.randrange(1, block_size // 2))
                payload[at:end] = bytes(end - at)
            payload = bytes(payload)
            states = [NOT_PRESENT, FULLY_PRESENT, ZERO, UNDEFINED, UNMAPPED]
            if level:
                states += [PARTIALLY_PRESENT] * 3
            state = rng.choice(states)
            if state == FULLY_PRESENT:
                g.put_block(b, payload)
                model[lo:hi] = payload[: hi - lo]
            elif state == PARTIALLY_PRESENT:
                run = top_runs if top else 1
                present: list[bool] = []
                while len(present) < per_block:
                    present += [rng.random() < 0.5] * (run * rng.randrange(1, 9))
                present = present[:per_block]
                g.put_partial(b, payload, present)
                for i, here in enumerate(present):
                    if here and lo + i * lss < hi:
                        model[lo + i * lss : lo + (i + 1) * lss] = payload[i * lss : (i + 1) * lss]
            elif state != NOT_PRESENT:
                g.set_entry(g.payload_index(b), state)
                model[lo:hi] = bytes(hi - lo)
        layers.append(g)
        models.append(bytes(model))
    return layers, models
