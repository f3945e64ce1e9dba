"""The crypto layer (``nbdserve.crypto``) against references and real headers.

* Sector ciphers: the bulk ("lanes") paths equal a per-sector reference built here straight on
  ``cryptography`` (one context per sector, IVs computed by this test), for every chaining mode,
  IV generator, key size, sector size and run length, encrypt and decrypt (hypothesis).
* LUKS1 from ``qemu-img create -f luks`` with every AES variant QEMU makes: unlocked, and the
  payload QEMU wrote decrypts to what it wrote; a wrong passphrase is WrongKey.
* LUKS2 from cryptsetup (pbkdf2, argon2i, argon2id; 512 and 4096-byte sectors; several slots):
  the volume key equals the one cryptsetup dumps; a damaged copy falls back to the other.
* Legacy qcow2 AES key rule; AF split/merge round trip.
* Hostile headers: each refused with one line, before any costly KDF work.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from lukstest import PASSWORD, make_luks, make_luks2, qemu_io_key, rewrite_luks2, secret_file, volume_key

from nbdserve.crypto import CryptoError, SectorCipher, UnsupportedCipher, WrongKey, parse_cipher, parse_luks, unlock
from nbdserve.crypto.ciphers import legacy_qcow_cipher
from nbdserve.crypto.kdf import MAX_PBKDF2_ITERATIONS
from nbdserve.crypto.luks import LUKS1_PHDR, LUKS1_SLOT, af_merge, af_split, open_luks
from tests.util import run

# -- sector ciphers against a per-sector reference ---------------------------------------------


def reference(spec: str, key: bytes, first: int, data: bytes, ss: int, step: int, encrypt: bool) -> bytes:
    """One cryptography context per sector, IVs computed independently of nbdserve."""
    chain, _, iv = spec.partition("-")
    ivgen, _, ivhash = iv.partition(":")
    out = b""
    for k in range(len(data) // ss):
        n = first + k * step
        if ivgen == "plain64":
            ivb = n.to_bytes(8, "little") + bytes(8)
        elif ivgen == "plain":
            ivb = (n & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
        elif ivgen == "essiv":
            salt = hashlib.new(ivhash, key).digest()
            ivb = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(n.to_bytes(8, "little") + bytes(8))
        else:
            ivb = b""
        mode = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}.get(chain)
        if chain == "xts" and len(key) == 48:
            # cryptography has no AES-192-XTS: compute XTS from ECB, block by block.
            out += xts_by_blocks(key, ivb, data[k * ss : (k + 1) * ss], encrypt)
            continue
        c = Cipher(algorithms.AES(key), mode(ivb) if mode else modes.ECB())
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[k * ss : (k + 1) * ss])
    return out


def xts_by_blocks(key: bytes, iv: bytes, sector: bytes, encrypt: bool) -> bytes:
    k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
    t = int.from_bytes(Cipher(algorithms.AES(k2), modes.ECB()).encryptor().update(iv), "little")
    e = Cipher(algorithms.AES(k1), modes.ECB())
    ctx = e.encryptor() if encrypt else e.decryptor()
    out = b""
    for j in range(0, len(sector), 16):
        x = t.to_bytes(16, "little")
        blk = bytes(a ^ b for a, b in zip(sector[j : j + 16], x, strict=True))
        out += bytes(a ^ b for a, b in zip(ctx.update(blk), x, strict=True))
        t <<= 1
        if t >> 128:
            t = (t ^ (1 << 128)) ^ 0x87
    return out


SPECS = [
    ("xts-plain64", 64),
    ("xts-plain64", 32),
    ("xts-plain64", 48),
    ("xts-plain", 64),
    ("xts-essiv:sha256", 64),
    ("cbc-plain64", 32),
    ("cbc-plain", 16),
    ("cbc-essiv:sha256", 16),
    ("cbc-essiv:md5", 24),
    ("ctr-plain64", 32),
    ("ecb", 16),
]


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    ss=st.sampled_from([512, 4096]),
    n=st.integers(1, 40),
    first=st.one_of(st.integers(0, 1 << 20), st.integers((1 << 32) - 50, (1 << 32) + 50)),
    seed=st.integers(0, 1 << 30),
)
def test_bulk_equals_per_sector_reference(spec, ss, n, first, seed):
    import random

    rng = random.Random(seed)
    mode, size = spec
    key = rng.randbytes(size)
    step = ss // 512
    c = SectorCipher(parse_cipher("aes", mode, size), key, sector_size=ss, iv_step=step)
    data = rng.randbytes(n * ss)
    frozen = bytes(data)
    ct = c.encrypt(first, data)
    assert data == frozen, "encrypt must not touch its input"
    assert ct == reference(mode, key, first, data, ss, step, True)
    buf = bytearray(ct)
    c.decrypt(first, memoryview(buf))
    assert buf == data


@pytest.mark.parametrize("spec", [("xts-plain64", 64), ("cbc-essiv:sha256", 32), ("ctr-plain64", 16)])
def test_long_runs_in_pieces(spec):
    """Runs longer than one lane pass (LANE_CHUNK) are processed piece by piece with the right IVs."""
    mode, size = spec
    key = os.urandom(size)
    for ss, n in ((512, 700), (4096, 70)):
        c = SectorCipher(parse_cipher("aes", mode, size), key, sector_size=ss, iv_step=ss // 512)
        data = os.urandom(n * ss)
        ct = c.encrypt(99, data)
        assert bytes(ct) == reference(mode, key, 99, data, ss, ss // 512, True)
        buf = bytearray(ct)
        c.decrypt(99, memoryview(buf))
        assert buf == data


def test_cipher_refusals():
    with pytest.raises(UnsupportedCipher, match="twofish"):
        parse_cipher("twofish", "xts-plain64", 64)
    with pytest.raises(UnsupportedCipher, match="benbi"):
        parse_cipher("aes", "cbc-benbi", 32)
    with pytest.raises(UnsupportedCipher, match="sha1"):
        parse_cipher("aes", "cbc-essiv:sha1", 32)  # a 20-byte digest is no AES key
    with pytest.raises(CryptoError, match="key size"):
        parse_cipher("aes", "xts-plain64", 16)
    with pytest.raises(CryptoError, match="halves are equal"):
        SectorCipher(parse_cipher("aes", "xts-plain64", 64), bytes(64))


def test_legacy_qcow_key_rule():
    """AES-128-CBC, IV = plain64 sector, key = passphrase cut/zero-padded to 16 bytes."""
    data = os.urandom(1024)
    for pw, key in ((b"abc", b"abc" + bytes(13)), (b"0123456789abcdefXYZ", b"0123456789abcdef")):
        assert legacy_qcow_cipher(pw).encrypt(7, data) == reference("cbc-plain64", key, 7, data, 512, 1, True)


def test_af_round_trip():
    key = os.urandom(64)
    for h in ("sha1", "sha256", "sha512"):
        assert af_merge(af_split(key, 4000, h, os.urandom), 64, 4000, h) == key


# -- LUKS1 made by QEMU ---------------------------------------------------------------------------

QEMU_LUKS = [
    {},  # aes-256-xts-plain64, sha256: the default
    {"cipher_alg": "aes-128", "cipher_mode": "xts", "hash_alg": "sha512"},
    {"cipher_alg": "aes-192", "cipher_mode": "xts", "hash_alg": "sha1"},
    {"cipher_alg": "aes-256", "cipher_mode": "cbc", "ivgen_alg": "plain"},
    {"cipher_alg": "aes-128", "cipher_mode": "cbc", "ivgen_alg": "essiv", "ivgen_hash_alg": "sha256"},
    {"cipher_alg": "aes-256", "cipher_mode": "ctr", "ivgen_alg": "plain64", "hash_alg": "ripemd160"},
]


def reader(path: Path):
    fd = os.open(path, os.O_RDONLY)

    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read, os.fstat(fd).st_size


@pytest.mark.parametrize("opts", QEMU_LUKS, ids=lambda o: "-".join(o.values()) or "default")
def test_qemu_luks1_payload(tmp_path, opts):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "d.luks", "2M", secret, **opts)
    qemu_io_key(img, "luks", secret, "write -P 0x5a 512 1M", "write -P 0xc3 1049088 4096")
    read, size = reader(img)
    header, cipher = open_luks(read, size, PASSWORD)
    assert header.version == 1 and header.sector_size == 512
    data = bytearray(read(header.payload_offset, 2 << 20))
    cipher.decrypt(0, memoryview(data))
    assert data[512 : 512 + (1 << 20)] == b"\x5a" * (1 << 20)
    assert data[1049088 : 1049088 + 4096] == b"\xc3" * 4096
    with pytest.raises(WrongKey, match="invalid password"):
        unlock(header, read, PASSWORD + b"x")


# -- LUKS2 made by cryptsetup ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("--sector-size", "512"),
        ("--sector-size", "4096", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"),
        ("--pbkdf", "argon2id", "--pbkdf-memory", "1024", "--pbkdf-force-iterations", "4"),
        ("--pbkdf", "argon2i", "--pbkdf-memory", "2048", "--pbkdf-force-iterations", "4", "--hash", "sha512"),
    ],
    ids=["xts512", "cbc-essiv4096", "argon2id", "argon2i"],
)
def test_cryptsetup_luks2_key(tmp_path, args):
    img = make_luks2(tmp_path / "c.img", 24 << 20, PASSWORD, *args)
    read, size = reader(img)
    header = parse_luks(read, size)
    assert header.version == 2
    if "4096" in args:
        assert header.sector_size == 4096
    assert unlock(header, read, PASSWORD) == volume_key(img)
    with pytest.raises(WrongKey):
        unlock(header, read, b"wrong")


def test_luks2_second_keyslot_and_damaged_copies(tmp_path):
    img = make_luks2(tmp_path / "c.img", 24 << 20)
    old, new = secret_file(tmp_path), tmp_path / "second"
    new.write_bytes(b"second passphrase")
    run("cryptsetup", "luksAddKey", "--batch-mode", "--key-file", old, "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", img, new)  # fmt: skip
    vk = volume_key(img)
    read, size = reader(img)
    header = parse_luks(read, size)
    assert [s.index for s in header.keyslots] == [0, 1]
    assert unlock(header, read, b"second passphrase") == vk
    hdr_size = struct.unpack(">Q", read(8, 8))[0]
    with open(img, "r+b") as f:  # break the primary's JSON (its checksum no longer matches)
        f.seek(4096 + 10)
        f.write(b"#")
    read, size = reader(img)
    assert unlock(parse_luks(read, size), read, PASSWORD) == vk  # the secondary copy
    with open(img, "r+b") as f:
        f.seek(hdr_size + 4096 + 10)
        f.write(b"#")
    read, size = reader(img)
    with pytest.raises(CryptoError, match=r"checksum mismatch.*no intact secondary"):
        parse_luks(read, size)


# -- hostile headers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def luks1_image(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("luks1")
    return make_luks(tmp / "base.luks", "1M", secret_file(tmp))


def patched(src: Path, tmp: Path, offset: int, fmt: str, *values) -> Path:
    dst = tmp / "hostile.luks"
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    dst.write_bytes(data)
    return dst


SLOT0 = LUKS1_PHDR.size
HOSTILE_LUKS1 = [
    ("mk-iterations", LUKS1_PHDR.size - 44, ">I", 0xFFFFFFFF, "more than nbdserve allows"),
    ("slot-iterations", SLOT0 + 4, ">I", MAX_PBKDF2_ITERATIONS + 1, "more than nbdserve allows"),
    ("slot-iterations-zero", SLOT0 + 4, ">I", 0, "not positive"),
    ("stripes", SLOT0 + 44, ">I", 0xFFFFFFFF, "stripes"),
    ("key-bytes", 6 + 2 + 96 + 4, ">I", 0x7FFFFFFF, "key size"),
    ("km-over-header", SLOT0 + 40, ">I", 1, "overlaps the LUKS header"),
    ("km-past-payload", SLOT0 + 40, ">I", 0x00FFFFFF, "runs past the payload offset"),
    ("km-overlap", SLOT0 + LUKS1_SLOT.size, ">II", 0x00AC71F3, 1000, "overlaps keyslot 0"),
    ("payload-past-eof", 6 + 2 + 96, ">I", 0x7FFFFFFF, "beyond the end of the file"),
    ("payload-in-header", 6 + 2 + 96, ">I", 0, "overlaps the LUKS header"),
    ("slot-state", SLOT0, ">I", 0x12345678, "neither enabled nor disabled"),
    ("cipher", 8, "6s", b"serpen", "not supported"),
    ("hash", 8 + 64, "6s", b"whirlp", "not supported"),
    ("magic", 0, "6s", b"LUKX\xba\xbe", "bad magic"),
    ("version", 6, ">H", 3, "LUKS version 3 is not supported"),
    ("cipher-not-ascii", 8, "2s", b"\xff\xfe", "cipher name is not ASCII"),
    ("no-active-keyslot", SLOT0, ">I", 0x0000DEAD, "no active keyslot"),
]


@pytest.mark.parametrize("case", HOSTILE_LUKS1, ids=[c[0] for c in HOSTILE_LUKS1])
def test_hostile_luks1(luks1_image, tmp_path, case):
    _, offset, fmt, *values, message = case
    if case[0] == "km-overlap":
        # slot 1 enabled, with iterations 1000, salt, key material at slot 0's sector + 1
        img = patched(luks1_image, tmp_path, offset, fmt, *values)
        km0 = struct.unpack_from(">I", img.read_bytes(), SLOT0 + 40)[0]
        data = bytearray(img.read_bytes())
        struct.pack_into(">II", data, SLOT0 + LUKS1_SLOT.size + 40, km0 + 1, 4000)
        img.write_bytes(data)
    else:
        img = patched(luks1_image, tmp_path, offset, fmt, *values)
    read, size = reader(img)
    with pytest.raises(CryptoError, match=message) as e:
        open_luks(read, size, PASSWORD)
    assert "\n" not in str(e.value)


def test_luks1_header_cut_short(luks1_image, tmp_path):
    img = tmp_path / "short.luks"
    img.write_bytes(luks1_image.read_bytes()[:300])  # the magic and version, not the keyslots
    read, size = reader(img)
    with pytest.raises(CryptoError, match="file too short for a LUKS1 header"):
        open_luks(read, size, PASSWORD)


@pytest.fixture(scope="module")
def luks2_image(tmp_path_factory) -> Path:
    return make_luks2(tmp_path_factory.mktemp("luks2") / "base.img", 20 << 20)


def _slot0(meta):
    return meta["keyslots"]["0"]


HOSTILE_LUKS2 = [
    ("segment-past-eof", lambda m: m["segments"]["0"].update(offset=str(1 << 40)), "beyond the end of the file"),
    ("segment-over-keyslots", lambda m: m["segments"]["0"].update(offset="32768"), "overlaps the keyslots area"),
    ("area-over-header", lambda m: _slot0(m)["area"].update(offset="4096"), "overlaps the LUKS2 header"),
    ("area-huge", lambda m: _slot0(m)["area"].update(size=str(1 << 62)), "outside the keyslots area"),
    ("stripes", lambda m: _slot0(m)["af"].update(stripes=1 << 31), "stripes"),
    ("key-size", lambda m: _slot0(m).update(key_size=1 << 20), "out of range"),
    ("iterations", lambda m: _slot0(m)["kdf"].update(iterations=4_000_000_000), "more than nbdserve allows"),
    (
        "argon2-memory",
        lambda m: _slot0(m).update(
            kdf={"type": "argon2id", "time": 4, "memory": 1 << 31, "cpus": 1, "salt": "AAAAAAAAAAA="}
        ),
        "out of range|more than nbdserve allows",
    ),
    (
        "argon2-work",
        lambda m: _slot0(m).update(
            kdf={"type": "argon2id", "time": 1 << 20, "memory": 1 << 20, "cpus": 1, "salt": "AAAAAAAAAAA="}
        ),
        "more work",
    ),
    ("requirements", lambda m: m["config"].update(requirements={"mandatory": ["online-reencrypt"]}), "requirement"),
    ("integrity", lambda m: m["segments"]["0"].update(integrity={"type": "hmac(sha256)"}), "integrity"),
    ("two-segments", lambda m: m["segments"].update({"1": dict(m["segments"]["0"])}), "segments other than"),
    ("json-size", lambda m: m["config"].update(json_size="999"), "json_size"),
    ("salt-not-b64", lambda m: _slot0(m)["kdf"].update(salt="!!!"), "not base64"),
    ("no-keyslots", lambda m: m.update(keyslots={}), "no active keyslot"),
    ("sector-size", lambda m: m["segments"]["0"].update(sector_size=1000), "out of range|sector size"),
    ("missing-key", lambda m: _slot0(m).pop("af"), "missing 'af'"),
    ("wrong-type", lambda m: _slot0(m).update(af=[]), "'af' has the wrong type"),
    ("not-a-number", lambda m: m["segments"]["0"].update(offset="12ab"), "'offset' is not a number"),
    ("salt-length", lambda m: m["digests"]["0"].update(salt=""), "bad length"),
    (
        "argon2-salt",
        lambda m: _slot0(m).update(kdf={"type": "argon2id", "time": 4, "memory": 1024, "cpus": 1, "salt": "AAAA"}),
        "salt shorter than 8 bytes",
    ),
    ("kdf-kind", lambda m: _slot0(m)["kdf"].update(type="scrypt"), "KDF 'scrypt' is not supported"),
    ("keyslots-area", lambda m: m["config"].update(keyslots_size=str(1 << 40)), "keyslots area .* runs past"),
    ("segment-type", lambda m: m["segments"]["0"].update(type="linear"), "not of type crypt"),
    ("digest-type", lambda m: m["digests"]["0"].update(type="argon2"), "type 'argon2' is not supported"),
    ("keyslot-name", lambda m: m["keyslots"].update(x=m["keyslots"].pop("0")), "bad keyslot name 'x'"),
    ("too-many-keyslots", lambda m: m["keyslots"].update({str(i): {} for i in range(1, 64)}), "more than"),
    ("area-type", lambda m: _slot0(m)["area"].update(type="checksum"), "area type 'checksum'"),
    ("af-type", lambda m: _slot0(m)["af"].update(type="luks2"), "anti-forensic type 'luks2'"),
    ("area-small", lambda m: _slot0(m)["area"].update(size="4096"), "too small for its key material"),
    ("priority-ignore", lambda m: _slot0(m).update(priority=0), "priority 'ignore'"),
    (
        "segment-unaligned",
        lambda m: m["segments"]["0"].update(offset=str(int(m["segments"]["0"]["offset"]) + 1)),
        "not sector aligned",
    ),
    ("segment-size", lambda m: m["segments"]["0"].update(size=str(1 << 40)), "runs past the end of the file"),
]


@pytest.mark.parametrize("case", HOSTILE_LUKS2, ids=[c[0] for c in HOSTILE_LUKS2])
def test_hostile_luks2(luks2_image, tmp_path, case):
    _, edit, message = case
    img = tmp_path / "h.img"
    img.write_bytes(luks2_image.read_bytes())
    rewrite_luks2(img, edit)
    read, size = reader(img)
    with pytest.raises(CryptoError, match=message) as e:
        open_luks(read, size, PASSWORD)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[" * 5000 + b"]" * 5000, b'"a string"', b"\xff\xfe{}"],
    ids=["syntax", "deep", "str", "utf8"],
)
def test_luks2_bad_json(luks2_image, tmp_path, raw):
    img = tmp_path / "h.img"
    img.write_bytes(luks2_image.read_bytes())
    rewrite_luks2(img, lambda m: None, raw_json=raw)
    read, size = reader(img)
    with pytest.raises(CryptoError, match="JSON") as e:
        parse_luks(read, size)
    assert "\n" not in str(e.value)
