"""Safe probing (docs/probing.md): images of formats nbdserve does not decode are refused unless
``-f raw`` is given, naming the format QEMU also sees; and a client cannot turn a probed-raw export
into an image of another format by writing a header into its first sector (EPERM, as QEMU does),
while an explicit ``-f raw`` export takes any write.

The foreign images are made by ``qemu-img create``; QEMU's own probe (``qemu-img info``) is the
oracle for which format each one is.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import nbd
import pytest

from nbdserve.formats import BY_NAME, UNDECODED, identify
from tests.lukstest import make_luks, secret_file
from tests.util import nbd_connect, qemu_img, run, serve, start_error

MiB = 1 << 20

FOREIGN = {
    "vmdk": [],
    "vmdk-descriptor": ["-o", "subformat=monolithicFlat"],
    "vdi": [],
    "parallels": [],
    "qcow": [],
    "luks": [],  # made by make_luks, which retries qemu-img's flaky PBKDF benchmark
}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """kind -> (an image of it made by qemu-img, the format QEMU probes it as)."""
    d = tmp_path_factory.mktemp("foreign")
    out = {}
    for kind, opts in FOREIGN.items():
        fmt = kind.split("-")[0]
        path = d / f"{kind}.{fmt}"
        if fmt == "luks":
            make_luks(path, "1M", secret_file(d))
        else:
            qemu_img("create", "-q", "-f", fmt, *opts, path, "1M")
        out[kind] = path, json.loads(qemu_img("info", "--output=json", path).stdout)["format"]
    return out


@pytest.mark.parametrize("kind", [k for k in FOREIGN if k.split("-")[0] not in BY_NAME])  # no driver yet
def test_undecoded_formats_are_refused_unless_raw_is_explicit(tmp_path, foreign, kind):
    path, qemu_format = foreign[kind]
    line = start_error(tmp_path, path)
    assert f"a {qemu_format} image" in line and "-f raw" in line, line
    assert str(path) in line  # the operator sees the file
    with serve(tmp_path, "-r", "-f", "raw", path) as srv:  # explicit: the file's bytes, as they are
        assert run("nbdinfo", "--size", srv.uri).stdout.strip() == str(path.stat().st_size)


def test_undecoded_backing_file_is_refused(tmp_path, foreign):
    path, _ = foreign["parallels"]
    (tmp_path / "disk.img").write_bytes(path.read_bytes())
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "disk.img", "-F", "parallels", top)
    raw = bytearray(top.read_bytes())  # unrecord the format (see test_backing_chains): probe it
    at = raw.index(bytes.fromhex("e2792aca"))
    raw[at : at + 4] = bytes.fromhex("6e627364")
    top.write_bytes(raw)
    line = start_error(tmp_path, top)
    assert "a parallels image" in line and "-f raw" not in line, line


def test_every_undecoded_magic_is_identified():
    """Magics qemu-img cannot create (Bochs, cloop) and a VMDK descriptor of the lenient kind."""
    heads = {
        "bochs": b"Bochs Virtual HD Image\0",
        "cloop": b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
        "vmdk": b"# comment\n   \nversion=2\r\nCID=fffffffe\n",
    }
    for name, head in heads.items():
        assert identify(head.ljust(512, b"\0"), 1 << 20)[0] == name
    assert set(UNDECODED).isdisjoint(BY_NAME)  # a format with a driver leaves the table
    assert identify(b"version=4\n".ljust(512, b"\0"), 1 << 20) is None
    assert identify(bytes(512), 1 << 20) is None


# -- a probed-raw image guards its first sector ----------------------------------------------------


@pytest.fixture(scope="module")
def headers(tmp_path_factory, foreign) -> dict[str, bytes]:
    """First sectors of real images: a qcow2 naming a host file as its backing file, and others."""
    tmp_path = tmp_path_factory.mktemp("headers")
    out = {}
    victim = tmp_path / "secret.raw"
    victim.write_bytes(b"host secret " * 100)
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(victim), evil, "1M")
    out["qcow2"] = evil.read_bytes()[:512]
    for kind in ("vmdk", "vdi", "luks"):
        out[kind] = foreign[kind][0].read_bytes()[:512]
    return out


def errnum(call, *args) -> int:
    with pytest.raises(nbd.Error) as ei:
        call(*args)
    return ei.value.errnum


def test_probed_raw_refuses_writes_that_make_a_format(tmp_path, headers):
    img = tmp_path / "guest.img"
    img.write_bytes(bytes(MiB))
    with serve(tmp_path, img) as srv:  # probed: raw by default
        h = nbd_connect(srv.uri)
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
        for name, head in headers.items():
            assert errnum(h.pwrite, head, 0) == errno.EPERM, name
            assert errnum(h.pwrite, head + bytes(4096), 0) == errno.EPERM, name  # longer than a sector
            # a payload large enough to land by splice elsewhere is judged all the same
            assert errnum(h.pwrite, head + bytes(300_000), 0) == errno.EPERM, name
        assert errnum(h.pwrite, b"QFI\xfb", 0) == errno.EPERM  # the magic alone, unaligned
        # piecewise: first the rest of a header, then its magic; the last write completes it
        h.pwrite(headers["qcow2"][4:], 4)
        assert errnum(h.pwrite, b"QFI\xfb", 0) == errno.EPERM
        h.pwrite(headers["vdi"][:64], 0)  # VDI's text line alone is not its signature...
        assert errnum(h.pwrite, headers["vdi"][64:68], 64) == errno.EPERM  # ...this is
        # ordinary guest writes to sector 0 (a boot sector, zeroes, trims) and any write elsewhere
        mbr = bytearray(512)
        mbr[510:512] = b"\x55\xaa"
        h.pwrite(bytes(mbr), 0)
        h.zero(512, 0)
        h.trim(4096, 0)
        h.pwrite(headers["qcow2"], 512)
        h.pwrite(headers["qcow2"], 64 * 1024)
        h.flush()
        h.shutdown()
    assert img.read_bytes()[:512] == bytes(512)
    with serve(tmp_path, "-r", img) as srv:  # reopened by probing: still raw
        assert run("nbdinfo", "--size", srv.uri).stdout.strip() == str(MiB)


def test_probed_raw_refuses_only_the_write_that_makes_a_format(tmp_path, headers):
    """Sequential writes sent together (one receive on the server): the one that would make sector
    0 a qcow2 header fails with EPERM; the ones after it are not part of that refusal, they are
    written."""
    img = tmp_path / "guest.img"
    img.write_bytes(bytes(MiB))
    with serve(tmp_path, img) as srv:
        h = nbd_connect(srv.uri)
        for _ in range(3):
            cookies = [
                h.aio_pwrite(headers["qcow2"], 0),
                h.aio_pwrite(b"\x01" * 512, 512),
                h.aio_pwrite(b"\x02" * 1024, 1024),
            ]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            assert errnum(h.aio_command_completed, cookies[0]) == errno.EPERM
            assert all(h.aio_command_completed(c) for c in cookies[1:])
        h.flush()
        h.shutdown()
    assert img.read_bytes()[:2048] == bytes(512) + b"\x01" * 512 + b"\x02" * 1024


def test_explicit_raw_takes_any_write(tmp_path, headers):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    with serve(tmp_path, "-f", "raw", img) as srv:
        h = nbd_connect(srv.uri)
        h.pwrite(headers["qcow2"], 0)
        h.flush()
        h.shutdown()
    assert img.read_bytes()[:512] == headers["qcow2"]
    info = json.loads(qemu_img("info", "--output=json", "-U", img).stdout)
    assert info["format"] == "qcow2"  # what the client wrote: allowed, as the operator said raw
