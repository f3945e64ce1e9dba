"""The luks driver: a LUKS1 or LUKS2 container whose payload is the virtual disk, read-write.

Owns the mapping guest offset -> ``payload_offset + offset`` and the payload cipher (opened
once, from the passphrase in ``OpenOptions.passphrase``; see ``nbdserve.crypto``).  The header
and keyslots are never written.

Data path: reads pread the ciphertext into the caller's buffer and decrypt it there; writes
encrypt into a new buffer and pwrite that, so plaintext never reaches the file and the caller's
buffer (which may be reused, or shared such as the image layer's zero chunk) is never changed.
Requests are whole sectors (``limits.align`` = the LUKS sector size, 512, or up to 4096 for
LUKS2); the image layer does read-modify-write for anything smaller.  The IV of each sector is
its number from the payload start (in 512-byte units, plus the LUKS2 ``iv_tweak``).

What the driver does not offer, on purpose: no mapping memo (the host bytes are ciphertext, so
the image layer must always come here), no native zeroing (a hole in the file would decrypt to
noise: zeroes are written encrypted, as QEMU does), no TRIM (a hint; punching would both lose the
encrypted zeroes and reveal which sectors were freed).  Every sector is reported as data.

No metadata changes, so no lock: concurrent requests go straight to the file.
"""

from __future__ import annotations

from ..blockfile import BlockFile
from ..cache import ClusterCache
from ..crypto import CryptoError, LuksHeader, SectorCipher, UnsupportedCipher, WrongKey, is_luks, open_luks
from ..errors import CorruptImage, ImageError, UnsupportedImage
from .base import Caps, FormatDriver, Limits, OpenOptions

MAX_TRANSFER = 4 << 20  # bounds the transient memory of one request's bulk cipher work


def unlock_error(path: str, err: CryptoError) -> ImageError:
    """The one-line open error for a crypto failure."""
    if isinstance(err, WrongKey):
        return ImageError(path, str(err))
    if isinstance(err, UnsupportedCipher):
        return UnsupportedImage(path, str(err))
    return CorruptImage(path, f"LUKS header: {err}")


class LuksDriver(FormatDriver):
    format_name = "luks"
    encrypted = True

    def __init__(self, file: BlockFile, readonly: bool, header: LuksHeader, cipher: SectorCipher) -> None:
        self.file = file
        self.readonly = readonly
        self.cipher = cipher
        self.payload = header.payload_offset
        self.iv_base = header.iv_tweak  # IV of the payload's first 512 bytes
        ss = header.sector_size
        available = header.payload_size if header.payload_size is not None else file.size - header.payload_offset
        self.size = available // ss * ss
        self.limits = Limits(align=ss, max_transfer=MAX_TRANSFER)
        self.caps = Caps()

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if is_luks(head) else 0

    @classmethod
    async def open(cls, file: BlockFile, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> LuksDriver:
        if options.passphrase is None:
            raise UnsupportedImage(
                file.path,
                "LUKS image needs its passphrase: --object secret,id=ID,file=PATH and key-secret=ID "
                "(or -f raw to serve the encrypted bytes)",
            )

        def read(offset: int, length: int) -> bytes:
            return bytes(file.pread(length, offset))

        try:
            header, cipher = open_luks(read, file.size, options.passphrase)
        except CryptoError as e:
            raise unlock_error(file.path, e) from None
        return cls(file, readonly, header, cipher)

    def read_now(self, offset: int, buf: memoryview) -> bool:
        self.file.pread_into(buf, self.payload + offset)
        self.cipher.decrypt(self.iv_base + (offset >> 9), buf)
        return True

    async def preadv(self, offset: int, buf: memoryview) -> None:
        self.read_now(offset, buf)

    def write_now(self, offset: int, data: memoryview) -> bool:
        self.file.pwrite(self.cipher.encrypt(self.iv_base + (offset >> 9), data), self.payload + offset)
        return True

    async def pwritev(self, offset: int, data: memoryview, *, fua: bool) -> None:
        self.write_now(offset, data)
        if fua:
            await self.file.flush()

    async def flush(self) -> None:
        await self.file.flush()

    async def close(self) -> None:
        if not self.readonly:
            await self.file.flush()
