"""The e2e VM harness: a Debian cloud kernel, a tiny initramfs, NBD servers on TCP, QEMU under TCG.

What it owns:
  * ``kernel()``: the kernel and the modules the guest needs, fetched once into ``tests/e2e/.cache/``
    with ``apt-get download`` (only the package lists are needed) and extracted with ``dpkg-deb``.
    The module load order comes from ``modules.dep`` (written by ``busybox depmod``).
  * ``build_initramfs()``: busybox-static, Debian's ``nbd-client`` and ``mke2fs`` with the shared
    libraries ``ldd`` names, the modules, ``guest_init.sh`` as ``/init`` and the data the guest
    writes (``guest_data()``); ``cpio -H newc | gzip``.
  * ``build_rootfs()``: an ext4 root filesystem (busybox, the same guest program as ``/sbin/init``,
    seeded files with a ``SHA256SUMS`` manifest) made with ``mke2fs -d`` and converted to a format.
  * ``tcp_server()``: nbdserve (or, with ``NBDSERVE_E2E_SERVER=qemu-nbd``, the oracle) on
    127.0.0.1, started with ``--fork`` so it listens when the parent exits.
  * ``run_vm()``: one QEMU run, bounded by a timeout; the serial console goes to a file and is
    parsed into markers (see ``guest_init.sh``).
  * The host-side checks of an image once the server stopped: ``qemu_img_check``, ``to_raw``,
    ``e2fsck_clean``, ``debugfs_dump``, ``image_map`` and ``reads_as_hole``.

Invariants: nothing waits by sleeping (servers fork once listening; QEMU is waited for with a
timeout); every failure raises ``ScenarioFailed`` whose message ends with the serial console's tail.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.util import NBDSERVE, TOOL_ENV, free_port, run, wait_pid_exit

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
GUEST_INIT = HERE / "guest_init.sh"
KERNEL_META = "linux-image-cloud-amd64"
# What the guest loads (with their dependencies): virtio PCI transport, disk, network, NBD.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "nbd")
MODULE_ARGS = {"nbd": "nbds_max=2"}
HOST_BINARIES = ("/usr/sbin/nbd-client", "/usr/sbin/mke2fs")
VM_TIMEOUT = float(os.environ.get("NBDSERVE_E2E_VM_TIMEOUT", "300"))
MiB = 1 << 20
FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "vmdk", "vdi")


class ScenarioFailed(AssertionError):
    """A scenario failed.  ``where``: "guest" (E2E-FAIL), "boot" (no E2E-BOOTED), "timeout",
    "exit" (the VM ended without a verdict) or "host" (a host-side check of the image)."""

    def __init__(self, where: str, reason: str, serial: str = "") -> None:
        self.where, self.reason, self.serial = where, reason, serial
        tail = "\n".join(serial.splitlines()[-40:])
        super().__init__(f"[{where}] {reason}\n--- serial console (tail) ---\n{tail}")


def require_tools() -> None:
    missing = [t for t in ("qemu-system-x86_64", "busybox", "apt-get", "dpkg-deb", "cpio") if not shutil.which(t)]
    missing += [b for b in HOST_BINARIES if not os.access(b, os.X_OK)]
    if missing:
        pytest.skip(f"e2e VM tests need: {', '.join(missing)}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---- kernel -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: tuple[tuple[Path, str], ...]  # (module file, insmod arguments) in load order


def _kernel_package() -> str:
    out = run("apt-cache", "depends", KERNEL_META, timeout=60).stdout
    m = re.search(r"Depends: (linux-image-\S+)", out)
    if not m:
        raise AssertionError(f"cannot resolve {KERNEL_META} (run apt-get update?):\n{out}")
    return m.group(1)


def _load_order(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to ``moddir``) for ``wanted`` with dependencies first, from modules.dep."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.removesuffix(".ko").replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        # modules.dep lists every (transitive) dependency, users before what they use.
        for d in reversed(deps[mod]):
            visit(d)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise AssertionError(f"module {name} not in {moddir}/modules.dep")
        visit(by_name[name])
    return order


def kernel() -> Kernel:
    """The guest kernel and modules, fetched into the cache on first use (under a file lock)."""
    pkg = _kernel_package()
    dest = CACHE / pkg
    with _locked(CACHE / ".lock"):
        if not (dest / "load-order").exists():
            _fetch_kernel(pkg, dest)
    modules = []
    for line in (dest / "load-order").read_text().splitlines():
        name = line.split()[0]
        modules.append((dest / "modules" / name, MODULE_ARGS.get(name.removesuffix(".ko"), "")))
    return Kernel(dest / "vmlinuz", tuple(modules))


def _fetch_kernel(pkg: str, dest: Path) -> None:
    work = CACHE / f"{pkg}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        run("apt-get", "download", pkg, cwd=work, timeout=600)
        (deb,) = work.glob(f"{pkg}_*.deb")
        tree = work / "x"
        run("dpkg-deb", "-x", deb, tree, timeout=300)
        (kver,) = (p.name for p in (tree / "lib/modules").iterdir())
        moddir = tree / "lib/modules" / kver
        run("busybox", "depmod", "-b", tree, kver, timeout=300)
        order = _load_order(moddir, GUEST_MODULES)
        (dest / "modules").mkdir(parents=True)
        shutil.copy(tree / "boot" / f"vmlinuz-{kver}", dest / "vmlinuz")
        for mod in order:
            shutil.copy(moddir / mod, dest / "modules" / Path(mod).name)
        (dest / "load-order").write_text("".join(f"{Path(m).name}\n" for m in order))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- initramfs and root filesystem ----------------------------------------------------------


def _busybox_tree(root: Path, skip: tuple[str, ...] = ()) -> None:
    """A fresh tree: busybox as /bin/busybox with a symlink per applet in /bin (except ``skip``)."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox"), root / "bin/busybox")
    for applet in run("busybox", "--list").stdout.split():
        if applet != "busybox" and applet not in skip:
            (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin").mkdir(exist_ok=True)
    for d in ("proc", "sys", "dev", "mnt", "newroot", "tmp", "etc", "py"):
        (root / d).mkdir(exist_ok=True)


def _copy_with_libs(root: Path, binary: str) -> None:
    """Copy a dynamically linked host binary to /sbin and its libraries to their host paths."""
    shutil.copy(binary, root / "sbin" / Path(binary).name)
    for line in run("ldd", binary).stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            lib = Path(m.group(1))
            target = root / lib.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib.resolve(), target)


