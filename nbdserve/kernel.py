"""The local kernel NBD driver: ``-c/--connect /dev/nbdX`` and ``-d/--disconnect /dev/nbdX``.

Owns ``attach``: given a socket already in the transmission phase (``client.Client.go``), hand it
to the kernel with the classic ioctl interface (``linux/nbd.h``: SET_BLKSIZE, SET_SIZE_BLOCKS,
SET_FLAGS, SET_SOCK, then DO_IT, which blocks until the device is disconnected, so it runs in
its own thread) and ``disconnect`` (DISCONNECT, then CLEAR_SOCK), the same ioctls
``nbd-client`` and qemu-nbd use.  ``wait_connected`` watches ``/sys/block/nbdX/pid``, which the
driver creates once DO_IT has set the device up.

The kernel speaks simple replies only and never sends STARTTLS; the caller negotiates nothing
else.  Errors are ``KernelError`` with a one-line reason (no such device, busy, no permission).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import time

# ioctl numbers: _IO(0xab, n)
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A
BLOCK_SIZE = 512  # the logical block size given to the kernel (qemu-nbd's choice)


class KernelError(Exception):
    """The NBD device could not be used; the message says why."""


def _open(device: str) -> int:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        hint = " (is the nbd module loaded? modprobe nbd)" if e.errno == errno.ENOENT else ""
        raise KernelError(f"cannot open {device}: {e.strerror}{hint}") from None
    return fd


def _sys_dir(device: str) -> str:
    return os.path.join("/sys/block", os.path.basename(os.path.realpath(device)))


def is_connected(device: str) -> bool:
    return os.path.exists(os.path.join(_sys_dir(device), "pid"))


def check_device(device: str) -> None:
    """Refuse before serving: not an NBD device, or one already in use."""
    if not os.path.basename(os.path.realpath(device)).startswith("nbd"):
        raise KernelError(f"{device} is not an NBD device (/dev/nbdN)")
    os.close(_open(device))
    if is_connected(device):
        raise KernelError(f"{device} is already connected")


def attach(device: str, sock: socket.socket, size: int, flags: int) -> None:
    """Connect ``device`` to ``sock`` and serve it until disconnected (blocks: run in a thread)."""
    fd = _open(device)
    try:
        try:
            fcntl.ioctl(fd, NBD_SET_BLKSIZE, BLOCK_SIZE)
            fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, size // BLOCK_SIZE)
            fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
            fcntl.ioctl(fd, NBD_SET_SOCK, sock.fileno())
        except OSError as e:
            reason = "already connected" if e.errno == errno.EBUSY else e.strerror
            raise KernelError(f"cannot connect {device}: {reason}") from None
        try:
            fcntl.ioctl(fd, NBD_DO_IT)  # returns when the device is disconnected
        except OSError:
            pass  # the driver reports the disconnection as an error too
        for req in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
            try:
                fcntl.ioctl(fd, req)
            except OSError:
                pass
    finally:
        os.close(fd)


def wait_connected(device: str, timeout: float = 30.0, alive=lambda: True) -> bool:
    """Wait until the driver has set ``device`` up (``alive`` false: give up at once)."""
    pid_file = os.path.join(_sys_dir(device), "pid")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if os.path.exists(pid_file):
            return True
        select.select([], [], [], 0.01)  # the kernel offers no event for this; poll briefly
    return os.path.exists(pid_file)


def disconnect(device: str) -> None:
    fd = _open(device)
    try:
        try:
            fcntl.ioctl(fd, NBD_DISCONNECT)
        except OSError as e:
            raise KernelError(f"cannot disconnect {device}: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, NBD_CLEAR_SOCK)
        except OSError:
            pass
    finally:
        os.close(fd)
