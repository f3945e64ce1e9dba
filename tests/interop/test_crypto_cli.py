"""Keys on the command line, as qemu-nbd takes them: ``--object secret,...`` with
``--image-opts driver=luks,...,key-secret=ID`` or ``driver=qcow2,...,encrypt.key-secret=ID``,
and ``--export NAME=PATH,key-secret=ID``.

The same command-line tail starts nbdserve and qemu-nbd; both then serve the same disk.  Bad
keys and bad option strings stop nbdserve with one line and a non-zero exit status.
"""

from __future__ import annotations

import base64

import pytest
from lukstest import image_opts, make_luks, make_qcow2, qemu_io_key, secret_file, secret_object, start_fails

from tests.imagetest import assert_same_export
from tests.util import qemu_nbd, serve

MiB = 1 << 20


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
def test_object_and_image_opts_like_qemu_nbd(tmp_path, fmt):
    secret = secret_file(tmp_path)
    img = (make_luks if fmt == "luks" else make_qcow2)(tmp_path / f"i.{fmt}", 4 * MiB, secret)
    qemu_io_key(img, fmt, secret, "write -P 0x5a 1000k 300k")
    tail = ["--object", secret_object(secret), "--image-opts", "-r", image_opts(img, fmt)]
    with serve(tmp_path, *tail) as ours, qemu_nbd(tmp_path, tail[-1], None, "-A", *tail[:-1]) as theirs:
        assert_same_export(ours, theirs)


def test_export_key_secret_and_inline_base64_secret(tmp_path):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "e.luks", MiB, secret)
    b64 = base64.b64encode(secret.read_bytes()).decode()
    with serve(tmp_path, "--object", f"secret,id=k,data={b64},format=base64", "--export", f"vm={img},key-secret=k",
               export="vm") as srv:  # fmt: skip
        assert srv.alive()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--object", "secret,id=sec0,data=wrong", "--image-opts", "IMGOPTS"], "invalid password"),
        (["--object", "secret,id=sec0", "--image-opts", "IMGOPTS"], "exactly one of data= or file="),
        (["--object", "secret,id=other,data=x", "--image-opts", "IMGOPTS"], "no secret with that id"),
        (["--image-opts", "IMGOPTS,cache.direct=on"], "not supported"),
        (["-f", "luks", "--image-opts", "IMGOPTS"], "-f is not allowed"),
        (["--image-opts", "driver=luks"], "needs file.filename"),
        (["-s", "--object", "secret,id=sec0,file=PASSFILE", "--image-opts", "IMGOPTS"], "unencrypted overlay"),
    ],
)
def test_bad_keys_and_options_refused(tmp_path, args, needle):
    secret = secret_file(tmp_path)
    img = make_luks(tmp_path / "b.luks", MiB, secret)
    args = [a.replace("IMGOPTS", image_opts(img, "luks")).replace("PASSFILE", str(secret)) for a in args]
    assert needle in start_fails(tmp_path, *args)


def test_encrypted_backing_chain_with_its_own_key(tmp_path):
    """An encrypted qcow2 over an encrypted qcow2 with another passphrase: both keys given as QEMU
    takes them (``backing.encrypt.key-secret``); reads equal qemu-nbd's, and after the same writes
    (copy-on-write from the encrypted backing file into the encrypted top) both files hold the same
    disk as qemu-nbd reads them."""
    import random
    import shutil

    from tests.imagetest import random_trace, replay_trace

    key_base, key_top = tmp_path / "base.pass", tmp_path / "top.pass"
    key_base.write_bytes(b"base passphrase")
    key_top.write_bytes(b"top passphrase")
    base = make_qcow2(tmp_path / "base.qcow2", 4 * MiB, key_base)
    qemu_io_key(base, "qcow2", key_base, "write -P 0x33 0 3M")
    top = make_qcow2(tmp_path / "top.qcow2", 4 * MiB, key_top, "luks", "-u", "-b", str(base), "-F", "qcow2")
    objects = ["--object", f"secret,id=t,file={key_top}", "--object", f"secret,id=b,file={key_base}"]

    def opts(path):
        return f"driver=qcow2,file.filename={path},encrypt.key-secret=t,backing.encrypt.key-secret=b"

    with (
        serve(tmp_path, *objects, "--image-opts", "-r", opts(top)) as ours,
        qemu_nbd(tmp_path, opts(top), None, "-A", *objects, "--image-opts", "-r") as theirs,
    ):
        assert_same_export(ours, theirs)
    theirs_top = tmp_path / "theirs.qcow2"
    shutil.copyfile(top, theirs_top)
    ops = random_trace(random.Random(5), 4 * MiB, 30, max_len=150_000)
    with serve(tmp_path, *objects, "--image-opts", opts(top)) as ours:
        replay_trace(ours.uri, ops)
    with qemu_nbd(tmp_path, opts(theirs_top), None, *objects, "--image-opts") as theirs:
        replay_trace(theirs.uri, ops)
    with (
        qemu_nbd(tmp_path, opts(top), None, "-A", *objects, "--image-opts", "-r") as a,
        qemu_nbd(tmp_path, opts(theirs_top), None, "-A", *objects, "--image-opts", "-r") as b,
    ):
        assert_same_export(a, b)
