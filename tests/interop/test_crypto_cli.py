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
