"""qcow2 reads and block status.

Owns ``read_now``/``map_now`` (the synchronous hot path over cached L2 tables, see
``formats.base``), ``preadv`` (any range: data, zero, compressed, unallocated -> backing),
decompression with a one-cluster memo, and ``block_status`` (one run; holes in the host file
read as zeroes, as QEMU reports them).

No lock: every lookup is used with no await before the I/O it drives; after an await the
table is looked up again.
"""

from __future__ import annotations

from array import array

from ...errors import CorruptImage
from ..base import ALLOCATED, DATA, ZERO, Extent
from .compress import decompress_cluster
from .lookup import K_COMPRESSED, K_DATA, K_UNALLOC, K_ZERO, NOT_PLAIN
from .tables import COPIED, OFFSET_MASK, compressed_geometry

_KIND_STATE = {K_UNALLOC: 0, K_ZERO: ALLOCATED | ZERO, K_DATA: ALLOCATED | DATA, K_COMPRESSED: ALLOCATED | DATA}


class ReadMixin:
    """Reads and block status (no lock; see the module docstring)."""

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """Hot path: inside one standard cluster of plain data (see ``map_now``)."""
        in_c = offset & self.cmask
        if in_c + len(buf) > self.cs or self.ext:
            return False
        host = self.map_now(offset)
        if host is None:
            return False
        self.file.pread_into(buf, host + in_c)
        if self.crypt is not None:
            self._plaintext(buf, offset, host + in_c)
        return True

    def map_now(self, offset: int) -> int | None:
        """A standard cluster holding plain data, its L2 table cached (extended L2: map_bits 0)."""
        l1, l1i = self.l1, offset >> self.l1_shift
        e = self.cache.peek(self.l2kind, l1[l1i] & OFFSET_MASK) if l1i < len(l1) else None
        if e is None:
            return None
        ent = e.value[(offset >> self.cb) & self.l2_mask]
        host = ent & OFFSET_MASK
        if host and not ent & NOT_PLAIN and not host & self.cmask and host < self.file.size:
            return host
        return None

    async def preadv(self, offset: int, buf: memoryview) -> None:
        if self.read_now(offset, buf):
            return
        pos, n = 0, len(buf)
        peek, kind, l1, file = self.cache.peek, self.l2kind, self.l1, self.file
        while pos < n:
            off = offset + pos
            l1i = off >> self.l1_shift
            span = min(n - pos, ((l1i + 1) << self.l1_shift) - off)
            l2off = l1[l1i] & OFFSET_MASK if l1i < len(l1) else 0
            if not l2off:
                await self.read_backing(off, buf[pos : pos + span])
                pos += span
                continue
            e = peek(kind, l2off)
            if e is None:
                self.cache.release(await self.cache.get(kind, l2off))
                continue  # look up again: the table may have changed while we waited
            t = e.value
            end = pos + span
            while pos < end:
                k, length, host = self._run(t, offset + pos, end - pos)
                if k == K_DATA:
                    if host + length > file.size + self.cs:
                        raise CorruptImage(self.path, f"data cluster 0x{host:x} beyond end of file")
                    file.pread_into(buf[pos : pos + length], host)
                    if self.crypt is not None:
                        self._plaintext(buf[pos : pos + length], offset + pos, host)
                elif k == K_ZERO:
                    buf[pos : pos + length] = bytes(length)
                elif k == K_COMPRESSED:
                    off = offset + pos
                    data = self._decompressed(t, off)
                    in_c = off & self.cmask
                    buf[pos : pos + length] = data[in_c : in_c + length]
                else:
                    await self.read_backing(offset + pos, buf[pos : pos + length])
                    pos += length
                    break  # after an await, look the table up again
                pos += length

    def _decompressed(self, t: array, off: int) -> bytes:
        ci = (off >> self.cb) & (self.l2_entries - 1)
        e = t[2 * ci] if self.ext else t[ci]
        return self._decompress_entry(e)

    def _decompress_entry(self, e: int) -> bytes:
        if e == self._zc_key:
            return self._zc_data
        if self.crypt is not None:
            raise CorruptImage(self.path, "compressed cluster in an encrypted image")
        if e & COPIED:
            raise self._bad("compressed L2 entry with the COPIED flag:", e)
        host, length = compressed_geometry(e, self.cb)
        if host + length > self.file.size + 512 or host < self.cs:
            raise CorruptImage(self.path, f"compressed cluster at 0x{host:x} (+{length}) outside the file")
        data = decompress_cluster(self.path, self.compression, self.file.pread(length, host), self.cs)
        self._zc_key, self._zc_data = e, data
        return data

    async def block_status(self, offset: int, length: int) -> Extent:
        pos, end = offset, offset + length
        state = -1
        while pos < end:
            l1i = pos >> self.l1_shift
            span_end = min(end, (l1i + 1) << self.l1_shift)
            t = await self._table(l1i)
            while pos < span_end:  # no await in here: ``t`` stays valid
                if t is None:
                    s, n = 0, span_end - pos
                else:
                    k, n, host = self._run(t, pos, span_end - pos)
                    s = _KIND_STATE[k]
                    if k == K_DATA and self.crypt is None:  # (encrypted holes decrypt to noise)
                        s, n = self._host_state(host, n)
                if state == -1:
                    state = s
                elif s != state:
                    return Extent(pos - offset, state)
                pos += n
        return Extent(pos - offset, state)

    def _host_state(self, host: int, n: int) -> tuple[int, int]:
        """Allocated data at ``host``: holes in the host file also read as zeroes (as QEMU says).

        The last host data region found is remembered (``_data_region``): writes only ever turn
        holes into data here (nothing is punched), so it stays valid and sequential block status
        costs no lseek per request (SEEK_HOLE can scan far on some filesystems).
        """
        lo, hi = self._data_region
        if lo <= host < hi:
            return ALLOCATED | DATA, min(n, hi - host)
        f = self.file
        if host >= f.size:
            return ALLOCATED | DATA | ZERO, n
        hole = f.next_hole(host)
        if hole > host:
            self._data_region = (host, hole)
            return ALLOCATED | DATA, min(n, hole - host)
        data = f.next_data(host)
        if data <= host:
            return ALLOCATED | DATA, n
        return ALLOCATED | DATA | ZERO, min(n, data - host)
