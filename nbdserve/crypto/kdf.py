"""Key derivation for LUKS keyslots and digests: PBKDF2 and Argon2, with limits.

Owns the hash names LUKS headers may use (``hash_name``), ``pbkdf2`` (OpenSSL's, through
``hashlib``), ``argon2`` (argon2-cffi, imported on first use), and the limits that bound the
time and memory a hostile header can make an open cost:
  * PBKDF2 iteration counts above ``MAX_PBKDF2_ITERATIONS`` are refused before any work (a
    legitimate count is what the creating machine did in a few seconds; QEMU's default is 2 s);
  * Argon2: memory at most ``MAX_ARGON2_MEMORY_KIB`` (cryptsetup's default ceiling), time cost
    times memory at most ``MAX_ARGON2_WORK_KIB``, at most ``MAX_ARGON2_LANES`` lanes.
``check_*`` run at header parse time, so a refused header costs nothing.
"""

from __future__ import annotations

import hashlib

from .errors import CryptoError, UnsupportedCipher

MAX_PBKDF2_ITERATIONS = 100_000_000
MAX_ARGON2_MEMORY_KIB = 1 << 20  # 1 GiB
MAX_ARGON2_WORK_KIB = 32 << 20  # time cost x memory: 32 GiB of block passes
MAX_ARGON2_LANES = 64

# LUKS hash specifications -> hashlib names (all provided by OpenSSL).
_HASHES = {
    "md5": "md5",
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "ripemd160": "ripemd160",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}


def hash_name(spec: str) -> str:
    """The hashlib name for a LUKS hash specification, or UnsupportedCipher."""
    name = _HASHES.get(spec.lower())
    if name is None:
        raise UnsupportedCipher(f"hash {spec!r} is not supported (one of {', '.join(_HASHES)})")
    try:
        hashlib.new(name)
    except ValueError:
        raise UnsupportedCipher(f"hash {spec!r} is not available from this OpenSSL") from None
    return name


def check_pbkdf2(iterations: int, what: str) -> None:
    if iterations < 1:
        raise CryptoError(f"{what}: PBKDF2 iteration count {iterations} is not positive")
    if iterations > MAX_PBKDF2_ITERATIONS:
        raise CryptoError(
            f"{what}: {iterations} PBKDF2 iterations is more than nbdserve allows ({MAX_PBKDF2_ITERATIONS})"
        )


def check_argon2(time_cost: int, memory_kib: int, lanes: int, what: str) -> None:
    if time_cost < 1 or lanes < 1 or memory_kib < 8 * lanes:
        raise CryptoError(
            f"{what}: Argon2 parameters out of range (time {time_cost}, memory {memory_kib}, cpus {lanes})"
        )
    if memory_kib > MAX_ARGON2_MEMORY_KIB:
        raise CryptoError(
            f"{what}: Argon2 memory {memory_kib} KiB is more than nbdserve allows ({MAX_ARGON2_MEMORY_KIB})"
        )
    if time_cost * memory_kib > MAX_ARGON2_WORK_KIB:
        raise CryptoError(
            f"{what}: Argon2 time cost {time_cost} x {memory_kib} KiB is more work than nbdserve allows "
            f"({MAX_ARGON2_WORK_KIB} KiB passes)"
        )
    if lanes > MAX_ARGON2_LANES:
        raise CryptoError(f"{what}: Argon2 with {lanes} lanes is more than nbdserve allows ({MAX_ARGON2_LANES})")


def pbkdf2(hash_spec: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    return hashlib.pbkdf2_hmac(hash_spec, password, salt, iterations, length)


def argon2(kind: str, password: bytes, salt: bytes, time_cost: int, memory_kib: int, lanes: int, length: int) -> bytes:
    """``kind`` is ``argon2i`` or ``argon2id`` (version 0x13, as cryptsetup writes)."""
    try:
        from argon2.low_level import Type, hash_secret_raw
    except ImportError:
        raise UnsupportedCipher(f"{kind} keyslots need the argon2-cffi package") from None
    return hash_secret_raw(
        password,
        salt,
        time_cost=time_cost,
        memory_cost=memory_kib,
        parallelism=lanes,
        hash_len=length,
        type=Type.I if kind == "argon2i" else Type.ID,
    )
