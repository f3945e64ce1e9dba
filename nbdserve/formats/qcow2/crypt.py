"""qcow2 encryption: the key, and the per-sector transform of data clusters.

Owns ``CryptMixin``: ``_open_crypto`` (crypt_method 1, legacy AES: the key comes from the
passphrase itself; crypt_method 2, LUKS: a LUKS1 header in the clusters named by the
full-disk-encryption header extension, unlocked with the passphrase) and the transform every
data path applies: ``_plaintext`` right after reading a data cluster, ``_ciphertext`` right
before writing one.  IVs (docs/luks.md, "qcow2"): LUKS counts 512-byte sectors of the host file
offset, legacy AES those of the guest offset.  Metadata is never encrypted.

What the other mixins do differently when ``self.crypt`` is set: requests are whole 512-byte
sectors (``limits.align``); no mapping memo (``map_bits`` 0: the image layer must not read
ciphertext past us); a fresh cluster's bytes around a write are written as encrypted zeroes (a
hole in the file would decrypt to noise); block status never calls a data cluster ZERO;
compressed clusters are refused (qcow2 does not combine compression with encryption).
"""

from __future__ import annotations

from ...crypto import CryptoError, SectorCipher, legacy_qcow_cipher
from ...errors import UnsupportedImage
from ..base import Limits
from ..luks import open_luks_on, unlock_error

CRYPT_AES = 1
CRYPT_LUKS = 2
SECTOR = 512


class CryptMixin:
    """Encryption of data clusters (no lock: the cipher is fixed once the image is open)."""

    crypt: SectorCipher | None = None
    crypt_host_iv = False  # IVs from the host offset (LUKS) or the guest offset (legacy AES)

    async def _open_crypto(self, passphrase: bytes | None) -> None:
        h = self.header
        name = "luks" if h.crypt_method == CRYPT_LUKS else "aes"
        if passphrase is None:
            raise UnsupportedImage(
                self.path,
                f"encrypted qcow2 ({name}) needs its passphrase: --object secret,id=ID,file=PATH and "
                "encrypt.key-secret=ID",
            )
        if h.crypt_method == CRYPT_AES:
            self.crypt = legacy_qcow_cipher(passphrase)
        else:
            offset, length = h.crypto_header
            try:
                header, self.crypt = await open_luks_on(self.storage, offset, length, passphrase, area=length)
            except CryptoError as e:
                raise unlock_error(self.path, e) from None
            if header.sector_size != SECTOR:
                raise UnsupportedImage(self.path, f"LUKS sector size {header.sector_size} in qcow2 (QEMU uses 512)")
            self.crypt_host_iv = True
        self.encrypted = True
        self.map_bits = 0
        self.limits = Limits(align=SECTOR)

    def _plaintext(self, buf: memoryview, guest: int, host: int) -> None:
        """Decrypt, in place, data just read from host offset ``host`` (guest offset ``guest``)."""
        if self.crypt is not None:
            self.crypt.decrypt((host if self.crypt_host_iv else guest) >> 9, buf)

    def _ciphertext(self, data: memoryview, guest: int, host: int) -> bytes | bytearray | memoryview:
        """What to write at host offset ``host`` for guest data ``data``: ``data`` itself, or
        its encryption in a new buffer (the caller's buffer is never changed)."""
        if self.crypt is None:
            return data
        return self.crypt.encrypt((host if self.crypt_host_iv else guest) >> 9, data)
