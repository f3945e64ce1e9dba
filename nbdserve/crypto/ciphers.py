"""Sector ciphers: encrypt and decrypt runs of whole disk sectors, each with its own IV.

Owns ``CipherSpec`` (a parsed dm-crypt style specification: cipher, chaining mode, IV generator,
key size), ``parse_cipher`` and ``SectorCipher``.  Supported: AES with 128/192/256-bit keys in
XTS (two keys), CBC, CTR and ECB chaining, IV generators ``plain64``, ``plain`` and
``essiv:HASH`` -- everything ``qemu-img create -f luks`` and cryptsetup make with AES.  Other
block ciphers (twofish, serpent, cast5, sm4) are refused with ``UnsupportedCipher``.

IV rule: the sectors of one call are numbered from ``iv_sector`` upwards in steps of
``iv_step`` (1 for 512-byte sectors; sector_size/512 for LUKS2's larger sectors, whose IVs
still count 512-byte units).  ``plain64`` is that number little-endian in 64 bits, ``plain``
its low 32 bits, ``essiv`` the ``plain64`` block encrypted under hash(key); the IV is padded
with zeroes to the 16-byte block.  See docs/luks.md.

Speed (measured, see docs/luks.md): ``cryptography`` needs a new context per IV, 5-15 us each,
which would cap XTS near 40 MB/s with 512-byte sectors.  So a run of sectors is processed "in
lanes": one ECB call makes every sector's tweak or IV, and the per-block work (XTS tweak
doubling in GF(2^128), CBC chaining) runs on Python integers holding one 16-byte lane per
sector, so the cost per call is a fixed number of big-integer operations per block of a
sector, not per sector.  The one-context-per-sector path remains where it is cheaper: a
single sector (or a few 4 KiB sectors), and CTR.  Both paths are checked against each other
and against QEMU in the tests.

Invariants: ``encrypt`` never modifies its input and returns new bytes; ``decrypt`` may be given
the buffer it fills (it reads everything before writing); lengths are whole sectors.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import CryptoError, UnsupportedCipher
from .kdf import hash_name

BLOCK = 16  # the AES block
CHAINS = ("xts", "cbc", "ctr", "ecb")
IVGENS = ("plain64", "plain", "essiv")
_AES_KEYS = (16, 24, 32)
# Per-sector library calls beat lanes when sectors * LIB_COST < blocks per sector (measured:
# a context costs about as much as this many lane steps).
_LIB_COST = {"xts": 12, "cbc": 4}
_TOP_BIT = b"\0" * 15 + b"\x80"  # bit 127 of a little-endian 128-bit lane
# Bytes per lane pass: big integers past the CPU caches cost more per byte (measured: 1 MiB runs
# at about half the rate of 64-128 KiB pieces).
LANE_CHUNK = 128 << 10


@dataclass(frozen=True)
class CipherSpec:
    cipher: str  # "aes"
    chain: str  # xts | cbc | ctr | ecb
    ivgen: str | None  # plain64 | plain | essiv | None (ecb)
    ivhash: str | None  # the essiv hash (hashlib name)
    key_size: int  # bytes of key material (both XTS keys together)

    @property
    def name(self) -> str:
        iv = "" if self.ivgen is None else f"-{self.ivgen}" + (f":{self.ivhash}" if self.ivhash else "")
        return f"{self.cipher}-{self.chain}{iv}"


def parse_cipher(cipher: str, mode: str, key_size: int) -> CipherSpec:
    """``("aes", "xts-plain64", 64)`` -> CipherSpec; raises CryptoError / UnsupportedCipher."""
    cipher = cipher.lower()
    if cipher != "aes":
        raise UnsupportedCipher(f"cipher {cipher!r} is not supported (nbdserve decrypts AES only)")
    chain, _, iv = mode.lower().partition("-")
    if chain not in CHAINS:
        raise UnsupportedCipher(f"cipher mode {mode!r} is not supported (one of {', '.join(CHAINS)})")
    ivgen, _, ivhash = iv.partition(":")
    if chain == "ecb":
        if ivgen:
            raise CryptoError(f"cipher mode {mode!r}: ECB takes no IV generator")
        ivgen_or_none = None
    elif ivgen not in IVGENS:
        raise UnsupportedCipher(f"IV generator {ivgen or '(none)'!r} in {mode!r} is not supported")
    else:
        ivgen_or_none = ivgen
    ivhash_name = None
    if ivgen == "essiv":
        if not ivhash:
            raise CryptoError(f"cipher mode {mode!r}: essiv needs a hash (essiv:sha256)")
        ivhash_name = hash_name(ivhash)
        if hashlib.new(ivhash_name).digest_size not in _AES_KEYS:
            raise UnsupportedCipher(f"cipher mode {mode!r}: {ivhash} digests are not an AES key size")
    elif ivhash:
        raise CryptoError(f"cipher mode {mode!r}: only essiv takes a hash")
    sizes = tuple(2 * k for k in _AES_KEYS) if chain == "xts" else _AES_KEYS
    if key_size not in sizes:
        raise CryptoError(f"key size {key_size} bytes does not fit aes-{chain} (one of {sizes})")
    return CipherSpec("aes", chain, ivgen_or_none, ivhash_name, key_size)


def parse_cipher_string(spec: str, key_size: int) -> CipherSpec:
    """A LUKS2 ``encryption`` string such as ``aes-xts-plain64``."""
    cipher, sep, mode = spec.partition("-")
    if not sep or cipher.startswith("capi:"):
        raise UnsupportedCipher(f"encryption {spec!r} is not supported")
    return parse_cipher(cipher, mode, key_size)


def _ecb(key: bytes) -> Cipher:
    return Cipher(algorithms.AES(key), modes.ECB())


class SectorCipher:
    """One key and one specification; encrypts and decrypts whole sectors in bulk."""

    def __init__(self, spec: CipherSpec, key: bytes, *, sector_size: int = 512, iv_step: int = 1) -> None:
        if len(key) != spec.key_size:
            raise CryptoError(f"{spec.name}: key is {len(key)} bytes, expected {spec.key_size}")
        self.spec = spec
        self.sector_size = sector_size
        self.iv_step = iv_step
        self._blocks = sector_size // BLOCK
        self._chunk = max(LANE_CHUNK // sector_size, 1) * sector_size
        self._key = key
        chain = spec.chain
        if chain == "xts":
            k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
            if k1 == k2:
                raise CryptoError("XTS key halves are equal (refused: XTS needs two different keys)")
            data_cipher = _ecb(k1)
            self._tweak = _ecb(k2).encryptor()
            # cryptography's XTS takes 2x128 and 2x256-bit keys only.
            self._lib_ok = len(key) in (32, 64)
        else:
            data_cipher = _ecb(key)
            self._lib_ok = True
        # ECB contexts keep no state between whole-block updates, so one of each serves forever.
        self._enc = data_cipher.encryptor()
        self._dec = data_cipher.decryptor()
        self._essiv = None
        if spec.ivgen == "essiv":
            assert spec.ivhash is not None
            self._essiv = _ecb(hashlib.new(spec.ivhash, key).digest()).encryptor()

    # -- public ------------------------------------------------------------------------------

    def encrypt(self, iv_sector: int, data: bytes | bytearray | memoryview) -> bytes | bytearray:
        """The ciphertext of whole sectors; ``data`` is left untouched."""
        if len(data) <= self._chunk:
            return self._crypt(iv_sector, data, True)
        out = bytearray(len(data))
        view = memoryview(data)
        for pos in range(0, len(data), self._chunk):
            piece = view[pos : pos + self._chunk]
            out[pos : pos + len(piece)] = self._crypt(iv_sector + pos // self.sector_size * self.iv_step, piece, True)
        return out

    def decrypt(self, iv_sector: int, buf: bytearray | memoryview) -> None:
        """Decrypt whole sectors in place."""
        view = memoryview(buf)
        for pos in range(0, len(buf), self._chunk):
            piece = view[pos : pos + self._chunk]
            piece[:] = self._crypt(iv_sector + pos // self.sector_size * self.iv_step, piece, False)

    # -- the modes ---------------------------------------------------------------------------

    def _crypt(self, first: int, data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
        n = len(data) // self.sector_size
        assert n * self.sector_size == len(data), "whole sectors only"
        if n == 0:
            return b""
        chain = self.spec.chain
        if chain == "ecb":
            return (self._enc if encrypt else self._dec).update(data)
        if chain == "ctr" or (
            self._lib_ok and chain in _LIB_COST and (chain == "xts" or encrypt) and n * _LIB_COST[chain] < self._blocks
        ):
            return self._per_sector(first, data, encrypt)
        if chain == "xts":
            return self._xts(first, data, n, encrypt)
        return self._cbc_encrypt(first, data, n) if encrypt else self._cbc_decrypt(first, data, n)

    def _ivs(self, first: int, n: int) -> bytes:
        """The IVs of ``n`` sectors from ``first``: 16 bytes each, concatenated."""
        stop = first + n * self.iv_step
        if self.spec.ivgen == "plain" and stop > 1 << 32:
            numbers = array("Q", (s & 0xFFFFFFFF for s in range(first, stop, self.iv_step)))
        else:
            numbers = array("Q", range(first, stop, self.iv_step))
        ivs = array("Q", bytes(16 * n))
        ivs[0::2] = numbers
        raw = ivs.tobytes()
        return raw if self._essiv is None else self._essiv.update(raw)

    def _per_sector(self, first: int, data: bytes | bytearray | memoryview, encrypt: bool) -> bytes:
        """One library context per sector (XTS/CBC/CTR with the sector's IV)."""
        ss = self.sector_size
        ivs = self._ivs(first, len(data) // ss)
        mode = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}[self.spec.chain]
        algo = algorithms.AES(self._key)
        view = memoryview(data)
        out = bytearray(len(data))
        for k in range(len(data) // ss):
            cipher = Cipher(algo, mode(ivs[16 * k : 16 * k + 16]))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out[k * ss : (k + 1) * ss] = ctx.update(view[k * ss : (k + 1) * ss])
        return bytes(out)

    def _xts(self, first: int, data: bytes | bytearray | memoryview, n: int, encrypt: bool) -> bytes:
        """XTS: C = E1(P ^ X) ^ X with X(sector, j) = E2(IV(sector)) * alpha^j in GF(2^128)."""
        tweaks = self._tweak.update(self._ivs(first, n))
        mask = int.from_bytes(self._xts_mask(tweaks, n), "little")
        size = len(data)
        x = (int.from_bytes(data, "little") ^ mask).to_bytes(size, "little")
        y = (self._enc if encrypt else self._dec).update(x)
        return (int.from_bytes(y, "little") ^ mask).to_bytes(size, "little")

    def _xts_mask(self, tweaks: bytes, n: int) -> bytearray:
        """Every block's XTS tweak, in data order.  One integer holds the n sectors' current
        tweaks as 128-bit little-endian lanes; each step multiplies all lanes by alpha (shift
        left, the bit leaving a lane folds back as 0x87) and scatters them to block j."""
        words = self.sector_size // 8
        lanes = int.from_bytes(tweaks, "little")
        top = int.from_bytes(_TOP_BIT * n, "little")
        mask = bytearray(n * self.sector_size)
        out = memoryview(mask).cast("Q")
        for j in range(self._blocks):
            cur = memoryview(lanes.to_bytes(16 * n, "little")).cast("Q")
            out[2 * j :: words] = cur[0::2]
            out[2 * j + 1 :: words] = cur[1::2]
            carry = lanes & top
            lanes = ((lanes ^ carry) << 1) ^ ((carry >> 127) * 0x87)
        return mask

    def _cbc_decrypt(self, first: int, data: bytes | bytearray | memoryview, n: int) -> bytes:
        """CBC decryption is parallel: P(j) = D(C(j)) ^ C(j-1), with the IV before block 0."""
        size = len(data)
        prev = bytearray(size)
        prev[BLOCK:] = memoryview(data)[: size - BLOCK]
        words = self.sector_size // 8
        pq = memoryview(prev).cast("Q")
        iq = memoryview(self._ivs(first, n)).cast("Q")
        pq[0::words] = iq[0::2]
        pq[1::words] = iq[1::2]
        y = self._dec.update(data)
        return (int.from_bytes(y, "little") ^ int.from_bytes(prev, "little")).to_bytes(size, "little")

    def _cbc_encrypt(self, first: int, data: bytes | bytearray | memoryview, n: int) -> bytes:
        """CBC encryption chains within a sector: block j of every sector at once, one ECB call
        per block position."""
        words = self.sector_size // 8
        src = memoryview(data).cast("B").cast("Q")
        out = bytearray(len(data))
        dst = memoryview(out).cast("Q")
        lane = bytearray(16 * n)
        lq = memoryview(lane).cast("Q")
        prev = int.from_bytes(self._ivs(first, n), "little")
        for j in range(self._blocks):
            lq[0::2] = src[2 * j :: words]
            lq[1::2] = src[2 * j + 1 :: words]
            c = self._enc.update((int.from_bytes(lane, "little") ^ prev).to_bytes(16 * n, "little"))
            cq = memoryview(c).cast("Q")
            dst[2 * j :: words] = cq[0::2]
            dst[2 * j + 1 :: words] = cq[1::2]
            prev = int.from_bytes(c, "little")
        return bytes(out)


def legacy_qcow_cipher(passphrase: bytes) -> SectorCipher:
    """qcow2 crypt_method 1: AES-128-CBC, IV plain64 of the guest sector, key = the passphrase
    up to its first NUL, cut or zero-padded to 16 bytes (docs/luks.md, "Legacy qcow2 AES")."""
    key = passphrase.split(b"\0", 1)[0][:16].ljust(16, b"\0")
    return SectorCipher(CipherSpec("aes", "cbc", "plain64", None, 16), key)
