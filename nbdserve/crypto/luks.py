"""LUKS1 and LUKS2 headers: parsing, checking, and unlocking the volume key.

Owns:
  * ``parse_luks(read, size, area=None)`` -> ``LuksHeader``: the payload cipher, where the
    payload starts (and, for LUKS2 with a fixed size, ends), its sector size and IV offset, and
    the keyslots to try in order.  ``read(offset, length)`` reads the container; ``size`` is its
    length.  ``area`` is set when the header is embedded in another format (qcow2's
    full-disk-encryption clusters): then every keyslot must lie inside the first ``area`` bytes
    and the payload fields are not used.
  * ``unlock(header, read, passphrase)`` -> the volume key: KDF, keyslot area decryption,
    anti-forensic merge, digest check (constant-time compare); ``WrongKey`` if no slot opens.
  * ``af_split`` / ``af_merge`` (the anti-forensic splitter of the LUKS1 spec).

Hostile headers are refused with one line before any expensive work: key sizes above 64 bytes,
stripe counts other than 4000, keyslot areas overlapping the header, each other or the payload,
or lying past the end of the file, payload offsets past the end of the file, KDF costs over the
``kdf`` limits, LUKS2 header copies with a bad checksum or JSON (the other copy is used when it
is good), LUKS2 requirements or segment layouts we do not implement (reencryption, integrity).
Memory stays bounded: a LUKS2 header is at most 4 MiB, a keyslot area at most 64 x 4000 bytes.

Facts (layouts, the AF construction, LUKS2 IV counting): docs/luks.md, from the LUKS1 on-disk
format specification (1.2.3) and the LUKS2 on-disk format specification.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .ciphers import CipherSpec, SectorCipher, parse_cipher, parse_cipher_string
from .errors import CryptoError, UnsupportedCipher, WrongKey
from .kdf import argon2, check_argon2, check_pbkdf2, hash_name, pbkdf2

Read = Callable[[int, int], bytes]

MAGIC = b"LUKS\xba\xbe"
MAGIC2_SECONDARY = b"SKUL\xba\xbe"
SECTOR = 512
STRIPES = 4000
MAX_KEY_SIZE = 64
MAX_KEYSLOTS = 32  # LUKS2's limit (LUKS1 has 8)

# LUKS1 (big-endian): phdr, then 8 keyslots.
LUKS1_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
LUKS1_SLOT = struct.Struct(">II32sII")
LUKS1_SLOTS = 8
LUKS1_HEADER_SIZE = LUKS1_PHDR.size + LUKS1_SLOTS * LUKS1_SLOT.size  # 592
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD

# LUKS2 binary header (big-endian, 4096 bytes; the JSON area follows).
LUKS2_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
LUKS2_BIN_SIZE = 4096
LUKS2_CSUM_AT = 448
LUKS2_HDR_SIZES = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB


@dataclass(frozen=True)
class Digest:
    """PBKDF2(hash, volume key, salt, iterations) must equal ``value``."""

    hash: str
    iterations: int
    salt: bytes
    value: bytes

    def matches(self, key: bytes) -> bool:
        return hmac.compare_digest(pbkdf2(self.hash, key, self.salt, self.iterations, len(self.value)), self.value)


@dataclass(frozen=True)
class Kdf:
    kind: str  # pbkdf2 | argon2i | argon2id
    salt: bytes
    hash: str = ""  # pbkdf2
    iterations: int = 0  # pbkdf2
    time: int = 0  # argon2
    memory: int = 0  # argon2, KiB
    lanes: int = 0  # argon2

    def derive(self, password: bytes, length: int) -> bytes:
        if self.kind == "pbkdf2":
            return pbkdf2(self.hash, password, self.salt, self.iterations, length)
        return argon2(self.kind, password, self.salt, self.time, self.memory, self.lanes, length)


@dataclass(frozen=True)
class Keyslot:
    index: int
    key_size: int  # bytes of the volume key stored here
    kdf: Kdf
    area_offset: int  # bytes from the start of the header
    area_cipher: CipherSpec  # encryption of the key material (its key size is the KDF output)
    af_hash: str
    digest: Digest


@dataclass(frozen=True)
class LuksHeader:
    version: int
    uuid: str
    cipher: CipherSpec
    payload_offset: int  # bytes from the start of the header
    payload_size: int | None  # None: to the end of the container
    sector_size: int
    iv_tweak: int  # IV of the payload's first 512 bytes
    keyslots: tuple[Keyslot, ...]  # in the order to try

    def payload_cipher(self, key: bytes) -> SectorCipher:
        return SectorCipher(self.cipher, key, sector_size=self.sector_size, iv_step=self.sector_size // SECTOR)


def is_luks(head: bytes) -> bool:
    return head[:6] == MAGIC and head[6:8] in (b"\0\1", b"\0\2")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def material_size(key_size: int, stripes: int = STRIPES) -> int:
    """Bytes a keyslot's key material occupies (whole 512-byte sectors)."""
    return _round_up(key_size * stripes, SECTOR)


