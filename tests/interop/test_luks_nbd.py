"""LUKS over NBD: nbdserve against qemu-nbd (both given the key), QEMU judging what we wrote.

* Read: LUKS1 images from ``qemu-img create -f luks`` (each AES variant QEMU makes), written by
  qemu-io, served by both servers: same size, bytes (``qemu-img compare`` of the URIs and
  unaligned reads) and map.
* Write: one seeded libnbd trace (unaligned writes, zeroes with and without NO_HOLE, FUA,
  flushes) replayed on both servers; the files then hold the same disk (``qemu-img compare`` with
  the key).
* Plaintext: a distinctive pattern written through NBD never appears in the file, and appears in
  what QEMU decrypts.
* LUKS2 (cryptsetup): what nbdserve writes is what QEMU reads after the payload is moved under a
  LUKS1 header holding the same volume key (cryptsetup makes it); 4096-byte sectors are checked
  against a per-sector decryption with the volume key cryptsetup reports.
* Refusals: wrong key, no key, hostile header: exit status non-zero, one line, no traceback.
* Crash: kill -9 with writes in flight; every flushed write is there when QEMU decrypts the file.
"""

from __future__ import annotations

import random
import shutil
import signal
import struct
from pathlib import Path

import nbd
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from lukstest import (
    MOTIF,
    PASSWORD,
    assert_no_plaintext,
    key_config,
    make_luks,
    make_luks2,
    qemu_compare_key,
    qemu_io_key,
    qemu_nbd_key,
    qemu_raw_key,
    secret_file,
    serve_key,
    start_fails,
    unaligned_reads_equal,
    volume_key,
)

from tests.conftest import SLOW
from tests.imagetest import CrashOracle, assert_same_export, crash_workload, random_trace, replay_trace
from tests.util import nbd_connect, run

MiB = 1 << 20


VARIANTS = {
    "default": {},
    "aes128-xts-sha512": {"cipher_alg": "aes-128", "cipher_mode": "xts", "hash_alg": "sha512"},
    "aes256-cbc-plain": {"cipher_alg": "aes-256", "cipher_mode": "cbc", "ivgen_alg": "plain"},
    "aes128-cbc-essiv": {
        "cipher_alg": "aes-128",
        "cipher_mode": "cbc",
        "ivgen_alg": "essiv",
        "ivgen_hash_alg": "sha256",
    },
    "aes256-ctr": {"cipher_alg": "aes-256", "cipher_mode": "ctr", "ivgen_alg": "plain64"},
}
FILL = [
    "write -P 0xab 0 64k",
    "write -P 0xcd 100k 4k",
    "write -P 0x11 3M 1M",
    "write -z 5M 128k",
    "write -P 0x22 7M 512",
]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_luks_read_like_qemu_nbd(tmp_path, variant):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "d.luks", "8M", secret, **VARIANTS[variant])
    qemu_io_key(img, "luks", secret, *FILL)
    with (
        qemu_nbd_key(tmp_path, img, "luks", secret, "-r") as theirs,
        serve_key(tmp_path, img, secret, readonly=True) as ours,
    ):
        assert_same_export(ours, theirs, maps=True)
        unaligned_reads_equal(ours.uri, theirs.uri, 8 * MiB, random.Random(variant))


@pytest.mark.parametrize("variant", ["default", "aes256-cbc-plain", "aes256-ctr"])
def test_luks_writes_like_qemu_nbd(tmp_path, variant):
    secret = secret_file(tmp_path)
    size = 8 * MiB
    theirs = make_luks(tmp_path / "t.luks", size, secret, **VARIANTS[variant])
    qemu_io_key(theirs, "luks", secret, "write -P 0x5a 1M 3M")
    ours = tmp_path / "o.luks"
    shutil.copyfile(theirs, ours)
    ops = random_trace(random.Random(variant), size, 60, max_len=300_000)
    with (
        qemu_nbd_key(tmp_path, theirs, "luks", secret, "--cache=writeback") as q,
        serve_key(tmp_path, ours, secret) as o,
    ):
        replay_trace(q.uri, ops)
        replay_trace(o.uri, ops)
    r = qemu_compare_key(ours, "luks", theirs, "luks", secret)
    assert r.returncode == 0, r.stdout + r.stderr


def test_luks_requests_larger_than_one_transfer(tmp_path):
    """Requests over the LUKS driver's 4 MiB transfer limit are split by the image layer: aligned
    and unaligned writes (the read-modify-write covering more than one transfer), FUA and zeroes,
    replayed on both servers; QEMU finds the same disk in both files, and large unaligned reads
    of ours equal qemu-nbd's."""
    secret = secret_file(tmp_path)
    size = 24 * MiB
    theirs = make_luks(tmp_path / "t.luks", size, secret)
    ours = tmp_path / "o.luks"
    shutil.copyfile(theirs, ours)
    ops = [
        ("write", MiB, 9 * MiB, 7),
        ("write", 3 * 512 + 1, 5 * MiB + 1000, 8),
        ("fua", 13 * MiB + 17, 6 * MiB, 9),
        ("zero_nohole", 2 * MiB + 5, 8 * MiB, 0),
        ("write", 11 * MiB, 4 * MiB + 512, 10),
        ("flush", 0, 1, 0),
    ]
    with (
        qemu_nbd_key(tmp_path, theirs, "luks", secret, "--cache=writeback") as q,
        serve_key(tmp_path, ours, secret) as o,
    ):
        replay_trace(q.uri, ops)
        replay_trace(o.uri, ops)
        a, b = nbd_connect(q.uri), nbd_connect(o.uri)
        for h in (a, b):
            h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)  # unaligned: the servers' RMW
        for offset, length in ((511, 9 * MiB + 3), (4 * MiB - 1, 5 * MiB), (0, size)):
            assert b.pread(length, offset) == a.pread(length, offset), (offset, length)
        a.shutdown()
        b.shutdown()
    r = qemu_compare_key(ours, "luks", theirs, "luks", secret)
    assert r.returncode == 0, r.stdout + r.stderr


