"""librados and librbd through their C API (``ctypes``): the calls the ``rbd:`` backend makes.

Owns ``Image``: one open RBD image with its cluster connection and I/O context, and the
completions of its asynchronous calls.  Why the C API and not Ceph's Python bindings: the
bindings run a Python callback on a librbd thread for every completed request, which must take
the GIL from the event loop and copy read data into a new ``bytes``; that cost about 40 µs of
CPU per 4 KiB read.  Here a completion costs no Python at all: librbd queues it and bumps an
eventfd (``rbd_set_image_notification``), and the loop thread collects every queued completion
at once (``rbd_poll_io_events``).  The facts relied on are in docs/ceph.md.

Invariants:
  * A completion is identified by the integer ``tag`` given at submission (its ``cb_arg``);
    ``poll`` returns each submitted tag exactly once, with librbd's return value, and releases
    the completion.
  * Memory given to ``aio_read`` is written by librbd threads until its tag is polled: the
    caller keeps it alive and unused until then.  ``aio_write`` copies the data before it
    returns (``rbd_disable_zero_copy_writes`` is set by the backend), so its buffer is free at once.
  * Blocking calls (``connect``/``open``, ``lock_acquire``, ``diff``, ``resize``, ``close``) are
    for a worker thread; the ``aio_*`` calls and ``poll`` never block (``rbd_non_blocking_aio``).
  * A failed call raises ``OSError`` with librbd's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from ctypes import POINTER, byref, c_bool, c_char, c_char_p, c_int, c_int64, c_size_t, c_ssize_t, c_uint8, c_uint64
from ctypes import c_void_p as handle
from typing import Any

RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_FLAG_FAST_DIFF_INVALID = 1 << 1
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0
RBD_LOCK_MODE_EXCLUSIVE = 0
EVENT_TYPE_EVENTFD = 2
POLL_BATCH = 64  # completions collected per rbd_poll_io_events call


class _ImageInfo(ctypes.Structure):  # rbd_image_info_t
    _fields_ = [
        ("size", c_uint64),
        ("obj_size", c_uint64),
        ("num_objs", c_uint64),
        ("order", c_int),
        ("block_name_prefix", c_char * 24),
        ("parent_pool", c_int64),
        ("parent_name", c_char * 96),
    ]


class _LinkedImageSpec(ctypes.Structure):  # rbd_linked_image_spec_t
    _fields_ = [
        ("pool_id", c_int64),
        ("pool_name", c_char_p),
        ("pool_namespace", c_char_p),
        ("image_id", c_char_p),
        ("image_name", c_char_p),
        ("trash", c_bool),
    ]


class _SnapSpec(ctypes.Structure):  # rbd_snap_spec_t
    _fields_ = [("id", c_uint64), ("namespace_type", c_int), ("name", c_char_p)]


_DIFF_CB = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, handle)

_libs: tuple[Any, Any] | None = None


def _load() -> tuple[Any, Any]:
    """librados and librbd with the prototypes used here; ImportError naming the package."""
    global _libs
    if _libs is not None:
        return _libs
    try:
        rados = ctypes.CDLL("librados.so.2", use_errno=True)
        rbd = ctypes.CDLL("librbd.so.1", use_errno=True)
    except OSError:
        raise ImportError("rbd: exports need Ceph's client libraries (Debian: librbd1)") from None
    p = POINTER
    for lib, name, args, res in (
        (rados, "rados_create", [p(handle), c_char_p], c_int),
        (rados, "rados_conf_read_file", [handle, c_char_p], c_int),
        (rados, "rados_conf_parse_env", [handle, c_char_p], c_int),
        (rados, "rados_conf_set", [handle, c_char_p, c_char_p], c_int),
        (rados, "rados_connect", [handle], c_int),
        (rados, "rados_shutdown", [handle], None),
        (rados, "rados_ioctx_create", [handle, c_char_p, p(handle)], c_int),
        (rados, "rados_ioctx_set_namespace", [handle, c_char_p], None),
        (rados, "rados_ioctx_destroy", [handle], None),
        (rbd, "rbd_open", [handle, c_char_p, p(handle), c_char_p], c_int),
        (rbd, "rbd_open_read_only", [handle, c_char_p, p(handle), c_char_p], c_int),
        (rbd, "rbd_close", [handle], c_int),
        (rbd, "rbd_stat", [handle, p(_ImageInfo), c_size_t], c_int),
        (rbd, "rbd_get_features", [handle, p(c_uint64)], c_int),
        (rbd, "rbd_get_flags", [handle, p(c_uint64)], c_int),
        (rbd, "rbd_get_stripe_unit", [handle, p(c_uint64)], c_int),
        (rbd, "rbd_get_stripe_count", [handle, p(c_uint64)], c_int),
        (rbd, "rbd_get_parent", [handle, p(_LinkedImageSpec), p(_SnapSpec)], c_int),
        (rbd, "rbd_linked_image_spec_cleanup", [p(_LinkedImageSpec)], None),
        (rbd, "rbd_snap_spec_cleanup", [p(_SnapSpec)], None),
        (rbd, "rbd_lock_acquire", [handle, c_int], c_int),
        (rbd, "rbd_lock_get_owners", [handle, p(c_int), p(c_char_p), p(c_size_t)], c_int),
        (rbd, "rbd_lock_get_owners_cleanup", [p(c_char_p), c_size_t], None),
        (rbd, "rbd_resize", [handle, c_uint64], c_int),
        (rbd, "rbd_diff_iterate2", [handle, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8, _DIFF_CB, handle], c_int),
        (rbd, "rbd_set_image_notification", [handle, c_int, c_int], c_int),
        (rbd, "rbd_aio_create_completion", [handle, handle, p(handle)], c_int),
        (rbd, "rbd_aio_read", [handle, c_uint64, c_size_t, handle, handle], c_int),
        (rbd, "rbd_aio_write", [handle, c_uint64, c_size_t, handle, handle], c_int),
        (rbd, "rbd_aio_discard", [handle, c_uint64, c_uint64, handle], c_int),
        (rbd, "rbd_aio_write_zeroes", [handle, c_uint64, c_size_t, handle, c_int, c_int], c_int),
        (rbd, "rbd_aio_flush", [handle, handle], c_int),
        (rbd, "rbd_poll_io_events", [handle, p(handle), c_int], c_int),
        (rbd, "rbd_aio_get_return_value", [handle], c_ssize_t),
        (rbd, "rbd_aio_get_arg", [handle], handle),
        (rbd, "rbd_aio_release", [handle], None),
    ):
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    _libs = rados, rbd
    return _libs


def available() -> str | None:
    """None if the libraries load, else why not (one line)."""
    try:
        _load()
    except ImportError as e:
        return str(e)
    return None


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _enc(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def address(buf: Any) -> tuple[int, int, Any]:
    """``(address, length, keep)`` of a bytes-like object's memory: ``keep`` holds it exported
    (and alive) for as long as it is referenced."""
    if isinstance(buf, bytes):
        keep = c_char_p(buf)  # points into the bytes object itself
        return ctypes.cast(keep, handle).value or 0, len(buf), (keep, buf)
    view = memoryview(buf)
    if view.readonly:
        return address(view.tobytes())
    arr = (c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(arr), view.nbytes, arr


class Image:
    """One open image (see the module docstring).  Construct with ``Image.open`` on a worker thread."""

    def __init__(self, cluster: int, ioctx: int, image: int) -> None:
        self._rados, self._rbd = _load()
        self._cluster, self._ioctx, self._image = handle(cluster), handle(ioctx), handle(image)
        self._comps = (handle * POLL_BATCH)()

    # -- blocking calls (worker thread) --------------------------------------------------------

    @classmethod
    def open(
        cls,
        *,
        conf: str | None,
        client_id: str | None,
        settings: dict[str, str],
        pool: str,
        namespace: str | None,
        name: str,
        snap: str | None,
        readonly: bool,
    ) -> Image:
        """Connect and open; ``OSError`` with a one-line reason (ENOENT for a missing config,
        pool, image or snapshot)."""
        rados, rbd = _load()
        cluster = handle()
        _check(rados.rados_create(byref(cluster), _enc(client_id)), "cannot create a Ceph client")
        try:
            if rados.rados_conf_read_file(cluster, _enc(conf)) < 0:
                where = conf or "the default places (CEPH_CONF, /etc/ceph/ceph.conf)"
                raise OSError(errno.ENOENT, f"cannot read a Ceph config from {where}")
            _check(rados.rados_conf_parse_env(cluster, None), "CEPH_ARGS")
            for key, value in settings.items():
                _check(rados.rados_conf_set(cluster, key.encode(), value.encode()), f"setting {key}")
            rc = rados.rados_connect(cluster)
            if rc < 0:
                raise OSError(errno.EIO, f"cannot connect to the Ceph cluster: {os.strerror(-rc)}")
            ioctx = handle()
            rc = rados.rados_ioctx_create(cluster, pool.encode(), byref(ioctx))
            if rc == -errno.ENOENT:
                raise OSError(errno.ENOENT, f"no pool {pool!r}")
            _check(rc, f"pool {pool!r}")
            try:
                if namespace:
                    rados.rados_ioctx_set_namespace(ioctx, namespace.encode())
                image = handle()
                opener = rbd.rbd_open_read_only if readonly else rbd.rbd_open
                rc = opener(ioctx, name.encode(), byref(image), _enc(snap))
                if rc == -errno.ENOENT:
                    what = f"snapshot {snap!r} of image {name!r}" if snap else f"image {name!r}"
                    raise OSError(errno.ENOENT, f"no {what} in pool {pool!r}")
                _check(rc, f"image {name!r}")
            except BaseException:
                rados.rados_ioctx_destroy(ioctx)
                raise
        except BaseException:
            rados.rados_shutdown(cluster)
            raise
        return cls(cluster.value, ioctx.value, image.value)

    def close(self) -> None:
        """Close the image (releasing its exclusive lock), its I/O context and connection."""
        try:
            _check(self._rbd.rbd_close(self._image), "close")
        finally:
            self._rados.rados_ioctx_destroy(self._ioctx)
            self._rados.rados_shutdown(self._cluster)

    def lock_acquire(self) -> None:
        """Take the exclusive lock; EBUSY/EROFS if another client holds it."""
        _check(self._rbd.rbd_lock_acquire(self._image, RBD_LOCK_MODE_EXCLUSIVE), "exclusive lock")

    def lock_owners(self) -> list[str]:
        mode = c_int()
        count = c_size_t(8)
        while True:
            owners = (c_char_p * count.value)()
            rc = self._rbd.rbd_lock_get_owners(self._image, byref(mode), owners, byref(count))
            if rc != -errno.ERANGE:
                break
        if rc == -errno.ENOENT:
            return []
        _check(rc, "lock owners")
        try:
            return [owners[i].decode(errors="replace") for i in range(count.value)]
        finally:
            self._rbd.rbd_lock_get_owners_cleanup(owners, count)

    def resize(self, size: int) -> None:
        _check(self._rbd.rbd_resize(self._image, size), "resize")

    def diff(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The extents of ``offset, length`` that hold data, whole objects at a time (the object
        map with fast-diff), including the parent's."""
        out: list[tuple[int, int]] = []

        def cb(off: int, n: int, exists: int, _arg: Any) -> int:
            if exists:
                out.append((off, n))
            return 0

        _check(self._rbd.rbd_diff_iterate2(self._image, None, offset, length, 1, 1, _DIFF_CB(cb), None), "diff")
        return out

    # -- properties (cheap: librbd answers from memory) ----------------------------------------

    def _u64(self, fn: Callable[..., int], what: str) -> int:
        v = c_uint64()
        _check(fn(self._image, byref(v)), what)
        return v.value

    def stat(self) -> tuple[int, int]:
        """(size, object size)."""
        info = _ImageInfo()
        _check(self._rbd.rbd_stat(self._image, byref(info), ctypes.sizeof(info)), "stat")
        return info.size, info.obj_size

    def features(self) -> int:
        return self._u64(self._rbd.rbd_get_features, "features")

    def flags(self) -> int:
        return self._u64(self._rbd.rbd_get_flags, "flags")

    def striping(self) -> tuple[int, int]:
        """(stripe unit, stripe count)."""
        return self._u64(self._rbd.rbd_get_stripe_unit, "stripe unit"), self._u64(
            self._rbd.rbd_get_stripe_count, "stripe count"
        )

    def has_parent(self) -> bool:
        spec, snap = _LinkedImageSpec(), _SnapSpec()
        rc = self._rbd.rbd_get_parent(self._image, byref(spec), byref(snap))
        if rc == -errno.ENOENT:
            return False
        _check(rc, "parent")
        self._rbd.rbd_linked_image_spec_cleanup(byref(spec))
        self._rbd.rbd_snap_spec_cleanup(byref(snap))
        return True

    # -- asynchronous I/O (loop thread) --------------------------------------------------------

    def notify(self, fd: int) -> None:
        """Completions bump eventfd ``fd`` (then ``poll`` collects them)."""
        _check(self._rbd.rbd_set_image_notification(self._image, fd, EVENT_TYPE_EVENTFD), "image notification")

    def _completion(self, tag: int) -> handle:
        comp = handle()
        _check(self._rbd.rbd_aio_create_completion(handle(tag), None, byref(comp)), "completion")
        return comp

    def _submit(self, what: str, fn: Callable[..., int], tag: int, *args: Any) -> None:
        comp = self._completion(tag)
        rc = fn(self._image, *args, comp)
        if rc < 0:
            self._rbd.rbd_aio_release(comp)
            _check(rc, what)

    def aio_read(self, tag: int, offset: int, address: int, length: int) -> None:
        """Read into ``length`` bytes at ``address`` (kept alive and unused until ``tag`` is polled)."""
        self._submit("read", self._rbd.rbd_aio_read, tag, offset, length, address)

    def aio_write(self, tag: int, offset: int, data: Any) -> None:
        """Write ``data`` (any bytes-like object: librbd copies it before returning)."""
        where, length, _keep = address(data)
        self._submit("write", self._rbd.rbd_aio_write, tag, offset, length, where)

    def aio_discard(self, tag: int, offset: int, length: int) -> None:
        self._submit("discard", self._rbd.rbd_aio_discard, tag, offset, length)

    def aio_write_zeroes(self, tag: int, offset: int, length: int, *, thick: bool) -> None:
        comp = self._completion(tag)
        flags = RBD_WRITE_ZEROES_FLAG_THICK_PROVISION if thick else 0
        rc = self._rbd.rbd_aio_write_zeroes(self._image, offset, length, comp, flags, 0)
        if rc < 0:
            self._rbd.rbd_aio_release(comp)
            _check(rc, "write zeroes")

    def aio_flush(self, tag: int) -> None:
        self._submit("flush", self._rbd.rbd_aio_flush, tag)

    def poll(self) -> list[tuple[int, int]]:
        """Every completion queued so far, as ``(tag, return value)``, released."""
        out: list[tuple[int, int]] = []
        rbd, comps = self._rbd, self._comps
        while True:
            n = rbd.rbd_poll_io_events(self._image, comps, POLL_BATCH)
            for i in range(max(n, 0)):
                c = comps[i]
                out.append((rbd.rbd_aio_get_arg(c) or 0, rbd.rbd_aio_get_return_value(c)))
                rbd.rbd_aio_release(c)
            if n < POLL_BATCH:
                return out
