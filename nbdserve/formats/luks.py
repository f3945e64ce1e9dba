"""The luks driver: a LUKS1 or LUKS2 container whose payload is the virtual disk, read-write.

Owns the mapping guest offset -> ``payload_offset + offset`` and the payload cipher (opened
once, from the passphrase in ``OpenOptions.passphrase``; see ``nbdserve.crypto``).  The header
and keyslots are never written.

Data path: reads read the ciphertext into the caller's buffer and decrypt it there (once the
storage read completed); writes encrypt into a new buffer and write that, so plaintext never
reaches the storage and the caller's buffer (which may be reused, or shared such as the image
layer's zero chunk) is never changed.
Requests are whole sectors (``limits.align`` = the LUKS sector size, 512, or up to 4096 for
LUKS2); the image layer does read-modify-write for anything smaller.  The IV of each sector is
its number from the payload start (in 512-byte units, plus the LUKS2 ``iv_tweak``).

What the driver does not offer, on purpose: no mapping memo (the host bytes are ciphertext, so
the image layer must always come here), no native zeroing (a hole in the file would decrypt to
noise: zeroes are written encrypted, as QEMU does), no TRIM (a hint; punching would both lose the
encrypted zeroes and reveal which sectors were freed).  Every sector is reported as data.

No metadata changes, so no lock: concurrent requests go straight to the storage.

Opening (``open_luks_on``, also used by encrypted qcow2): the header parser reads through a
synchronous callback; it is served from bytes read ahead from the storage, and a read they do
not cover is fetched and the parse starts over (a few rounds: the header, a LUKS2 JSON area).
The keyslots' key material is read before the key derivation runs, so that expensive step runs
once per keyslot.
"""

from __future__ import annotations

from ..cache import ClusterCache
from ..crypto import CryptoError, LuksHeader, SectorCipher, UnsupportedCipher, WrongKey, is_luks, parse_luks, unlock
from ..crypto.luks import material_size
from ..errors import CorruptImage, ImageError, UnsupportedImage
from ..storage.base import Pending, Storage, read_at
from .base import Caps, FormatDriver, Limits, OpenOptions

MAX_TRANSFER = 4 << 20  # bounds the transient memory of one request's bulk cipher work
MAX_PARSE_ROUNDS = 16  # reads the header parser may ask for (a valid header needs a few)


class _Missing(Exception):
    """The parser asked for bytes not read ahead yet (see "Opening")."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


async def open_luks_on(
    storage: Storage, base: int, size: int, passphrase: bytes, area: int | None = None
) -> tuple[LuksHeader, SectorCipher]:
    """The LUKS header at ``base`` of ``storage`` (a container of ``size`` bytes), unlocked with
    ``passphrase``: the header and its payload cipher.  Raises ``CryptoError``."""
    have: dict[tuple[int, int], bytes] = {}

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, size - offset))
        got = have.get((offset, length))
        if got is None:
            raise _Missing(offset, length)
        return got

    async def fetch(offset: int, length: int) -> None:
        length = max(0, min(length, size - offset))
        have[(offset, length)] = bytes(await read_at(storage, base + offset, length))

    for _ in range(MAX_PARSE_ROUNDS):
        try:
            header = parse_luks(read, size, area)
            break
        except _Missing as m:
            await fetch(m.offset, m.length)
    else:
        raise CryptoError("LUKS header: too many reads to parse it")
    for slot in header.keyslots:
        await fetch(slot.area_offset, material_size(slot.key_size))
    return header, header.payload_cipher(unlock(header, read, passphrase))


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

    def __init__(self, storage: Storage, readonly: bool, header: LuksHeader, cipher: SectorCipher) -> None:
        self.storage = storage
        self.readonly = readonly
        self.cipher = cipher
        self.payload = header.payload_offset
        self.iv_base = header.iv_tweak  # IV of the payload's first 512 bytes
        ss = header.sector_size
        available = header.payload_size if header.payload_size is not None else storage.size - header.payload_offset
        self.size = available // ss * ss
        self.limits = Limits(align=ss, max_transfer=MAX_TRANSFER)
        self.caps = Caps()

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if is_luks(head) else 0

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> LuksDriver:
        if options.passphrase is None:
            raise UnsupportedImage(
                storage.name,
                "LUKS image needs its passphrase: --object secret,id=ID,file=PATH and key-secret=ID "
                "(or -f raw to serve the encrypted bytes)",
            )

        try:
            header, cipher = await open_luks_on(storage, 0, storage.size, options.passphrase)
        except CryptoError as e:
            raise unlock_error(storage.name, e) from None
        return cls(storage, readonly, header, cipher)

    def read(self, offset: int, buf: memoryview) -> Pending:
        pending = self.storage.read(self.payload + offset, buf)
        if pending is not None:
            return self._decrypt_after(pending, offset, buf)
        self.cipher.decrypt(self.iv_base + (offset >> 9), buf)
        return None

    async def _decrypt_after(self, pending: Pending, offset: int, buf: memoryview) -> None:
        await pending
        self.cipher.decrypt(self.iv_base + (offset >> 9), buf)

    def write(self, offset: int, data: memoryview, *, fua: bool) -> Pending:
        pending = self.storage.write(self.payload + offset, self.cipher.encrypt(self.iv_base + (offset >> 9), data))
        if fua:
            return self._flush_after(pending)
        return pending

    async def _flush_after(self, pending: Pending) -> None:
        if pending is not None:
            await pending
        await self.storage.flush()

    async def flush(self) -> None:
        await self.storage.flush()

    async def close(self) -> None:
        if not self.readonly:
            await self.storage.flush()
