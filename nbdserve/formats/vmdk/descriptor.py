"""The VMDK text descriptor: parsing, validation and the in-place CID update.

Owns ``Descriptor`` (what a descriptor says: version, CID, parentCID, createType,
parentFileNameHint and the extent lines) and ``parse_descriptor``, which either returns one whose
values are safe to use or raises an ``ImageError`` naming the line or the key.  The format is
described in docs/vmdk.md ("The descriptor"); in short, ``#`` starts a comment, settings are
``key = value`` (values may be quoted) and an extent is ``ACCESS SECTORS TYPE ["FILE" [OFFSET]]``.

Limits (hostile input): a descriptor longer than ``MAX_DESCRIPTOR`` bytes or with more than
``MAX_EXTENTS`` extent lines is refused before anything is allocated for it; every line must be a
comment, a setting or an extent; sizes and offsets are bounded.

``cid_span`` is where the CID's hex digits sit in the raw bytes, so that the first write after
open can replace them with as many new digits (the text never shifts, the descriptor never
grows: a one-sector write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import CorruptImage, UnsupportedImage

MAX_DESCRIPTOR = 1 << 20  # bytes
MAX_EXTENTS = 4096
MAX_EXTENT_SECTORS = 1 << 40  # 512 TiB per extent
NO_PARENT = 0xFFFFFFFF

# createType values a separate descriptor file may carry (monolithicSparse and streamOptimized
# embed theirs in the sparse extent).
DESCRIPTOR_FILE_TYPES = (
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
)
EXTENT_TYPES = ("FLAT", "VMFS", "SPARSE", "VMFSSPARSE", "SESPARSE", "ZERO")
ACCESS = ("RW", "RDONLY")

_SETTING = re.compile(rb"^\s*([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")
_EXTENT = re.compile(rb'^\s*([A-Z]+)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')


@dataclass(frozen=True)
class ExtentLine:
    access: str  # RW or RDONLY
    sectors: int
    type: str  # one of EXTENT_TYPES
    name: str  # file name as written ("" for ZERO)
    offset: int  # FLAT: first sector inside the file
    line: int  # 1-based, for messages


@dataclass
class Descriptor:
    version: int
    create_type: str
    cid: int | None = None
    cid_span: tuple[int, int] | None = None  # [start, end) of the CID digits in the raw bytes
    parent_cid: int = NO_PARENT
    parent_hint: str | None = None
    extents: list[ExtentLine] = field(default_factory=list)


def looks_like_descriptor(head: bytes) -> bool:
    """True if the first non-comment, non-blank line is ``version=1``, ``2`` or ``3``."""
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r").strip(b" \t")
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


def _unquote(value: bytes) -> bytes:
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        return value[1:-1]
    return value


def _hex32(path: str, key: str, n: int, value: bytes) -> int:
    try:
        v = int(value, 16)
    except ValueError:
        v = -1
    if not 0 <= v <= 0xFFFFFFFF or len(value) > 8:
        raise CorruptImage(path, f"descriptor line {n}: {key} {value[:20]!r} is not a 32-bit hex number")
    return v


def parse_descriptor(path: str, raw: bytes | bytearray) -> Descriptor:
    """Parse descriptor text (anything after a NUL byte is padding and ignored)."""
    if len(raw) > MAX_DESCRIPTOR:
        raise CorruptImage(path, f"descriptor of {len(raw)} bytes exceeds {MAX_DESCRIPTOR} bytes")
    raw = bytes(raw).split(b"\0", 1)[0]
    version = create_type = None
    d = Descriptor(version=0, create_type="")
    pos = 0
    for n, line in enumerate(raw.split(b"\n"), 1):
        start, pos = pos, pos + len(line) + 1
        text = line.rstrip(b"\r")
        stripped = text.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        m = _EXTENT.match(text)
        if m:
            if len(d.extents) >= MAX_EXTENTS:
                raise CorruptImage(path, f"descriptor has more than {MAX_EXTENTS} extent lines")
            d.extents.append(_extent_line(path, n, m))
            continue
        m = _SETTING.match(text)
        if not m:
            raise CorruptImage(path, f"descriptor line {n} is neither a setting nor an extent: {stripped[:60]!r}")
        key, value = m.group(1).decode(), m.group(2)
        if key == "version":
            if value not in (b"1", b"2", b"3"):
                raise UnsupportedImage(path, f"descriptor line {n}: version {value[:20]!r} is not 1, 2 or 3")
            version = int(value)
        elif key == "CID":
            d.cid = _hex32(path, key, n, value)
            d.cid_span = (start + m.start(2), start + m.end(2))
        elif key == "parentCID":
            d.parent_cid = _hex32(path, key, n, value)
        elif key == "createType":
            create_type = _unquote(value).decode("utf-8", "replace")
        elif key == "parentFileNameHint":
            d.parent_hint = _unquote(value).decode("utf-8", "surrogateescape")
    if version is None:
        raise CorruptImage(path, "descriptor has no version line")
    if create_type is None:
        raise CorruptImage(path, "descriptor has no createType")
    d.version, d.create_type = version, create_type
    return d


def _extent_line(path: str, n: int, m: re.Match) -> ExtentLine:
    access, sectors, etype = m.group(1).decode(), int(m.group(2)), m.group(3).decode()
    name = m.group(4).decode("utf-8", "surrogateescape") if m.group(4) is not None else ""
    offset = int(m.group(5)) if m.group(5) is not None else 0
    where = f"descriptor line {n} (extent)"
    if access not in ACCESS:
        raise UnsupportedImage(path, f"{where}: access {access} (only RW and RDONLY extents are served)")
    if etype not in EXTENT_TYPES:
        raise UnsupportedImage(path, f"{where}: extent type {etype} is not supported")
    if not 0 < sectors <= MAX_EXTENT_SECTORS:
        raise CorruptImage(path, f"{where}: size {sectors} sectors is not in [1, 2^40]")
    if (etype == "ZERO") != (m.group(4) is None):
        raise CorruptImage(path, f"{where}: {'a ZERO extent names no file' if etype == 'ZERO' else 'no file name'}")
    if m.group(5) is not None and etype != "FLAT":
        raise CorruptImage(path, f"{where}: only FLAT extents take an offset")
    if etype == "FLAT" and m.group(5) is None:
        raise CorruptImage(path, f"{where}: a FLAT extent needs an offset")
    if offset > MAX_EXTENT_SECTORS:
        raise CorruptImage(path, f"{where}: offset {offset} sectors is too large")
    return ExtentLine(access, sectors, etype, name, offset, n)
