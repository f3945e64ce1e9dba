"""qcow2 header and header extensions: decoding and the open-time validation checklist.

Owns ``Header`` (every field of the version 2/3 header, decoded in one ``struct`` call, names as
in qemu's docs/interop/qcow2.rst), the parsed header extensions, and ``parse_header`` which
applies the bad-input checklist (docs/qcow2.md, "Opening") before anything else trusts a field.

Invariants after ``parse_header`` returns:
  * version is 2 or 3; 9 <= cluster_bits <= 21; refcount_order <= 6;
  * every table offset the header names (L1, refcount table, snapshot table) is cluster aligned,
    non-zero and its size is within the caps below; the snapshot table lies inside the file;
  * an L1 or refcount table reaching past the end of the file is not refused (QEMU reads the
    missing part as zeroes) but recorded in ``doubts``, and the driver serves such an image
    read-only with a warning naming the field;
  * no unknown incompatible feature bit is set; compression_type agrees with its feature bit;
  * the extension area is well formed (each extension inside it, exact lengths where fixed);
  * the backing file name holds no NUL byte (trailing NUL padding is dropped; a NUL with more
    bytes after it is refused: QEMU would silently use the shorter name).

The header is never rewritten as a whole: updates (feature bits, refcount table location) are
small in-place writes of the changed fields (``FIELD_*`` offsets), so unknown header fields and
unknown extensions are preserved byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...errors import CorruptImage, ImageError, UnsupportedImage

MAGIC = b"QFI\xfb"

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 bytes at offset 72

# In-place update offsets.
FIELD_INCOMPATIBLE = 72
FIELD_AUTOCLEAR = 88
FIELD_REFCOUNT_TABLE = 48  # refcount_table_offset (u64) + refcount_table_clusters (u32)

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# Header extension types.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Caps (QEMU's limits): tables larger than these are refused before any memory is allocated.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56  # host offsets are 56-bit fields
MAX_CRYPTO_HEADER = 16 << 20  # a LUKS1 header with 8 keyslots of 64-byte keys takes about 2 MiB


MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmap_directory: tuple[int, int, int] | None = None  # (offset, size in bytes, count)
    crypto_header: tuple[int, int] | None = None  # LUKS header clusters (offset, length in bytes)
    unknown_extensions: list[int] = field(default_factory=list)
    doubts: list[str] = field(default_factory=list)  # unusual but readable: serve read-only

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (an extended entry is 16 bytes)."""
        return self.cluster_size // (16 if self.extended_l2 else 8)