def build_initramfs(work: Path, k: Kernel) -> Path:
    root = work / "initramfs"
    _busybox_tree(root, skip=tuple(Path(b).name for b in HOST_BINARIES))
    for b in HOST_BINARIES:
        _copy_with_libs(root, b)
    shutil.copy("/etc/mke2fs.conf", root / "etc/mke2fs.conf")
    shutil.copy(GUEST_INIT, root / "init")
    (root / "init").chmod(0o755)
    moddir = root / "lib/modules"
    moddir.mkdir(parents=True)
    for mod, _ in k.modules:
        shutil.copy(mod, moddir / mod.name)
    (moddir / "load-order").write_text("".join(f"{m.name} {a}\n" for m, a in k.modules))
    (root / "data").mkdir()
    (root / "data/r.bin").write_bytes(guest_data())
    out = work / "initramfs.cpio.gz"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(out, "wb") as f:
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
        cpio.stdout.close()
        cpio.communicate("\n".join(files).encode(), timeout=120)
        gz.wait(timeout=120)
    if cpio.returncode or gz.returncode:
        raise AssertionError(f"cpio/gzip failed ({cpio.returncode}, {gz.returncode})")
    return out


@dataclass(frozen=True)
class Seed:
    files: dict[str, bytes]  # path inside the filesystem -> content

    @classmethod
    def make(cls, seed: int = 2026) -> Seed:
        rnd = random.Random(seed)
        return cls(
            {
                "seed/a.bin": rnd.randbytes(1 * MiB),
                "seed/b.bin": rnd.randbytes(3 * MiB + 4097),
                "seed/small.txt": b"nbdserve e2e seed\n",
                "seed/deep/c.bin": rnd.randbytes(200_000),
            }
        )


