"""Encrypted qcow2 over NBD (``encrypt.format=luks`` and legacy ``aes``): nbdserve against
qemu-nbd, both given the key, and QEMU judging the files nbdserve wrote.

* Read: images from ``qemu-img create -f qcow2 -o encrypt.format=...`` (LUKS with the default
  and a CBC-ESSIV cipher, 4 KiB clusters, extended L2; legacy AES), written by qemu-io: same
  bytes, maps and unaligned reads as qemu-nbd.
* Write: one seeded libnbd trace (unaligned writes, zeroes, FUA, flushes) on both servers, also
  over a raw backing file (partial-cluster copy-on-write decrypts nothing from the backing file
  and encrypts the copied bytes at the new place); the two files then hold the same disk
  (``qemu-img compare`` with the key) and ``qemu-img check`` is clean.
* Plaintext: a pattern written through NBD is absent from the file, present once decrypted.
* Keys: a wrong LUKS passphrase and a missing key are refused in one line at start.
* Crash: kill -9 with writes in flight; QEMU decrypts every flushed write.
"""

from __future__ import annotations

import random
import shutil
import signal

import pytest
from lukstest import (
    MOTIF,
    assert_no_plaintext,
    check_clean_key,
    key_config,
    make_qcow2,
    qemu_compare_key,
    qemu_io_key,
    qemu_nbd_key,
    qemu_raw_key,
    secret_file,
    serve_key,
    start_fails,
    unaligned_reads_equal,
)

from tests.conftest import SLOW
from tests.imagetest import CrashOracle, assert_same_export, crash_workload, random_trace, replay_trace
from tests.util import nbd_connect

MiB = 1 << 20
VARIANTS = {
    "luks": ("luks", [], {}),
    "luks-cbc-essiv": (
        "luks",
        [],
        {"cipher_alg": "aes-128", "cipher_mode": "cbc", "ivgen_alg": "essiv", "ivgen_hash_alg": "sha256"},
    ),
    "luks-4k": ("luks", ["-o", "cluster_size=4k"], {}),
    "luks-extl2": ("luks", ["-o", "extended_l2=on,cluster_size=128k"], {}),
    "aes": ("aes", [], {}),
}
FILL = [
    "write -P 0xab 0 64k",
    "write -P 0xcd 100k 4k",
    "write -P 0x11 3M 1M",
    "write -z 5M 128k",
    "write -P 0x22 7M 512",
]


def make(tmp, name, variant, size=8 * MiB, *more):
    secret = secret_file(tmp)
    encrypt, args, opts = VARIANTS[variant]
    return make_qcow2(tmp / name, size, secret, encrypt, *args, *more, **opts), secret


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encrypted_qcow2_read_like_qemu_nbd(tmp_path, variant):
    img, secret = make(tmp_path, "r.qcow2", variant)
    qemu_io_key(img, "qcow2", secret, *FILL)
    with (
        qemu_nbd_key(tmp_path, img, "qcow2", secret, "-r") as theirs,
        serve_key(tmp_path, img, secret, readonly=True) as ours,
    ):
        assert_same_export(ours, theirs, maps=True)
        unaligned_reads_equal(ours.uri, theirs.uri, 8 * MiB, random.Random(variant))


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "backing"])
@pytest.mark.parametrize("variant", ["luks", "luks-extl2", "aes"])
def test_encrypted_qcow2_writes_like_qemu_nbd(tmp_path, variant, backing):
    size = 8 * MiB
    more = []
    if backing:
        base = tmp_path / "base.raw"
        base.write_bytes(random.Random(1).randbytes(6 * MiB))  # shorter than the disk
        more = ["-b", str(base), "-F", "raw"]
    theirs, secret = make(tmp_path, "t.qcow2", variant, size, *more)
    qemu_io_key(theirs, "qcow2", secret, "write -P 0x5a 1M 300k")
    ours = tmp_path / "o.qcow2"
    shutil.copyfile(theirs, ours)
    ops = random_trace(random.Random(f"{variant}{backing}"), size, 60, max_len=200_000)
    with qemu_nbd_key(tmp_path, theirs, "qcow2", secret, "--cache=writeback") as q:
        replay_trace(q.uri, ops)
    with serve_key(tmp_path, ours, secret) as o:
        replay_trace(o.uri, ops)
    r = qemu_compare_key(ours, "qcow2", theirs, "qcow2", secret)
    assert r.returncode == 0, r.stdout + r.stderr
    check_clean_key(ours, secret)


@pytest.mark.parametrize("variant", ["luks", "aes"])
def test_encrypted_qcow2_no_plaintext_reaches_the_file(tmp_path, variant):
    import nbd

    img, secret = make(tmp_path, "p.qcow2", variant, 4 * MiB)
    with serve_key(tmp_path, img, secret) as srv:
        h = nbd_connect(srv.uri)
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        h.pwrite(MOTIF * 512, 0)
        h.pwrite(MOTIF * 100 + b"tail", 100_001)  # partial clusters and sectors
        h.pwrite(MOTIF, 2 * MiB - 3, nbd.CMD_FLAG_FUA)
        h.zero(1000, 300)
        h.flush()
        h.shutdown()
    plain = qemu_raw_key(img, "qcow2", secret, tmp_path)
    assert plain[300:1300] == bytes(1000)
    assert_no_plaintext(img, plain)
    check_clean_key(img, secret)


def test_encrypted_qcow2_keys_refused(tmp_path):
    img, _ = make(tmp_path, "w.qcow2", "luks", MiB)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not it")
    assert "invalid password" in start_fails(tmp_path, "--config", key_config(tmp_path, img, wrong))
    assert "needs its passphrase" in start_fails(tmp_path, str(img))


@pytest.mark.parametrize("round", range(8 if SLOW else 2))
def test_encrypted_qcow2_kill9_keeps_flushed_writes(tmp_path, round):
    rng = random.Random(round)
    size = 6 * MiB
    img, secret = make(tmp_path, "k.qcow2", "luks" if round % 2 == 0 else "aes", size, "-o", "cluster_size=4k")
    oracle = CrashOracle(bytes(size))
    with serve_key(tmp_path, img, secret, check_stop=False) as srv:
        crash_workload(
            nbd_connect(srv.uri), rng, oracle, max_len=100 * 512, ops=rng.randint(5, 30), in_flight=rng.randint(0, 8)
        )
        srv.stop(signal.SIGKILL)
    oracle.verify(qemu_raw_key(img, "qcow2", secret, tmp_path))
    with serve_key(tmp_path, img, secret, repair="leaks"):  # reopens, repairing leaks, stops cleanly
        pass
    check_clean_key(img, secret)
