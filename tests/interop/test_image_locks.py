"""Image locks against QEMU (docs/image-locks.md): nbdserve and QEMU's tools never write one image at
the same time, readers share with readers, and ``-U/--force-share`` lets a reader in next to a
writer; all of it for the image and for its backing file, and for one file given twice to one
nbdserve process.

The QEMU side is real: ``qemu-img``, ``qemu-io`` (kept open on a pipe while the test runs),
``qemu-nbd`` and a ``qemu-system-x86_64 -S`` VM (TCG, stopped before its first instruction: it holds
its disk the moment it starts).  Readiness is a line read from the process, never a sleep.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from tests.util import TOOL_ENV, qemu_img, qemu_io, qemu_nbd, run, serve, start_error

WRITE_LOCKED = 'Failed to get "write" lock'  # we want to write; someone refuses writers
SHARED_LOCKED = 'Failed to get shared "write" lock'  # we refuse writers; someone writes


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path]:
    """(base.qcow2, top.qcow2 backed by it), each with data of its own."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io("qcow2", base, "write -P 0x11 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 0x22 1M 1M")
    return base, top


def refused(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode != 0, p.stdout + p.stderr
    assert message in p.stdout + p.stderr, p.stdout + p.stderr


def assert_refused(tmp_path: Path, message: str, *args: str | Path) -> None:
    """nbdserve ARGS fails to start with QEMU's lock message, on one line."""
    line = start_error(tmp_path, *args)
    assert message in line and "another process" in line, line


@contextlib.contextmanager
def qemu_io_holding(image: Path, *args: str):
    """``qemu-io ARGS IMAGE`` kept open; yields once it has the image open (it answered a read)."""
    p = subprocess.Popen(
        ["qemu-io", *args, str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=TOOL_ENV,
    )
    try:
        p.stdin.write("read 0 512\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert "read 512/512" in line, line + p.stdout.read()
        yield p
    finally:
        p.stdin.close()
        p.wait(timeout=60)


@contextlib.contextmanager
def vm_holding(image: Path, fmt: str):
    """A stopped (``-S``) TCG VM with ``image`` as its virtio disk; yields once its monitor is up,
    by which time QEMU has opened and locked the disk."""
    p = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-monitor",
            "stdio",
            "-drive",
            f"file={image},format={fmt},if=virtio",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        seen = b""
        while b"(qemu)" not in seen:
            chunk = p.stdout.read1(4096)
            assert chunk, f"the VM exited: {seen.decode(errors='replace')}"
            seen += chunk
        yield p
    finally:
        if p.poll() is None:
            p.stdin.write(b"quit\n")
            p.stdin.flush()
        p.wait(timeout=60)


# -- nbdserve writes: QEMU is kept out --------------------------------------------------------


def test_qemu_tools_are_refused_while_nbdserve_writes(tmp_path, chain):
    base, top = chain
    with serve(tmp_path, top) as srv:
        refused(run("qemu-img", "info", top, check=False), SHARED_LOCKED)
        refused(run("qemu-img", "check", top, check=False), SHARED_LOCKED)
        refused(run("qemu-io", "-f", "qcow2", "-c", "write 0 512", top, check=False), WRITE_LOCKED)
        refused(run("qemu-nbd", "-f", "qcow2", "-k", tmp_path / "q.sock", top, check=False), WRITE_LOCKED)
        # the backing file is locked too: nobody may write it under the overlay
        refused(run("qemu-io", "-f", "qcow2", "-c", "write 0 512", base, check=False), WRITE_LOCKED)
        # sharing that QEMU allows: -U readers of the image, plain readers of the backing file
        assert '"virtual-size": 16777216' in run("qemu-img", "info", "-U", "--output=json", top).stdout
        run("qemu-img", "info", base)
        with qemu_nbd(tmp_path, base, "qcow2", "-r") as ref:
            run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", ref.uri, base)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k", srv.uri)  # and our client still writes
    # the locks go with the server
    qemu_io("qcow2", top, "write -P 0x44 0 512")
    qemu_io("qcow2", base, "write -P 0x55 0 512")


def test_qemu_is_refused_while_nbdserve_writes_a_raw_image(tmp_path):
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    with serve(tmp_path, "-f", "raw", img):
        refused(run("qemu-io", "-f", "raw", "-c", "write 0 512", img, check=False), WRITE_LOCKED)
        # QEMU's raw readers share writing, except those that need a stable source, like convert
        p = run("qemu-img", "convert", "-f", "raw", "-O", "raw", img, tmp_path / "c.raw", check=False)
        refused(p, SHARED_LOCKED)


def test_locks_go_with_a_killed_server(tmp_path, chain):
    _, top = chain
    with serve(tmp_path, top, check_stop=False) as srv:
        refused(run("qemu-io", "-f", "qcow2", "-c", "write 0 512", top, check=False), WRITE_LOCKED)
        srv.stop(9)
    qemu_io("qcow2", top, "write 0 512")


# -- QEMU writes: nbdserve is kept out -------------------------------------------------------


def test_nbdserve_is_refused_while_qemu_io_writes(tmp_path, chain):
    base, top = chain
    with qemu_io_holding(top, "-f", "qcow2"):
        assert_refused(tmp_path, WRITE_LOCKED, top)
        assert_refused(tmp_path, SHARED_LOCKED, "-r", top)
        # -U: a read-only export may open it anyway (the data may change under it)
        with serve(tmp_path, "-r", "-U", top) as srv:
            run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", srv.uri, top)
    with qemu_io_holding(base, "-f", "qcow2"):  # a writer of the backing file keeps the overlay out
        assert_refused(tmp_path, SHARED_LOCKED, top)
        with serve(tmp_path, "-r", "-U", top):
            pass


def test_nbdserve_is_refused_while_qemu_nbd_writes(tmp_path, chain):
    _, top = chain
    with qemu_nbd(tmp_path, top, "qcow2"):
        assert_refused(tmp_path, WRITE_LOCKED, top)
        assert_refused(tmp_path, SHARED_LOCKED, "-r", top)


def test_nbdserve_is_refused_while_a_vm_holds_the_image(tmp_path, chain):
    base, top = chain
    with vm_holding(top, "qcow2"):
        assert_refused(tmp_path, WRITE_LOCKED, top)
        assert_refused(tmp_path, SHARED_LOCKED, "-r", top)
        # the VM reads the backing file; so may we, read-only or as another overlay's backing
        with serve(tmp_path, "-r", base):
            pass
    with serve(tmp_path, top):  # the VM is gone, and so are its locks
        pass


# -- readers share ------------------------------------------------------------------------------


def test_readers_share_both_ways(tmp_path, chain):
    base, top = chain
    with qemu_nbd(tmp_path, top, "qcow2", "-r") as ref, serve(tmp_path, "-r", top) as ours:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", ours.uri, ref.uri)
    with serve(tmp_path, "-r", top) as ours, qemu_nbd(tmp_path, top, "qcow2", "-r") as ref:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", ours.uri, ref.uri)
        run("qemu-img", "info", top)  # a plain QEMU reader, too
    # a read-write overlay (ours) and a QEMU reader of its backing file
    with serve(tmp_path, top) as ours, qemu_nbd(tmp_path, base, "qcow2", "-r") as ref:
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "-U", ref.uri, base)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", ours.uri)


def test_force_share_needs_read_only(tmp_path, chain):
    _, top = chain
    assert "read-only" in start_error(tmp_path, "-U", top)


# -- one process, one file twice ------------------------------------------------------------


def test_one_file_exported_twice_in_one_process(tmp_path, chain):
    base, top = chain
    with serve(tmp_path, "--export", f"a={top}", "--export", f"b={top}") as srv:
        assert WRITE_LOCKED in srv.log_text()  # b could not take the write lock a holds
        p = run("nbdinfo", srv.uri_for("b"), check=False)
        assert p.returncode != 0
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", srv.uri_for("a"))
    with serve(tmp_path, "--export", f"a={top},readonly", "--export", f"b={top}") as srv:
        assert WRITE_LOCKED in srv.log_text()
    with serve(tmp_path, "--export", f"a={top}", "--export", f"b={top},readonly") as srv:
        assert SHARED_LOCKED in srv.log_text()
    # readers share, in one process as anywhere; and the backing file of a writer is readable
    with serve(tmp_path, "--export", f"a={top},readonly", "--export", f"b={top},readonly") as srv:
        for name in ("a", "b"):
            run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", srv.uri_for(name), top)
    with serve(tmp_path, "--export", f"top={top}", "--export", f"base={base},readonly") as srv:
        assert "lock" not in srv.log_text()
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "-U", srv.uri_for("base"), base)
    with serve(tmp_path, "--export", f"top={top}", "--export", f"base={base}") as srv:
        assert WRITE_LOCKED in srv.log_text()  # base is open as top's backing file: no writers