def build_rootfs(work: Path, seed: Seed, size_mib: int = 64) -> Path:
    """A raw ext4 image with busybox, the guest program as /sbin/init and the seeded files."""
    root = work / "rootfs"
    _busybox_tree(root)
    shutil.copy(GUEST_INIT, root / "sbin/init")
    (root / "sbin/init").chmod(0o755)
    sums = []
    for name, data in seed.files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {Path(name).relative_to('seed')}\n")
    (root / "seed/SHA256SUMS").write_text("".join(sums))
    img = work / "rootfs.raw"
    run("mke2fs", "-q", "-t", "ext4", "-F", "-d", root, img, f"{size_mib}M")
    return img


# What the guest's Python needs of the host's: the interpreter, its standard library (without
# tests and GUI toolkits), nbdserve's compiled dependencies, and every shared library they link.
PY_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "unittest"})
# (Packages not installed here are left out; single-file modules are copied as files.)
PY_PACKAGES = ("crc32c", "zstandard", "cryptography", "cffi", "_cffi_backend", "argon2", "_argon2_cffi_bindings")


def build_python_disk(work: Path, repo: Path) -> Path:
    """A raw ext4 image holding a minimal root for ``chroot /py python3 -m nbdserve``: the host's
    interpreter and standard library, the shared libraries they link, nbdserve's dependencies and
    nbdserve itself (from ``repo``) in /opt/nbdserve, and empty /dev, /proc, /sys, /tmp, /data
    mount points.  The guest mounts it read-only."""
    root = work / "pyroot"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("dev", "proc", "sys", "tmp", "data", "usr/bin", "opt/nbdserve", "sbin"):
        (root / d).mkdir(parents=True)
    python = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copy(python, root / "usr/bin" / "python3")
    shutil.copytree(
        stdlib,
        root / stdlib.relative_to("/"),
        ignore=lambda d, names: [n for n in names if n in PY_SKIP or n.startswith("config-") or n == "site-packages"],
        symlinks=True,
    )
    shutil.copytree(repo / "nbdserve", root / "opt/nbdserve/nbdserve", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PY_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        if spec.submodule_search_locations:
            src = Path(spec.origin).parent
            shutil.copytree(src, root / "opt/nbdserve" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src = Path(spec.origin)
            shutil.copy(src, root / "opt/nbdserve" / src.name)
        for meta in src.parent.glob(f"{name}-*.*-info"):  # importlib.metadata asks for versions
            if not (root / "opt/nbdserve" / meta.name).exists():
                copy = shutil.copytree if meta.is_dir() else shutil.copy
                copy(meta, root / "opt/nbdserve" / meta.name)
    objects = [python, *root.rglob("*.so")]
    libs: set[Path] = set()
    for obj in objects:
        for line in run("ldd", obj, check=False).stdout.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    for lib in libs:
        target = root / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lib.resolve(), target)
    size_mib = 64 + sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) // MiB
    img = work / "python.raw"
    run("mke2fs", "-q", "-t", "ext4", "-F", "-d", root, img, f"{size_mib}M", timeout=300)
    return img


def build_data_disk(work: Path, files: dict[str, Path], size_mib: int) -> Path:
    """A raw ext4 image holding ``files`` (name in the filesystem root -> host file)."""
    root = work / "dataroot"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for name, src in files.items():
        shutil.copy(src, root / name)
    img = work / "data.raw"
    run("mke2fs", "-q", "-t", "ext4", "-F", "-d", root, img, f"{size_mib}M")
    return img


def convert(src: Path, src_fmt: str, dst: Path, dst_fmt: str) -> Path:
    opts = ["-o", "force_size=on"] if dst_fmt == "vpc" else []
    run("qemu-img", "convert", "-f", src_fmt, "-O", dst_fmt, *opts, src, dst)
    return dst


def create_image(path: Path, fmt: str, size: int) -> Path:
    opts = ["-o", "force_size=on"] if fmt == "vpc" else []
    run("qemu-img", "create", "-q", "-f", fmt, *opts, path, str(size))
    return path