def test_luks_no_plaintext_reaches_the_file(tmp_path):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "p.luks", "4M", secret)
    import nbd

    with serve_key(tmp_path, img, secret) as srv:
        h = nbd_connect(srv.uri)
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        h.pwrite(MOTIF * 512, 0)  # aligned, 64 KiB
        h.pwrite(MOTIF * 100 + b"tail", 100_001)  # unaligned head and tail: read-modify-write
        h.pwrite(MOTIF, 2 * MiB - 3, nbd.CMD_FLAG_FUA)  # across a sector boundary
        h.zero(1000, 300)  # zeroes between plaintext
        h.flush()
        h.shutdown()
    plain = qemu_raw_key(img, "luks", secret, tmp_path)
    assert plain[300:1300] == bytes(1000)
    assert plain[100_001 : 100_001 + 12_800] == MOTIF * 100
    assert_no_plaintext(img, plain)


# -- LUKS2 ------------------------------------------------------------------------------------


def luks1_wrap(tmp: Path, luks2: Path, vk: bytes, cipher: str) -> Path:
    """A LUKS1 container (cryptsetup, same volume key and cipher) holding ``luks2``'s payload at
    the same IV numbers, so QEMU can read what was written into the LUKS2 container."""
    payload_at = 16 * MiB  # cryptsetup's LUKS2 default data offset
    keyfile = tmp / "vk.bin"
    keyfile.write_bytes(vk)
    out = tmp / "wrapped.luks"
    data = luks2.read_bytes()[payload_at:]
    with open(out, "wb") as f:
        f.truncate(4 * MiB + len(data))
    run("cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--key-file", "-", "--volume-key-file", keyfile,
        "--key-size", str(8 * len(vk)), "--cipher", cipher, "--pbkdf-force-iterations", "1000", "--offset",
        str(4 * MiB // 512), out, input=PASSWORD.decode())  # fmt: skip
    with open(out, "r+b") as f:
        f.seek(4 * MiB)
        f.write(data)
    return out


def test_luks2_writes_read_by_qemu(tmp_path):
    secret = secret_file(tmp_path)
    img = make_luks2(tmp_path / "c2.img", 24 * MiB, PASSWORD, "--sector-size", "512")
    rng = random.Random(2)
    ops = random_trace(rng, 8 * MiB, 40, max_len=200_000)
    with serve_key(tmp_path, img, secret) as o:
        replay_trace(o.uri, ops)
        h = nbd_connect(o.uri)
        ours = h.pread(8 * MiB, 0)
        h.shutdown()
    wrapped = luks1_wrap(tmp_path, img, volume_key(img), "aes-xts-plain64")
    assert qemu_raw_key(wrapped, "luks", secret, tmp_path)[: 8 * MiB] == ours


def test_luks2_4k_sectors_decrypt_with_the_volume_key(tmp_path):
    """4096-byte sectors: each sector's IV is its offset in 512-byte units (LUKS2 with dm-crypt's
    default IV counting)."""
    secret = secret_file(tmp_path)
    img = make_luks2(tmp_path / "c4.img", 20 * MiB, PASSWORD, "--sector-size", "4096")
    data = random.Random(4).randbytes(64 * 4096)
    with serve_key(tmp_path, img, secret) as o:
        h = nbd_connect(o.uri)
        h.pwrite(data, 8192)
        h.flush()
        h.shutdown()
    vk = volume_key(img)
    raw = img.read_bytes()[16 * MiB + 8192 : 16 * MiB + 8192 + len(data)]
    plain = b""
    for k in range(len(raw) // 4096):
        iv = (8192 // 512 + 8 * k).to_bytes(16, "little")
        plain += Cipher(algorithms.AES(vk), modes.XTS(iv)).decryptor().update(raw[k * 4096 : (k + 1) * 4096])
    assert plain == data
    assert data[:64] not in raw and data[-64:] not in raw  # ciphertext only


# -- refusals ---------------------------------------------------------------------------------


def test_wrong_key_and_missing_key_are_refused(tmp_path):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "w.luks", "1M", secret)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not the password")
    assert "invalid password" in start_fails(tmp_path, "--config", key_config(tmp_path, img, wrong))
    assert "needs its passphrase" in start_fails(tmp_path, str(img))
    assert "no secret with that id" in start_fails(tmp_path, "--export", f"x={img},key-secret=nope")


def test_hostile_luks_header_refused_at_open(tmp_path):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "h.luks", "1M", secret)
    data = bytearray(img.read_bytes())
    struct.pack_into(">I", data, 208 + 4, 0xFFFFFFFF)  # keyslot 0 PBKDF2 iterations
    img.write_bytes(data)
    assert "more than nbdserve allows" in start_fails(tmp_path, "--config", key_config(tmp_path, img, secret))


# -- crash ------------------------------------------------------------------------------------


@pytest.mark.parametrize("round", range(12 if SLOW else 3))
def test_luks_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    secret = secret_file(tmp_path)
    size = 6 * MiB
    img = make_luks(tmp_path / "k.luks", size, secret)
    qemu_io_key(img, "luks", secret, f"write -z 0 {size}")  # a known start: encrypted zeroes
    oracle = CrashOracle(bytes(size))
    with serve_key(tmp_path, img, secret, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=100 * 512, ops=rng.randint(5, 30), in_flight=rng.randint(0, 8)
        )
        srv.stop(signal.SIGKILL)
    oracle.verify(qemu_raw_key(img, "luks", secret, tmp_path))