def l1_entries_needed(size: int, cluster_bits: int, l2_entries: int) -> int:
    span = (1 << cluster_bits) * l2_entries
    return -(-size // span)


def _aligned(h: Header, value: int) -> bool:
    return value & (h.cluster_size - 1) == 0


def parse_header(path: str, head: bytes, read, file_size: int) -> Header:
    """Decode and validate the header.  ``head`` is the file's first bytes (>= 104 if present);
    ``read(offset, length)`` reads more of the first cluster (extensions, backing name)."""
    if len(head) < _V2.size or head[:4] != MAGIC:
        raise ImageError(path, "not a qcow2 image (bad magic)")
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _V2.unpack_from(head, 0)
    if version not in (2, 3):
        raise UnsupportedImage(path, f"qcow2 version {version} is not supported (only 2 and 3)")
    h = Header(
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    )
    if version == 3:
        if len(head) < _V2.size + _V3.size:
            raise CorruptImage(path, "qcow2 v3 header truncated")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = _V3.unpack_from(head, _V2.size)
        if h.header_length < 104:
            raise CorruptImage(path, f"header_length {h.header_length} too short (minimum 104)")
        if h.header_length % 8:
            raise CorruptImage(path, f"header_length {h.header_length} is not a multiple of 8")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise UnsupportedImage(path, f"cluster_bits {cluster_bits} out of range (9..21: 512 B to 2 MiB)")
    cs = h.cluster_size
    if h.header_length > cs:
        raise CorruptImage(path, f"header_length {h.header_length} larger than the cluster size")
    if h.refcount_order > 6:
        raise CorruptImage(path, f"refcount_order {h.refcount_order} too large (maximum 6: 64-bit refcounts)")
    if version == 3 and h.header_length > 104:
        byte = head[104:105] or read(104, 1)
        if not byte:
            raise CorruptImage(path, "header truncated before compression_type")
        h.compression_type = byte[0]
    if h.compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise UnsupportedImage(path, f"unknown compression_type {h.compression_type}")
    if bool(h.compression_type) != bool(h.incompatible_features & INCOMPAT_COMPRESSION):
        raise CorruptImage(path, "compression_type and the compression-type incompatible bit disagree")
    if h.extended_l2 and cluster_bits < 14:
        raise CorruptImage(path, "extended_l2 needs a cluster size of at least 16 KiB")
    if crypt_method not in (0, 1, 2):
        raise UnsupportedImage(path, f"unknown encryption method (crypt_method {crypt_method})")
    if h.incompatible_features & INCOMPAT_DATA_FILE:
        raise UnsupportedImage(path, "external data file images are not supported")
    if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        raise CorruptImage(path, "data_file_raw autoclear bit set without an external data file")
    if size >= 1 << 63:
        raise CorruptImage(path, f"size {size} out of range")
    # Tables: alignment, caps, within the file.
    if refcount_table_clusters == 0:
        raise CorruptImage(path, "refcount_table_clusters is 0 (no refcount table)")
    if refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImage(path, f"refcount_table_clusters {refcount_table_clusters} too large (cap 8 MiB)")
    _check_table(
        h, path, "refcount_table_offset", refcount_table_offset, refcount_table_clusters * cs, file_size, doubt=True
    )
    if l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImage(path, f"l1_size {l1_size} too large (cap 32 MiB)")
    if l1_size < l1_entries_needed(size, cluster_bits, h.l2_entries):
        raise CorruptImage(path, f"l1_size {l1_size} too small for size {size}")
    if l1_size:
        _check_table(h, path, "l1_table_offset", l1_table_offset, l1_size * 8, file_size, doubt=True)
    if nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(path, f"nb_snapshots {nb_snapshots} too large (cap {MAX_SNAPSHOTS})")
    if nb_snapshots:
        _check_table(h, path, "snapshots_offset", snapshots_offset, 40, file_size)
    # Backing file name.
    if backing_file_offset:
        if backing_file_offset > cs:
            raise CorruptImage(path, f"backing_file_offset 0x{backing_file_offset:x} beyond the first cluster")
        if backing_file_size > min(MAX_BACKING_NAME, cs - backing_file_offset):
            raise CorruptImage(path, f"backing_file_size {backing_file_size} too large")
        raw_name = bytes(read(backing_file_offset, backing_file_size))
        if len(raw_name) != backing_file_size:
            raise CorruptImage(path, "backing file name extends past end of file")
        h.backing_file = _c_string(path, "backing file name", raw_name).decode("utf-8", "surrogateescape")
    _parse_extensions(h, path, read)
    if h.crypto_header is not None:
        off, length = h.crypto_header
        if not off or not _aligned(h, off) or not 0 < length <= MAX_CRYPTO_HEADER or off + length > file_size:
            raise CorruptImage(
                path, f"encryption header at 0x{off:x} (+{length} bytes) misplaced or beyond end of file"
            )
    elif crypt_method == 2:
        raise CorruptImage(path, "LUKS encryption (crypt_method 2) without the full-disk encryption header extension")
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(h.feature_names.get((0, b), f"bit {b}") for b in bits)
        raise UnsupportedImage(path, f"unsupported incompatible_features 0x{unknown:x} ({names})")
    return h


def _c_string(path: str, what: str, raw: bytes) -> bytes:
    """A name QEMU reads as a C string: NUL padding at the end is dropped (unambiguous); a NUL
    with more bytes after it is refused (QEMU would silently use a different, shorter name)."""
    name = raw.rstrip(b"\0")
    if b"\0" in name:
        raise CorruptImage(path, f"{what} contains a NUL byte at {name.index(0)} ({name[:40]!r})")
    return name


def _check_table(
    h: Header, path: str, name: str, offset: int, length: int, file_size: int, *, doubt: bool = False
) -> None:
    """Alignment and placement of a table; past EOF is an error, or with ``doubt`` a doubt."""
    if not _aligned(h, offset):
        raise CorruptImage(path, f"{name} 0x{offset:x} is not cluster aligned")
    if offset == 0:
        raise CorruptImage(path, f"{name} is 0 (overlaps the header)")
    if offset >= MAX_HOST_OFFSET:
        raise CorruptImage(path, f"{name} 0x{offset:x} beyond the largest host offset")
    if offset + length > file_size:
        what = f"{name} 0x{offset:x} (+{length} bytes) extends beyond end of file"
        if not doubt:
            raise CorruptImage(path, what)
        h.doubts.append(f"{what} (read as zeroes)")


def _parse_extensions(h: Header, path: str, read) -> None:
    start = 72 if h.version == 2 else h.header_length
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    if end <= start:
        return
    area = bytes(read(start, end - start))
    pos = 0
    while pos + 8 <= len(area):
        ext_type, ext_len = struct.unpack_from(">II", area, pos)
        pos += 8
        if ext_type == EXT_END:
            return
        if pos + ext_len > len(area):
            raise CorruptImage(path, f"header extension 0x{ext_type:08x} too large (runs past the extension area)")
        data = area[pos : pos + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len >= 16:
                raise CorruptImage(path, f"backing format extension too long ({ext_len} bytes)")
            h.backing_format = _c_string(path, "backing format name", data).decode("ascii", "replace")
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(0, ext_len - 47, 48):
                kind, bit = data[i], data[i + 1]
                h.feature_names[(kind, bit)] = data[i + 2 : i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
        elif ext_type == EXT_BITMAPS:
            if ext_len != 24:
                raise CorruptImage(path, f"bitmaps extension length {ext_len} (must be 24)")
            nb, reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", data)
            if not 1 <= nb <= 65535 or reserved or dir_size > 64 << 20 or not _aligned(h, dir_offset) or not dir_offset:
                raise CorruptImage(path, "bitmaps extension invalid (count, reserved, directory size or offset)")
            h.bitmap_directory = (dir_offset, dir_size, nb)
        elif ext_type == EXT_CRYPTO:
            if h.crypt_method != 2:
                raise CorruptImage(path, "full-disk encryption header extension in an image not encrypted with LUKS")
            if ext_len != 16:
                raise CorruptImage(path, f"full-disk encryption header extension length {ext_len} (must be 16)")
            h.crypto_header = struct.unpack_from(">QQ", data)
        elif ext_type == EXT_DATA_FILE:
            raise UnsupportedImage(path, "external data file images are not supported")
        else:
            h.unknown_extensions.append(ext_type)
        pos += (ext_len + 7) & ~7
    # Ran out of space without an end marker: the rest of the area is implicitly unused.
