"""Disk encryption: LUKS1/LUKS2 headers, key derivation, and sector ciphers.

Owns everything between a passphrase and a ready ``SectorCipher``:
  * ``ciphers``: cipher specifications (``aes-xts-plain64``, ``aes-cbc-essiv:sha256``, ...) and
    ``SectorCipher``, which encrypts and decrypts runs of whole sectors in bulk;
  * ``kdf``: PBKDF2 and Argon2 with the limits that keep a hostile header from costing unbounded
    time or memory;
  * ``luks``: parsing LUKS1 and LUKS2 headers (both LUKS2 copies), anti-forensic merge,
    keyslot unlocking and master-key digest checks;
  * ``secret``: QEMU's secret objects (where a passphrase comes from).

Nothing here does I/O on its own: callers pass a ``read(offset, length)`` function.  The facts
the code relies on are written down in docs/luks.md.
"""

from __future__ import annotations

from .ciphers import CipherSpec, SectorCipher, legacy_qcow_cipher, parse_cipher
from .errors import CryptoError, UnsupportedCipher, WrongKey
from .luks import LuksHeader, is_luks, open_luks, parse_luks, unlock

__all__ = [
    "CipherSpec",
    "CryptoError",
    "LuksHeader",
    "SectorCipher",
    "UnsupportedCipher",
    "WrongKey",
    "is_luks",
    "legacy_qcow_cipher",
    "open_luks",
    "parse_cipher",
    "parse_luks",
    "unlock",
]
