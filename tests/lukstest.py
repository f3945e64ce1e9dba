"""Encrypted test images and QEMU's view of them with the key.

* LUKS1 images from ``qemu-img create -f luks`` (``make_luks``), qcow2 with ``encrypt.format``
  luks or aes (``make_qcow2``), LUKS2 images from cryptsetup (``make_luks2``) and the volume key
  cryptsetup reports (``volume_key``), a rewrite of LUKS2 JSON metadata with fresh checksums
  (``rewrite_luks2``) for hostile-header tests.
* The secret: ``PASSWORD`` in a file (``secret_file``), as a QEMU ``--object`` (``secret_object``)
  and the ``--image-opts`` strings that use it (``image_opts``).
* QEMU with the key: ``qemu_io_key``, ``qemu_raw_key`` (the plaintext disk), ``qemu_compare_key``,
  ``check_clean_key``, ``qemu_nbd_key``; nbdserve with the key: ``key_config``, ``serve_key``.

qemu-img's PBKDF benchmark sometimes fails on a loaded machine ("Unable to get accurate CPU
usage"); creation is retried a few times for that message only.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.util import NBDSERVE, nbd_connect, qemu_nbd, run, serve

PASSWORD = b"correct horse battery"
SECRET_ID = "sec0"


def secret_file(tmp: Path, password: bytes = PASSWORD) -> Path:
    path = tmp / "passphrase"
    path.write_bytes(password)
    return path


def secret_object(path: Path) -> str:
    return f"secret,id={SECRET_ID},file={path}"


def image_opts(path: Path, fmt: str) -> str:
    key = "encrypt.key-secret" if fmt == "qcow2" else "key-secret"
    return f"driver={fmt},file.filename={path},{key}={SECRET_ID}"


def _create(args: list[str]) -> None:
    """``qemu-img create``, tried again while QEMU's PBKDF benchmark fails: it times its first
    round with the thread's CPU clock and gives up ("Unable to get accurate CPU usage") when that
    clock has not moved, which on a busy machine happens often and in runs.
    A growing pause between attempts lets a burst of load pass (20 attempts, 2 s at most)."""
    for attempt in range(20):
        p = run("qemu-img", "create", "-q", *args, check=False)
        if p.returncode == 0:
            return
        if "accurate CPU usage" not in p.stderr:
            break
        time.sleep(0.01 * attempt)
    raise AssertionError(f"qemu-img create {' '.join(args)}: {p.stderr}")


def make_luks(path: Path, size: int | str, secret: Path, **opts: str) -> Path:
    """``qemu-img create -f luks`` with ``opts`` (cipher-alg=..., cipher-mode=..., ...)."""
    o = ",".join([f"key-secret={SECRET_ID}", "iter-time=10", *(f"{k.replace('_', '-')}={v}" for k, v in opts.items())])
    _create(["-f", "luks", "--object", secret_object(secret), "-o", o, str(path), str(size)])
    return path


def make_qcow2(path: Path, size: int | str, secret: Path, encrypt: str = "luks", *args: str, **opts: str) -> Path:
    """qcow2 with ``encrypt.format=encrypt`` (luks or aes); ``args`` go to qemu-img create as
    they are (``-b``, more ``-o``), ``opts`` are encrypt.* options."""
    o = [f"encrypt.format={encrypt}", f"encrypt.key-secret={SECRET_ID}"]
    if encrypt == "luks":
        o.append("encrypt.iter-time=10")
    o += [f"encrypt.{k.replace('_', '-')}={v}" for k, v in opts.items()]
    _create(["-f", "qcow2", "--object", secret_object(secret), "-o", ",".join(o), *args, str(path), str(size)])
    return path


def key_config(tmp: Path, image: Path, secret: Path, **export: str | bool) -> Path:
    """An nbdserve --config file: the secret and one export (name "") that uses it; ``export``
    adds keys to the export table (``repair="leaks"``, ``readonly=True``)."""
    cfg = tmp / f"{image.name}.toml"
    lines = ["[[secret]]", f'id = "{SECRET_ID}"', f'file = "{secret}"', "", "[[export]]", 'name = ""']
    lines += [f'path = "{image}"', f'key-secret = "{SECRET_ID}"']
    lines += [
        f"{k.replace('_', '-')} = {str(v).lower() if isinstance(v, bool) else repr(str(v))}" for k, v in export.items()
    ]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def serve_key(tmp: Path, image: Path, secret: Path, *args: str, check_stop: bool = True, **export: str | bool):
    return serve(tmp, "--config", key_config(tmp, image, secret, **export), *args, check_stop=check_stop)


def qemu_nbd_key(tmp: Path, image: Path, fmt: str, secret: Path, *args: str):
    return qemu_nbd(tmp, image_opts(image, fmt), None, "-A", "--object", secret_object(secret), "--image-opts", *args)


def check_clean_key(path: Path, secret: Path) -> dict:
    """``qemu-img check`` of an encrypted qcow2 with the key: no corruptions, leaks or errors."""
    p = run("qemu-img", "check", "--output=json", "--object", secret_object(secret), "--image-opts",
            image_opts(path, "qcow2"), check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    for key in ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"):
        assert report.get(key, 0) == 0, report
    return report


def qemu_io_key(path: Path, fmt: str, secret: Path, *cmds: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "--object", secret_object(secret), "--image-opts", image_opts(path, fmt)]
    for c in cmds:
        argv += ["-c", c]
    return run(*argv)


def qemu_raw_key(path: Path, fmt: str, secret: Path, tmp: Path) -> bytes:
    """The plaintext disk as QEMU reads it."""
    out = tmp / (path.name + ".plain.raw")
    run("qemu-img", "convert", "-U", "--object", secret_object(secret), "--image-opts", image_opts(path, fmt),
        "-O", "raw", out)  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_compare_key(a: Path, fmt_a: str, b: Path, fmt_b: str, secret: Path) -> subprocess.CompletedProcess:
    """``qemu-img compare`` of two images, each opened with the key if encrypted."""

    def opts(p: Path, fmt: str) -> str:
        return image_opts(p, fmt) if fmt in ("luks", "qcow2") else f"driver={fmt},file.filename={p}"

    return run("qemu-img", "compare", "--object", secret_object(secret), "--image-opts", opts(a, fmt_a),
               opts(b, fmt_b), check=False)  # fmt: skip


# -- LUKS2 (cryptsetup) -----------------------------------------------------------------------


def make_luks2(path: Path, size: int, password: bytes = PASSWORD, *args: str) -> Path:
    """A LUKS2 container from cryptsetup (a plain file, no device mapper); ``args`` are
    luksFormat options (the defaults keep the KDF cheap)."""
    with open(path, "wb") as f:
        f.truncate(size)
    cheap = (
        [] if any(a.startswith("--pbkdf") for a in args) else ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    )
    run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-", *cheap, *args, path,
        input=password.decode())  # fmt: skip
    return path


def volume_key(path: Path, password: bytes = PASSWORD) -> bytes:
    out = path.with_suffix(".vk")
    run("cryptsetup", "luksDump", "--dump-volume-key", "--volume-key-file", out, "--batch-mode", "--key-file", "-",
        path, input=password.decode())  # fmt: skip
    key = out.read_bytes()
    out.unlink()
    return key


def rewrite_luks2(path: Path, edit: Callable[[dict], object], *, raw_json: bytes | None = None) -> None:
    """Apply ``edit`` to the JSON metadata of both LUKS2 header copies (or put ``raw_json`` there)
    and recompute their sha256 checksums, so the change itself is what a reader sees."""
    with open(path, "r+b") as f:
        hdr_size = struct.unpack(">Q", f.read(16)[8:16])[0]
        for offset in (0, hdr_size):
            f.seek(offset)
            whole = bytearray(f.read(hdr_size))
            if raw_json is None:
                meta = json.loads(bytes(whole[4096:]).split(b"\0", 1)[0])
                edit(meta)
                text = json.dumps(meta).encode()
            else:
                text = raw_json
            assert len(text) < hdr_size - 4096
            whole[4096:] = text + bytes(hdr_size - 4096 - len(text))
            whole[448:512] = bytes(64)
            whole[448:480] = hashlib.sha256(whole).digest()
            f.seek(offset)
            f.write(whole)


# -- shared checks ----------------------------------------------------------------------------


def unaligned_reads_equal(a: str, b: str, size: int, rng: random.Random, n: int = 40) -> None:
    import nbd

    ha, hb = nbd_connect(a), nbd_connect(b)
    for h in (ha, hb):
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    for _ in range(n):
        off = rng.randrange(0, size - 1)
        length = rng.randint(1, min(size - off, 300_000))
        assert ha.pread(length, off) == hb.pread(length, off), (off, length)
    ha.shutdown()
    hb.shutdown()


MOTIF = bytes(range(0x40, 0x80)) * 2  # 128 distinctive bytes


def assert_no_plaintext(path: Path, plain: bytes) -> None:
    """No 32-byte window of the motif appears in ``path`` (checked on aligned and odd offsets)."""
    raw = path.read_bytes()
    for start in (0, 7, 33, 64):
        assert MOTIF[start : start + 32] not in raw, f"plaintext found in {path}"
    assert MOTIF in plain


def start_fails(tmp: Path, *args: str) -> str:
    p = run(*NBDSERVE, "-k", tmp / "never.sock", *args, check=False, timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]