# -- anti-forensic splitter -------------------------------------------------------------------


def _diffuse(block: bytes, h0: hashlib._Hash) -> bytes:
    ds = h0.digest_size
    out = bytearray()
    for i in range(0, len(block), ds):
        h = h0.copy()
        h.update((i // ds).to_bytes(4, "big"))
        chunk = block[i : i + ds]
        h.update(chunk)
        out += h.digest()[: len(chunk)]
    return bytes(out)


def _xor(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def af_merge(material: bytes | memoryview, key_size: int, stripes: int, hash_spec: str) -> bytes:
    """Recover the key from ``stripes`` split blocks: d = H(d ^ s_i) over all but the last
    stripe, then key = d ^ s_last."""
    h0 = hashlib.new(hash_spec)
    view = memoryview(material)
    d = bytes(key_size)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, view[i * key_size : (i + 1) * key_size]), h0)
    return _xor(d, view[(stripes - 1) * key_size : stripes * key_size])


def af_split(key: bytes, stripes: int, hash_spec: str, random: Callable[[int], bytes]) -> bytes:
    """The inverse of ``af_merge`` (random stripes, the last one chosen to give ``key``)."""
    h0 = hashlib.new(hash_spec)
    parts, d = [], bytes(len(key))
    for _ in range(stripes - 1):
        s = random(len(key))
        parts.append(s)
        d = _diffuse(_xor(d, s), h0)
    parts.append(_xor(d, key))
    return b"".join(parts)


# -- parsing ----------------------------------------------------------------------------------


def _cstr(raw: bytes, what: str) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise CryptoError(f"{what} is not ASCII") from None


def parse_luks(read: Read, size: int, area: int | None = None) -> LuksHeader:
    """The header at offset 0 of ``read``; see the module docstring."""
    head = read(0, 8)
    if len(head) < 8 or head[:6] != MAGIC:
        raise CryptoError("no LUKS header (bad magic)")
    version = struct.unpack_from(">H", head, 6)[0]
    if version == 1:
        return _parse_luks1(read, size, area)
    if version == 2:
        return _parse_luks2(read, size, area)
    raise UnsupportedCipher(f"LUKS version {version} is not supported")


class _Areas:
    """Byte ranges already claimed (header, keyslots): new ones must not overlap them."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, str]] = []

    def claim(self, start: int, end: int, what: str) -> None:
        for s, e, other in self.ranges:
            if start < e and s < end:
                raise CryptoError(f"{what} [{start:#x}, {end:#x}) overlaps {other}")
        self.ranges.append((start, end, what))


def _parse_luks1(read: Read, size: int, area: int | None) -> LuksHeader:
    raw = read(0, LUKS1_HEADER_SIZE)
    if len(raw) < LUKS1_HEADER_SIZE or size < LUKS1_HEADER_SIZE:
        raise CryptoError("file too short for a LUKS1 header")
    (_, _, cname, cmode, hspec, payload_sectors, key_bytes, mk_digest, mk_salt, mk_iter, uuid) = LUKS1_PHDR.unpack_from(
        raw
    )
    if not 0 < key_bytes <= MAX_KEY_SIZE:
        raise CryptoError(f"key size {key_bytes} bytes is out of range (1..{MAX_KEY_SIZE})")
    cipher = parse_cipher(_cstr(cname, "cipher name"), _cstr(cmode, "cipher mode"), key_bytes)
    hspec_name = hash_name(_cstr(hspec, "hash spec"))
    check_pbkdf2(mk_iter, "master key digest")
    digest = Digest(hspec_name, mk_iter, mk_salt, mk_digest)
    payload = payload_sectors * SECTOR
    limit = area if area is not None else payload
    if area is None:
        if payload < LUKS1_HEADER_SIZE:
            raise CryptoError(f"payload offset {payload:#x} overlaps the LUKS header")
        if payload > size:
            raise CryptoError(f"payload offset {payload:#x} is beyond the end of the file ({size:#x})")
    areas = _Areas()
    areas.claim(0, LUKS1_HEADER_SIZE, "the LUKS header")
    slots = []
    for i in range(LUKS1_SLOTS):
        active, iters, salt, km_sector, stripes = LUKS1_SLOT.unpack_from(raw, LUKS1_PHDR.size + i * LUKS1_SLOT.size)
        if active == SLOT_DISABLED:
            continue
        if active != SLOT_ENABLED:
            raise CryptoError(f"keyslot {i}: state {active:#010x} is neither enabled nor disabled")
        if stripes != STRIPES:
            raise CryptoError(f"keyslot {i}: {stripes} anti-forensic stripes (LUKS uses {STRIPES})")
        check_pbkdf2(iters, f"keyslot {i}")
        start = km_sector * SECTOR
        end = start + material_size(key_bytes)
        areas.claim(start, end, f"keyslot {i} key material")
        if end > limit:
            where = "the encryption header area" if area is not None else "the payload offset"
            raise CryptoError(f"keyslot {i}: key material [{start:#x}, {end:#x}) runs past {where} ({limit:#x})")
        if end > size:
            raise CryptoError(f"keyslot {i}: key material [{start:#x}, {end:#x}) is beyond the end of the file")
        slots.append(Keyslot(i, key_bytes, Kdf("pbkdf2", salt, hspec_name, iters), start, cipher, hspec_name, digest))
    if not slots:
        raise CryptoError("no active keyslot")
    return LuksHeader(
        version=1,
        uuid=_cstr(uuid, "uuid"),
        cipher=cipher,
        payload_offset=payload,
        payload_size=None,
        sector_size=SECTOR,
        iv_tweak=0,
        keyslots=tuple(slots),
    )


# -- LUKS2 ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Copy:
    offset: int
    seqid: int
    hdr_size: int
    uuid: str
    meta: dict


def _read_copy(read: Read, size: int, offset: int, magic: bytes) -> _Copy:
    """One LUKS2 header copy at ``offset``, checksum verified and JSON decoded."""
    if offset + LUKS2_BIN_SIZE > size:
        raise CryptoError(f"LUKS2 header at {offset:#x} is beyond the end of the file")
    raw = read(offset, LUKS2_BIN_SIZE)
    (m, version, hdr_size, seqid, _label, csum_alg, _salt, uuid, _sub, hdr_offset, _pad, csum) = LUKS2_BIN.unpack_from(
        raw
    )
    if m != magic or version != 2:
        raise CryptoError(f"no LUKS2 header at {offset:#x}")
    if hdr_size not in LUKS2_HDR_SIZES:
        raise CryptoError(f"LUKS2 header at {offset:#x}: header size {hdr_size:#x} is not a LUKS2 size")
    if hdr_offset != offset:
        raise CryptoError(f"LUKS2 header at {offset:#x} says it is at {hdr_offset:#x}")
    if offset + hdr_size > size:
        raise CryptoError(f"LUKS2 header at {offset:#x}: its {hdr_size:#x} bytes run past the end of the file")
    alg = hash_name(_cstr(csum_alg, "LUKS2 checksum algorithm"))
    whole = bytearray(read(offset, hdr_size))
    whole[LUKS2_CSUM_AT : LUKS2_CSUM_AT + 64] = bytes(64)
    h = hashlib.new(alg, whole).digest()
    if not hmac.compare_digest(h, csum[: len(h)]) or any(csum[len(h) :]):
        raise CryptoError(f"LUKS2 header at {offset:#x}: checksum mismatch")
    text = bytes(whole[LUKS2_BIN_SIZE:hdr_size]).split(b"\0", 1)[0]
    try:
        meta = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CryptoError(f"LUKS2 header at {offset:#x}: bad JSON metadata ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(meta, dict):
        raise CryptoError(f"LUKS2 header at {offset:#x}: JSON metadata is not an object")
    return _Copy(offset, seqid, hdr_size, _cstr(uuid, "uuid"), meta)


def _pick_copy(read: Read, size: int) -> _Copy:
    """The intact header copy with the highest sequence id (cryptsetup's rule).  Without an
    intact primary, the secondary is looked for at every offset a LUKS2 header size allows."""
    good: list[_Copy] = []
    try:
        primary = _read_copy(read, size, 0, MAGIC)
        good.append(primary)
        offsets: tuple[int, ...] = (primary.hdr_size,)
        reason = ""
    except CryptoError as e:
        reason = str(e)
        offsets = LUKS2_HDR_SIZES
    for offset in offsets:
        try:
            good.append(_read_copy(read, size, offset, MAGIC2_SECONDARY))
            break
        except CryptoError:
            continue
    if not good:
        raise CryptoError(f"{reason}; no intact secondary copy either")
    return max(good, key=lambda c: c.seqid)


def _field(obj: object, key: str, where: str, kind: type | tuple[type, ...]) -> object:
    if not isinstance(obj, dict) or key not in obj:
        raise CryptoError(f"LUKS2 {where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CryptoError(f"LUKS2 {where}: {key!r} has the wrong type")
    return value


def _num(obj: object, key: str, where: str, lo: int = 0, hi: int = 1 << 63) -> int:
    """A JSON number, or a decimal string (LUKS2 writes 64-bit values as strings)."""
    value = _field(obj, key, where, (int, str))
    if isinstance(value, str):
        if not value.isdigit() or len(value) > 20:
            raise CryptoError(f"LUKS2 {where}: {key!r} is not a number")
        value = int(value)
    if not lo <= value <= hi:
        raise CryptoError(f"LUKS2 {where}: {key!r} = {value} is out of range")
    return value


def _b64(obj: object, key: str, where: str, max_len: int = 256) -> bytes:
    text = _field(obj, key, where, str)
    assert isinstance(text, str)
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(f"LUKS2 {where}: {key!r} is not base64") from None
    if not 0 < len(value) <= max_len:
        raise CryptoError(f"LUKS2 {where}: {key!r} has a bad length ({len(value)})")
    return value


def _kdf(obj: object, where: str) -> Kdf:
    kind = _field(obj, "type", where, str)
    salt = _b64(obj, "salt", where)
    if kind == "pbkdf2":
        iters = _num(obj, "iterations", where, 1, 1 << 32)
        check_pbkdf2(iters, where)
        return Kdf("pbkdf2", salt, hash=hash_name(str(_field(obj, "hash", where, str))), iterations=iters)
    if kind in ("argon2i", "argon2id"):
        t = _num(obj, "time", where, 1, 1 << 32)
        m = _num(obj, "memory", where, 1, 1 << 32)
        p = _num(obj, "cpus", where, 1, 1 << 24)
        check_argon2(t, m, p, where)
        if len(salt) < 8:
            raise CryptoError(f"{where}: Argon2 salt shorter than 8 bytes")
        return Kdf(str(kind), salt, time=t, memory=m, lanes=p)
    raise UnsupportedCipher(f"{where}: KDF {kind!r} is not supported")


def _parse_luks2(read: Read, size: int, area: int | None) -> LuksHeader:
    copy = _pick_copy(read, size)
    meta, hdr = copy.meta, copy.hdr_size
    config = _field(meta, "config", "metadata", dict)
    if _num(config, "json_size", "config") != hdr - LUKS2_BIN_SIZE:
        raise CryptoError("LUKS2 config: json_size does not match the header size")
    slots_size = _num(config, "keyslots_size", "config", 0, 1 << 40)
    requirements = config.get("requirements", {}) if isinstance(config, dict) else {}
    mandatory = requirements.get("mandatory", []) if isinstance(requirements, dict) else ["?"]
    if mandatory:
        raise UnsupportedCipher(f"LUKS2 requirement(s) {mandatory} not supported (reencryption in progress?)")
    slots_start = 2 * hdr
    slots_end = slots_start + slots_size
    limit = area if area is not None else size
    if slots_end > limit:
        raise CryptoError(f"LUKS2 keyslots area [{slots_start:#x}, {slots_end:#x}) runs past {limit:#x}")

    segments = _field(meta, "segments", "metadata", dict)
    assert isinstance(segments, dict)
    if list(segments) != ["0"]:
        raise UnsupportedCipher("LUKS2 with segments other than one crypt segment (reencryption?) is not supported")
    seg = segments["0"]
    if _field(seg, "type", "segment 0", str) != "crypt":
        raise UnsupportedCipher("LUKS2 segment 0 is not of type crypt")
    if isinstance(seg, dict) and "integrity" in seg:
        raise UnsupportedCipher("LUKS2 with authenticated encryption (integrity) is not supported")
    seg_offset = _num(seg, "offset", "segment 0")
    seg_size_text = _field(seg, "size", "segment 0", (int, str))
    seg_size = None if seg_size_text == "dynamic" else _num(seg, "size", "segment 0")
    iv_tweak = _num(seg, "iv_tweak", "segment 0", 0, (1 << 64) - 1)
    sector_size = _num(seg, "sector_size", "segment 0", 512, 4096)
    if sector_size not in (512, 1024, 2048, 4096):
        raise CryptoError(f"LUKS2 segment 0: sector size {sector_size} is not 512, 1024, 2048 or 4096")

    digests_obj = _field(meta, "digests", "metadata", dict)
    keyslots_obj = _field(meta, "keyslots", "metadata", dict)
    assert isinstance(digests_obj, dict) and isinstance(keyslots_obj, dict)
    if len(keyslots_obj) > MAX_KEYSLOTS or len(digests_obj) > MAX_KEYSLOTS:
        raise CryptoError(f"LUKS2: more than {MAX_KEYSLOTS} keyslots or digests")
    slot_digest: dict[str, Digest] = {}
    for name, d in digests_obj.items():
        where = f"digest {name}"
        if _field(d, "type", where, str) != "pbkdf2":
            raise UnsupportedCipher(f"LUKS2 {where}: type {d.get('type')!r} is not supported")
        seg_refs = _field(d, "segments", where, list)
        if "0" not in seg_refs:
            continue  # digests of unbound keys
        iters = _num(d, "iterations", where, 1, 1 << 32)
        check_pbkdf2(iters, where)
        dig_hash = hash_name(str(_field(d, "hash", where, str)))
        dig = Digest(dig_hash, iters, _b64(d, "salt", where), _b64(d, "digest", where))
        for ref in _field(d, "keyslots", where, list):
            slot_digest[str(ref)] = dig

    encryption = str(_field(seg, "encryption", "segment 0", str))
    areas = _Areas()
    areas.claim(0, slots_start, "the LUKS2 header copies")
    slots: list[tuple[int, Keyslot]] = []
    key_size = None
    for name, ks in keyslots_obj.items():
        where = f"keyslot {name}"
        if not name.isdigit() or int(name) >= MAX_KEYSLOTS:
            raise CryptoError(f"LUKS2: bad keyslot name {name!r}")
        if _field(ks, "type", where, str) != "luks2":
            continue  # e.g. a reencryption keyslot
        area_obj = _field(ks, "area", where, dict)
        if _field(area_obj, "type", f"{where} area", str) != "raw":
            raise UnsupportedCipher(f"LUKS2 {where}: area type {area_obj.get('type')!r} is not supported")
        start = _num(area_obj, "offset", f"{where} area")
        length = _num(area_obj, "size", f"{where} area")
        areas.claim(start, start + length, f"{where} area")
        if start < slots_start or start + length > slots_end:
            raise CryptoError(
                f"LUKS2 {where}: area [{start:#x}, {start + length:#x}) is outside the keyslots area "
                f"[{slots_start:#x}, {slots_end:#x})"
            )
        if name not in slot_digest:
            continue  # not a key of the data segment
        vk_size = _num(ks, "key_size", where, 1, MAX_KEY_SIZE)
        af = _field(ks, "af", where, dict)
        if _field(af, "type", f"{where} af", str) != "luks1":
            raise UnsupportedCipher(f"LUKS2 {where}: anti-forensic type {af.get('type')!r} is not supported")
        if _num(af, "stripes", f"{where} af") != STRIPES:
            raise CryptoError(f"LUKS2 {where}: stripes other than {STRIPES}")
        if material_size(vk_size) > length:
            raise CryptoError(f"LUKS2 {where}: area of {length} bytes is too small for its key material")
        area_key = _num(area_obj, "key_size", f"{where} area", 1, MAX_KEY_SIZE)
        area_cipher = parse_cipher_string(str(_field(area_obj, "encryption", f"{where} area", str)), area_key)
        priority = _num(ks, "priority", where, 0, 2) if isinstance(ks, dict) and "priority" in ks else 1
        kdf = _kdf(_field(ks, "kdf", where, dict), f"{where} kdf")
        af_hash = hash_name(str(_field(af, "hash", f"{where} af", str)))
        if key_size is not None and vk_size != key_size:
            raise CryptoError("LUKS2: keyslots of the data segment disagree on the key size")
        key_size = vk_size
        if priority:
            slots.append((-priority, Keyslot(int(name), vk_size, kdf, start, area_cipher, af_hash, slot_digest[name])))
    if key_size is None:
        raise CryptoError("no active keyslot for the data segment")
    if not slots:
        raise CryptoError("every keyslot of the data segment has priority 'ignore'")
    cipher = parse_cipher_string(encryption, key_size)
    if area is None:
        if seg_offset < slots_end:
            raise CryptoError(f"LUKS2 data segment at {seg_offset:#x} overlaps the keyslots area (ends {slots_end:#x})")
        if seg_offset > size:
            raise CryptoError(f"LUKS2 data segment offset {seg_offset:#x} is beyond the end of the file ({size:#x})")
        if seg_size is not None and seg_offset + seg_size > size:
            raise CryptoError(f"LUKS2 data segment [{seg_offset:#x}, +{seg_size:#x}) runs past the end of the file")
        if seg_offset % SECTOR:
            raise CryptoError(f"LUKS2 data segment offset {seg_offset:#x} is not sector aligned")
    slots.sort(key=lambda p: (p[0], p[1].index))
    return LuksHeader(
        version=2,
        uuid=copy.uuid,
        cipher=cipher,
        payload_offset=seg_offset,
        payload_size=seg_size,
        sector_size=sector_size,
        iv_tweak=iv_tweak,
        keyslots=tuple(s for _, s in slots),
    )


# -- unlocking --------------------------------------------------------------------------------


def unlock(header: LuksHeader, read: Read, passphrase: bytes) -> bytes:
    """The volume key, from the first keyslot that opens with ``passphrase``."""
    for slot in header.keyslots:
        derived = slot.kdf.derive(passphrase, slot.area_cipher.key_size)
        n = material_size(slot.key_size)
        material = bytearray(read(slot.area_offset, n))
        SectorCipher(slot.area_cipher, derived).decrypt(0, memoryview(material))
        key = af_merge(material, slot.key_size, STRIPES, slot.af_hash)
        if slot.digest.matches(key):
            return key
    raise WrongKey("invalid password: no keyslot opens with the given key")


def open_luks(read: Read, size: int, passphrase: bytes, area: int | None = None) -> tuple[LuksHeader, SectorCipher]:
    """Parse, unlock, and return the header and its payload cipher."""
    header = parse_luks(read, size, area)
    return header, header.payload_cipher(unlock(header, read, passphrase))
