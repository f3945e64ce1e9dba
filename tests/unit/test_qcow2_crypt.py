"""Encrypted qcow2 opened in-process: the parts QEMU cannot show over NBD.

* The LUKS header clusters count as metadata: a read-write open that repairs leaks keeps them
  (QEMU still opens the image with the key afterwards, ``qemu-img check`` clean), and a guest
  write can never land on them (the overlap map names them).
* Hostile full-disk-encryption extensions and embedded LUKS headers: one-line refusals.
* Legacy AES: QEMU cannot tell a wrong key; neither can we -- the data reads as noise, and the
  test pins that down so nobody mistakes it for a check.
* A compressed cluster in an encrypted image fails the read with EIO, never serves ciphertext.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from lukstest import PASSWORD, check_clean_key, make_qcow2, qemu_io_key, qemu_raw_key, secret_file

from nbdserve.cache import ClusterCache
from nbdserve.errors import ImageError
from nbdserve.formats.base import OpenOptions
from nbdserve.formats.qcow2.overlap import CRYPTO
from nbdserve.image import ImageSpec, open_image
from tests.imagetest import read_image, run

MiB = 1 << 20


def open_with(path: Path, passphrase: bytes | None = PASSWORD, *, readonly: bool = True, repair: str = "off"):
    spec = ImageSpec(
        str(path), format="qcow2", readonly=readonly, options=OpenOptions(passphrase=passphrase, repair=repair)
    )
    return open_image(spec, ClusterCache(8 << 20))


def crypto_ext(raw: bytes) -> tuple[int, int, int]:
    """(position of the extension's payload, offset, length) of the FDE header extension."""
    pos = struct.unpack_from(">I", raw, 100)[0]
    while True:
        t, n = struct.unpack_from(">II", raw, pos)
        if t == 0x0537BE77:
            return (pos + 8, *struct.unpack_from(">QQ", raw, pos + 8))
        assert t, "no crypto extension"
        pos += 8 + ((n + 7) & ~7)


def test_repairing_open_keeps_the_luks_header(tmp_path):
    secret = secret_file(tmp_path)
    img = make_qcow2(tmp_path / "r.qcow2", 4 * MiB, secret)
    qemu_io_key(img, "qcow2", secret, "write -P 0x61 0 200k")
    # (Were the header clusters not counted as metadata, the check would take them for leaked
    # clusters -- referenced by a refcount, by no table -- and the repair would free them.)

    async def main():
        image = await open_with(img, readonly=False, repair="leaks")
        drv = image.driver
        _, off, length = crypto_ext(img.read_bytes())
        assert all(drv.meta.kinds.get(c, 0) & CRYPTO for c in range(off >> drv.cb, (off + length - 1 >> drv.cb) + 1))
        assert drv.meta.conflict(off, 512) is not None  # a data write there would be refused
        await image.write(300 * 1024, memoryview(b"x" * 4096), fua=True)
        await image.close()

    run(main())
    check_clean_key(img, secret)
    data = qemu_raw_key(img, "qcow2", secret, tmp_path)
    assert data[: 200 * 1024] == b"\x61" * 200 * 1024 and data[300 * 1024 : 304 * 1024] == b"x" * 4096


@pytest.fixture(scope="module")
def luks_qcow2(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("lq")
    return make_qcow2(tmp / "base.qcow2", MiB, secret_file(tmp)).read_bytes()


def refused(tmp: Path, raw: bytes | bytearray, needle: str) -> None:
    path = tmp / "h.qcow2"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError) as e:
        run(open_with(path))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("what", "offset", "length", "needle"),
    [
        ("unaligned", 0x40200, None, "misplaced"),
        ("zero", 0, None, "misplaced"),
        ("past-eof", 1 << 40, None, "misplaced or beyond end of file"),
        ("huge", None, 1 << 40, "misplaced"),
        ("short", None, 1024, "LUKS header"),  # key material no longer inside the area
    ],
)
def test_hostile_crypto_extension(tmp_path, luks_qcow2, what, offset, length, needle):
    raw = bytearray(luks_qcow2)
    at, off, n = crypto_ext(raw)
    struct.pack_into(">QQ", raw, at, off if offset is None else offset, n if length is None else length)
    refused(tmp_path, raw, needle)


def test_hostile_embedded_luks_header(tmp_path, luks_qcow2):
    raw = bytearray(luks_qcow2)
    _, off, n = crypto_ext(raw)
    struct.pack_into(">I", raw, off + 208 + 40, (n + 4096) // 512)  # keyslot 0 key material past the area
    refused(tmp_path, raw, "runs past the encryption header area")
    raw = bytearray(luks_qcow2)
    struct.pack_into(">I", raw, off + 208 + 4, 0xFFFFFFFF)  # absurd PBKDF2 iterations
    refused(tmp_path, raw, "more than nbdserve allows")
    raw = bytearray(luks_qcow2)
    struct.pack_into(">I", raw, 32, 1)  # says AES, but carries the LUKS extension
    refused(tmp_path, raw, "not encrypted with LUKS")


def test_luks_wrong_key_and_no_key(tmp_path, luks_qcow2):
    path = tmp_path / "k.qcow2"
    path.write_bytes(luks_qcow2)
    with pytest.raises(ImageError, match="invalid password"):
        run(open_with(path, b"wrong"))
    with pytest.raises(ImageError, match="needs its passphrase"):
        run(open_with(path, None))


def test_legacy_aes_wrong_key_reads_noise(tmp_path):
    secret = secret_file(tmp_path)
    img = make_qcow2(tmp_path / "a.qcow2", MiB, secret, "aes")
    qemu_io_key(img, "qcow2", secret, "write -P 0x61 0 64k")

    async def read_with(key):
        image = await open_with(img, key)
        try:
            return await read_image(image)
        finally:
            await image.close()

    assert run(read_with(PASSWORD))[:65536] == b"\x61" * 65536
    assert run(read_with(b"wrong"))[:65536] != b"\x61" * 65536  # no way to tell: the format has no check


def test_compressed_cluster_in_encrypted_image_is_eio(tmp_path):
    """QEMU never writes one; if a hostile file has one, the read fails instead of serving it."""
    secret = secret_file(tmp_path)
    img = make_qcow2(tmp_path / "c.qcow2", MiB, secret, "aes")
    qemu_io_key(img, "qcow2", secret, "write -P 0x61 0 64k")
    raw = bytearray(img.read_bytes())
    l1 = struct.unpack_from(">Q", raw, 40)[0]
    l2 = struct.unpack_from(">Q", raw, l1)[0] & ((1 << 56) - 1) & ~511
    entry = struct.unpack_from(">Q", raw, l2)[0]
    struct.pack_into(">Q", raw, l2, (entry & ((1 << 56) - 1) & ~(1 << 63)) | (1 << 62))  # mark it compressed
    img.write_bytes(raw)

    async def main():
        image = await open_with(img)
        try:
            await image.read(0, memoryview(bytearray(4096)))
        finally:
            await image.close()

    with pytest.raises(ImageError, match="compressed cluster in an encrypted image"):
        run(main())