def guest_data() -> bytes:
    """The 8 MiB of random bytes the guest writes from (``/data/r.bin`` in the initramfs)."""
    return random.Random(1809).randbytes(8 * MiB)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- NBD servers on TCP -----------------------------------------------------------------------


@dataclass
class TcpServer:
    port: int
    export: str
    pid: int
    log: Path

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait until the process is gone (it must flush and close the image)."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not wait_pid_exit(self.pid, timeout):
            os.kill(self.pid, signal.SIGKILL)
            wait_pid_exit(self.pid, 10)
            raise ScenarioFailed("host", f"server {self.pid} ignored SIGTERM for {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def server_kind() -> str:
    kind = os.environ.get("NBDSERVE_E2E_SERVER", "nbdserve")
    if kind not in ("nbdserve", "qemu-nbd"):
        raise AssertionError(f"NBDSERVE_E2E_SERVER must be nbdserve or qemu-nbd, not {kind!r}")
    return kind


def format_available(fmt: str) -> bool:
    """Whether the server under test serves ``fmt`` (nbdserve: its driver is registered)."""
    if server_kind() == "qemu-nbd":
        return True
    from nbdserve.formats import BY_NAME

    return fmt in BY_NAME


@contextlib.contextmanager
def tcp_server(
    work: Path, image: Path | str, fmt: str, export: str = "disk", extra: tuple[str, ...] = ()
) -> Iterator[TcpServer]:
    """Serve ``image`` (a file, or another location both servers take, e.g. ``rbd:``) on
    127.0.0.1:PORT as ``export``; yields once listening; SIGKILLs leftovers.
    ``extra`` arguments go to the server (spelled so that both qemu-nbd and nbdserve take them).

    The port is found free by binding port 0; if another process takes it before the server
    binds it, the start is retried on a new port (three attempts)."""
    for _attempt in range(3):
        port = free_port()
        pidfile, log = work / f"server-{port}.pid", work / f"server-{port}.log"
        common = ["-b", "127.0.0.1", "-p", str(port), "-x", export, "-f", fmt, "--fork", "--pid-file", str(pidfile)]
        common += extra
        if server_kind() == "qemu-nbd":
            cmd = ["qemu-nbd", *common, "--persistent", "--shared=8", "--discard=unmap", str(image)]
        else:
            cmd = [*NBDSERVE, *common, str(image)]
        with open(log, "w") as logf:
            p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=120, cwd=work, env=TOOL_ENV)
        if p.returncode == 0 or "Address already in use" not in log.read_text():
            break
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed to start:\n{log.read_text()}")
    srv = TcpServer(port, export, int(pidfile.read_text()), log)
    try:
        yield srv
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(srv.pid, signal.SIGKILL)
            wait_pid_exit(srv.pid, 10)


# ---- QEMU -------------------------------------------------------------------------------------


@dataclass
class VmResult:
    serial: str
    seconds: float
    steps: list[str] = field(default_factory=list)
    times: dict[str, str] = field(default_factory=dict)  # step -> guest uptime when it passed
    info: dict[str, str] = field(default_factory=dict)
    booted: bool = False
    ok: str | None = None
    fail: str | None = None

    @classmethod
    def parse(cls, serial: str, seconds: float) -> VmResult:
        r = cls(serial, seconds)
        for line in serial.splitlines():
            line = line.strip()
            if line == "E2E-BOOTED":
                r.booted = True
            elif line.startswith("E2E-STEP "):
                r.steps.append(line[9:].split(" t=")[0])
                r.times[r.steps[-1]] = line.partition(" t=")[2]
            elif line.startswith("E2E-INFO "):
                k, _, v = line[9:].partition("=")
                r.info[k] = v
            elif line.startswith("E2E-FAIL ") and r.fail is None:
                r.fail = line[9:]
            elif line.startswith("E2E-OK "):
                r.ok = line[7:]
        return r

    def expect_ok(self, scenario: str) -> None:
        if self.fail is not None:
            raise ScenarioFailed("guest", self.fail, self.serial)
        if not self.booted:
            raise ScenarioFailed("boot", "the guest never reported E2E-BOOTED", self.serial)
        if self.ok != scenario:
            raise ScenarioFailed("exit", f"the VM ended without E2E-OK {scenario}", self.serial)

    def host_check(self, cond: bool, reason: str) -> None:
        if not cond:
            raise ScenarioFailed("host", reason, self.serial)


