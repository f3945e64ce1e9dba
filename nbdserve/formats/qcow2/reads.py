"""qcow2 reads and block status.

Owns ``read`` (see ``formats.base``: the fast case walks the cached L2 tables synchronously and
starts every run's I/O: data -> ``storage.read``, zero -> zeroes, unallocated -> the backing
image, compressed -> the one-cluster memo; it returns a coroutine only where a table or a
compressed cluster must be loaded first), ``map_now`` (the mapping memo's query),
decompression with a one-cluster memo, and ``block_status`` (one run; holes in the host file
read as zeroes, as QEMU reports them).

No lock: every lookup is used with no await before the I/O it starts; after an await the
table is looked up again.
"""

from __future__ import annotations

from array import array

from ...errors import CorruptImage
from ...storage.base import Pending, read_at
from ..base import ALLOCATED, DATA, ZERO, Extent, TableReads
from .compress import decompress_cluster
from .lookup import K_COMPRESSED, K_DATA, K_UNALLOC, K_ZERO, NOT_PLAIN
from .tables import COMPRESSED, COPIED, OFFSET_MASK, compressed_geometry

_KIND_STATE = {K_UNALLOC: 0, K_ZERO: ALLOCATED | ZERO, K_DATA: ALLOCATED | DATA, K_COMPRESSED: ALLOCATED | DATA}


class ReadMixin(TableReads):
    """Reads and block status (no lock; see the module docstring)."""

    guest_positions = False

    def map_now(self, offset: int) -> int | None:
        """A standard cluster holding plain data, its L2 table cached (extended L2: map_bits 0)."""
        l1, l1i = self.l1, offset >> self.l1_shift
        e = self.cache.peek(self.l2kind, l1[l1i] & OFFSET_MASK) if l1i < len(l1) else None
        if e is None:
            return None
        ent = e.value[(offset >> self.cb) & self.l2_mask]
        host = ent & OFFSET_MASK
        if host and not ent & NOT_PLAIN and not host & self.cmask and host < self.storage.size:
            return host
        return None

    def _read_cached(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """Start the reads of ``buf`` (guest ``offset``) from ``pos`` (relative to ``buf``) on,
        run by run, while the L2 tables (and compressed clusters) are at hand; returns where it
        stopped.  Synchronous: each run's I/O starts right after its lookup."""
        n = len(buf)
        peek, kind, l1, shift = self.cache.peek, self.l2kind, self.l1, self.l1_shift
        while pos < n:
            off = offset + pos
            l1i = off >> shift
            end = pos + min(n - pos, ((l1i + 1) << shift) - off)
            l2off = l1[l1i] & OFFSET_MASK if l1i < len(l1) else 0
            if not l2off:
                p = self.read_backing(off, buf[pos:end])
                if p is not None:
                    pendings.append(p)
                pos = end
                continue
            e = peek(kind, l2off)
            if e is None:
                return pos
            t = e.value
            while pos < end:
                k, length, host = self._run(t, offset + pos, end - pos)
                part = buf[pos : pos + length]
                if k == K_DATA:
                    if host + length > self.storage.size + self.cs:
                        raise CorruptImage(self.path, f"data cluster 0x{host:x} beyond end of file")
                    p = self._read_data(part, offset + pos, host)
                elif k == K_ZERO:
                    part[:] = bytes(length)
                    p = None
                elif k == K_COMPRESSED:
                    off = offset + pos
                    data = self._decompressed(t, off)
                    if data is None:
                        return pos
                    in_c = off & self.cmask
                    part[:] = data[in_c : in_c + length]
                    p = None
                else:
                    p = self.read_backing(offset + pos, part)
                if p is not None:
                    pendings.append(p)
                pos += length
        return pos

    async def _load_for_read(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The L2 table or compressed cluster ``_read_cached`` stopped at, unless another read
        loaded it since (see ``TableReads``; the table is looked up again after the load)."""
        off = offset + pos
        l2off = self.l1[off >> self.l1_shift] & OFFSET_MASK
        e = self.cache.peek(self.l2kind, l2off)
        if e is None:
            self.cache.release(await self.cache.get(self.l2kind, l2off))
        else:
            entry = self._entry_at(e.value, off)
            if entry & COMPRESSED and entry != self._zc_key:  # (else another read loaded it meanwhile)
                await self._load_compressed(entry)
        return pos

    def _read_data(self, view: memoryview, guest: int, host: int) -> Pending:
        """Read data cluster bytes at ``host`` into ``view`` (guest offset ``guest``), decrypted."""
        p = self.storage.read(host, view)
        if self.crypt is None:
            return p
        if p is None:
            self._plaintext(view, guest, host)
            return None
        return self._decrypt_after(p, view, guest, host)

    async def _decrypt_after(self, pending: Pending, view: memoryview, guest: int, host: int) -> None:
        await pending
        self._plaintext(view, guest, host)

    def _entry_at(self, t: array, off: int) -> int:
        ci = (off >> self.cb) & (self.l2_entries - 1)
        return t[2 * ci] if self.ext else t[ci]

    def _decompressed(self, t: array, off: int) -> bytes | None:
        """The decompressed cluster at guest ``off`` if it is the one in the memo, else None
        (``_load_compressed`` loads it)."""
        return self._zc_data if self._entry_at(t, off) == self._zc_key else None

    async def _load_compressed(self, e: int) -> bytes:
        """Read and decompress the compressed cluster of L2 entry ``e`` into the memo."""
        if e == self._zc_key:
            return self._zc_data
        if self.crypt is not None:
            raise CorruptImage(self.path, "compressed cluster in an encrypted image")
        if e & COPIED:
            raise self._bad("compressed L2 entry with the COPIED flag:", e)
        host, length = compressed_geometry(e, self.cb)
        if host + length > self.storage.size + 512 or host < self.cs:
            raise CorruptImage(self.path, f"compressed cluster at 0x{host:x} (+{length}) outside the file")
        raw = await read_at(self.storage, host, length)
        data = decompress_cluster(self.path, self.compression, raw, self.cs)
        self._zc_key, self._zc_data = e, data
        return data

    async def block_status(self, offset: int, length: int) -> Extent:
        pos, end = offset, offset + length
        state = -1
        while pos < end:
            l1i = pos >> self.l1_shift
            span_end = min(end, (l1i + 1) << self.l1_shift)
            t = await self._table(l1i)  # looked up again after every await
            if t is None:
                s, n = 0, span_end - pos
            else:
                k, n, host = self._run(t, pos, span_end - pos)
                s = _KIND_STATE[k]
                if k == K_DATA and self.crypt is None:  # (encrypted holes decrypt to noise)
                    s, n = await self._host_state(host, n)
            if state == -1:
                state = s
            elif s != state:
                break
            pos += n
        return Extent(pos - offset, state)

    async def _host_state(self, host: int, n: int) -> tuple[int, int]:
        """Allocated data at ``host``: holes in the host file also read as zeroes (as QEMU says).

        The last host data region found is remembered (``_data_region``): writes only ever turn
        holes into data here (nothing is punched), so it stays valid and sequential block status
        costs no lseek per request (SEEK_HOLE can scan far on some filesystems).
        """
        lo, hi = self._data_region
        if lo <= host < hi:
            return ALLOCATED | DATA, min(n, hi - host)
        size = self.storage.size
        if host >= size:
            return ALLOCATED | DATA | ZERO, n
        run, is_data = await self.storage.extent(host, size - host)
        if is_data:
            self._data_region = (host, host + run)
            return ALLOCATED | DATA, min(n, run)
        return ALLOCATED | DATA | ZERO, min(n, run)
