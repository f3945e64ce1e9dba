"""The e2e scenarios, host side: build the image, serve it, run the VM, stop the server, check.

``boot_scenario`` (QEMU's NBD client, root filesystem on the export) and ``attach_scenario``
(the Linux nbd-client, single and multi-connection) each return the VM's result after every
host-side check passed, or raise ``vmkit.ScenarioFailed`` saying where and why (with the serial
console's tail).  The tests call them; the negative control calls ``boot_scenario`` through a
proxy that corrupts writes and expects a failure.

Both build the image as a local file; ``place`` decides what is served: the file itself (the
default), or a copy somewhere else (an RBD image: tests/e2e/test_vm_ceph.py), fetched back into
the local file after the server stopped so the host checks read what the server wrote.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from vmkit import (
    Kernel,
    MiB,
    Seed,
    VmResult,
    build_data_disk,
    build_python_disk,
    build_rootfs,
    convert,
    create_image,
    debugfs_dump,
    e2fsck_clean,
    guest_data,
    image_map,
    qemu_img_check,
    reads_as_hole,
    run_vm,
    server_kind,
    sha256,
    tcp_server,
    to_raw,
)

from tests.util import REPO, merged_map, run

# What a TRIM of an 8 MiB-aligned range does, by server and format.  "hole": the range reads back
# as zeroes and is a hole in the served map, and in `qemu-img map` for the formats whose QEMU driver
# reports allocation; "zero": it reads back as zeroes.  Anything else may keep the data (a TRIM is
# only a hint).  qemu-nbd runs with --discard=unmap.
TRIM_EFFECT = {
    "nbdserve": {"raw": "hole", "qcow2": "hole", "vhdx": "hole", "qed": "zero", "vmdk": "zero", "vdi": "hole"},
    "qemu-nbd": {"raw": "hole", "qcow2": "hole"},
}
QEMU_MAPS_HOLES = frozenset({"raw", "qcow2", "qed", "vpc", "vmdk", "vdi"})
EXPORT = "disk"


@dataclass(frozen=True)
class Guest:
    kernel: Kernel
    initrd: Path


# A wrapper around the server's port: yields the port the VM connects to.
PortWrapper = Callable[[int], AbstractContextManager[int]]
# Where a built image is served from: ``place(image) -> (what the server is given, fetch)``;
# ``fetch()`` copies the served image's bytes back into the local file.
Placement = Callable[[Path], tuple[str, Callable[[], None]]]


def in_place(image: Path) -> tuple[str, Callable[[], None]]:
    return str(image), lambda: None


def seeded_image(work: Path, name: str, fmt: str) -> tuple[Seed, Path]:
    """A new seed, and ``work/NAME.FMT`` holding the ext4 filesystem built from it."""
    seed = Seed.make()
    raw = build_rootfs(work, seed)
    image = work / f"{name}.{fmt}"
    if fmt == "raw":
        shutil.move(raw, image)
    else:
        convert(raw, "raw", image, fmt)
    return seed, image


def boot_scenario(
    work: Path,
    guest: Guest,
    fmt: str,
    via: PortWrapper = nullcontext,
    tls: tuple[Path, Path] | None = None,
    place: Placement = in_place,
) -> VmResult:
    """``tls``: (server credentials, client credentials) directories: the server requires TLS
    and client certificates, QEMU connects with ``tls-creds``."""
    seed, image = seeded_image(work, "root", fmt)
    extra = ()
    if tls is not None:  # qemu-nbd's spelling, which nbdserve takes too
        extra = ("--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls[0]}", "--tls-creds", "tls0")
    served, fetch = place(image)
    with tcp_server(work, served, fmt, EXPORT, extra) as srv, via(srv.port) as port:
        uri = f"nbd://127.0.0.1:{port}/{EXPORT}"
        res = run_vm(work, guest.kernel, guest.initrd, "boot", disk_uri=uri, tls_creds=tls and tls[1])
        res.expect_ok("boot")
        srv.stop()
    fetch()
    data = guest_data()
    check = _dumper(res, work, _check_filesystem(res, image, fmt))
    check("/e2e/written.bin", data[: 3 * MiB])
    check("/seed/b.bin", seed.files["seed/b.bin"])
    return res


def attach_scenario(work: Path, guest: Guest, fmt: str, place: Placement = in_place) -> VmResult:
    image = create_image(work / f"disk.{fmt}", fmt, 64 * MiB)
    served, fetch = place(image)
    with tcp_server(work, served, fmt, EXPORT) as srv:
        res = run_vm(
            work, guest.kernel, guest.initrd, "attach", net=True, params={"port": str(srv.port), "export": EXPORT}
        )
        res.expect_ok("attach")
        served_map = merged_map(f"nbd://127.0.0.1:{srv.port}/{EXPORT}")
        srv.stop()
    fetch()
    data = guest_data()
    size = json.loads(run("qemu-img", "info", "--output=json", "-f", fmt, image).stdout)["virtual-size"]
    seen = res.info.get("size")
    res.host_check(seen == str(size), f"the guest saw {seen} bytes, the image has {size}")
    # nbd-client prints one "Negotiation:" line per connection: 1 in pass 1, 2 with -C 2.
    conns = res.serial.count("Negotiation:")
    res.host_check(conns == 3, f"nbd-client negotiated {conns} connections, not 1 + 2")
    raw = _check_filesystem(res, image, fmt)
    check = _dumper(res, work, raw)
    check("/one.bin", data[: 2 * MiB])
    check("/two.bin", data[2 * MiB : 3 * MiB])
    for i in range(1, 8):
        check(f"/dir/f{i}", data[i * 4097 : 2 * i * 4097])

    # [40M, 48M) and [48M, 56M) held the data file, then [48M, 56M) was discarded; [56M, 64M)
    # was never written.
    content = raw.read_bytes()
    kept, trimmed, rest = content[40 * MiB : 48 * MiB], content[48 * MiB : 56 * MiB], content[56 * MiB : 64 * MiB]
    res.host_check(kept == data, "the image's [40M, 48M) differs from what the guest wrote")
    res.host_check(res.info.get("tail-kept") == sha256(kept), "the guest read back [40M, 48M) differently")
    res.host_check(rest == bytes(len(rest)), "the never-written [56M, 64M) is not zero")
    zero = bytes(8 * MiB)
    res.host_check(trimmed in (zero, data), "the discarded [48M, 56M) is neither zero nor the old data")
    res.host_check(res.info.get("tail-trimmed") == sha256(trimmed), "the guest read the discarded range differently")
    effect = TRIM_EFFECT[server_kind()].get(fmt)
    if effect:
        res.host_check(trimmed == zero, f"{fmt}: the discarded [48M, 56M) does not read as zeroes")
    if effect == "hole":
        served = [t for off, ln, t in served_map if off < 56 * MiB and off + ln > 48 * MiB]
        res.host_check(served == [3], f"{fmt}: the server maps the discarded [48M, 56M) as {served}, not hole,zero")
        if fmt in QEMU_MAPS_HOLES:
            hole = reads_as_hole(image_map(image, fmt), 48 * MiB, 56 * MiB)
            res.host_check(hole, f"{fmt}: qemu-img map does not report the discarded [48M, 56M) as a hole")
    return res


def connect_scenario(work: Path, guest: Guest, fmt: str) -> VmResult:
    """nbdserve inside the guest: ``-c /dev/nbd0`` on an image holding a seeded ext4 filesystem,
    mount, verify, write, unmount, ``-d``; then the image is checked on the host."""
    seed, image = seeded_image(work, "disk", fmt)
    python = build_python_disk(work, REPO)
    data = build_data_disk(work, {image.name: image}, 192)
    res = run_vm(work, guest.kernel, guest.initrd, "connect", disks=(python, data), params={"format": fmt})
    res.expect_ok("connect")
    back = work / f"back.{fmt}"
    back.unlink(missing_ok=True)
    run("debugfs", "-R", f"dump /{image.name} {back}", data)
    size = json.loads(run("qemu-img", "info", "--output=json", "-f", fmt, back).stdout)["virtual-size"]
    res.host_check(res.info.get("size") == str(size), f"the guest saw {res.info.get('size')} bytes, not {size}")
    check = _dumper(res, work, _check_filesystem(res, back, fmt))
    check("/e2e/written.bin", guest_data()[: 3 * MiB])
    check("/seed/b.bin", seed.files["seed/b.bin"])
    return res


def _check_filesystem(res: VmResult, image: Path, fmt: str) -> Path:
    """``qemu-img check`` the image, convert it to raw, ``e2fsck -fn`` that; returns the raw file."""
    qemu_img_check(res, image, fmt)
    raw = to_raw(image, fmt)
    e2fsck_clean(res, raw)
    return raw


def _dumper(res: VmResult, work: Path, raw: Path) -> Callable[[str, bytes], None]:
    out = work / "dump"

    def check(path: str, want: bytes) -> None:
        out.unlink(missing_ok=True)
        got = debugfs_dump(raw, path, out)
        res.host_check(got == want, f"{path} in the image: {len(got)} bytes, sha256 {sha256(got)}; want {sha256(want)}")

    return check