def run_vm(
    work: Path,
    k: Kernel,
    initrd: Path,
    scenario: str,
    *,
    disk_uri: str | None = None,
    disks: tuple[Path, ...] = (),
    tls_creds: Path | None = None,
    net: bool = False,
    params: dict[str, str] | None = None,
    timeout: float = VM_TIMEOUT,
) -> VmResult:
    serial = work / f"serial-{scenario}-{time.monotonic_ns()}.log"
    append = ["console=ttyS0", "quiet", "panic=-1", f"e2e.scenario={scenario}"]
    append += [f"e2e.{key}={v}" for key, v in (params or {}).items()]
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults", "-display", "none"]
    cmd += ["-no-reboot", "-monitor", "none", "-serial", f"file:{serial}"]
    cmd += ["-kernel", str(k.vmlinuz), "-initrd", str(initrd), "-append", " ".join(append)]
    if disk_uri and tls_creds:  # QEMU's NBD client over TLS, with the client credentials in tls_creds
        u = urllib.parse.urlsplit(disk_uri)
        cmd += ["-object", f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_creds}"]
        nbd = f"file.driver=nbd,file.server.type=inet,file.server.host={u.hostname},file.server.port={u.port}"
        cmd += ["-drive", f"driver=raw,{nbd},file.export={u.path[1:]},file.tls-creds=tls0,if=virtio"]
    elif disk_uri:
        cmd += ["-drive", f"file={disk_uri},format=raw,if=virtio"]
    for d in disks:  # raw files as further virtio disks (/dev/vda, /dev/vdb, ... after the NBD one)
        cmd += ["-drive", f"file={d},format=raw,if=virtio"]
    if net:
        cmd += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        raise ScenarioFailed("timeout", f"the VM ran longer than {timeout:.0f}s", text) from None
    seconds = time.monotonic() - t0
    text = serial.read_text(errors="replace") if serial.exists() else ""
    if p.returncode != 0:
        raise ScenarioFailed("exit", f"qemu exited {p.returncode}: {p.stderr.strip()}", text)
    return VmResult.parse(text, seconds)


# ---- host-side checks -------------------------------------------------------------------------


def qemu_img_check(res: VmResult, image: Path, fmt: str) -> None:
    """``qemu-img check`` must be clean where the format has a checker (exit 63: it has none)."""
    p = run("qemu-img", "check", "-f", fmt, image, check=False)
    res.host_check(p.returncode in (0, 63), f"qemu-img check -f {fmt} exited {p.returncode}:\n{p.stdout}{p.stderr}")


def to_raw(image: Path, fmt: str) -> Path:
    return convert(image, fmt, image.with_suffix(".check.raw"), "raw") if fmt != "raw" else image


def e2fsck_clean(res: VmResult, raw: Path) -> None:
    p = run("e2fsck", "-fn", raw, check=False)
    res.host_check(p.returncode == 0, f"e2fsck -fn exited {p.returncode}:\n{p.stdout}{p.stderr}")


def debugfs_dump(raw: Path, path: str, out: Path) -> bytes:
    run("debugfs", "-R", f"dump {path} {out}", raw)
    return out.read_bytes() if out.exists() else b""


def image_map(image: Path, fmt: str) -> list[dict]:
    return json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, image).stdout)


def reads_as_hole(extents: list[dict], start: int, end: int) -> bool:
    """Every extent of ``qemu-img map`` overlapping [start, end) reads as zeroes without data."""
    covering = [e for e in extents if e["start"] < end and e["start"] + e["length"] > start]
    return bool(covering) and all(e["zero"] and not e["data"] for e in covering)
