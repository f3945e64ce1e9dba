"""Decompression of qcow2 compressed clusters (deflate and zstd).

Owns ``decompress_cluster``: the input is the byte range a compressed L2 entry names (bounded by
the descriptor, at most 2^(cluster_bits-8) sectors); the output is exactly one cluster.  Output is
capped while decoding, so a hostile stream cannot expand past one cluster (no decompression
bombs); a stream that ends early or is malformed is corruption.  Bytes after the stream(s) are
ignored, as QEMU does.
"""

from __future__ import annotations

import io
import zlib

import zstandard

from ...errors import CorruptImage
from .header import COMPRESSION_DEFLATE

_ZSTD = zstandard.ZstdDecompressor()


def decompress_cluster(path: str, compression_type: int, data: bytes | bytearray, cluster_size: int) -> bytes:
    try:
        if compression_type == COMPRESSION_DEFLATE:
            # Raw deflate; wbits -15 accepts every window size QEMU may have used.
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        else:
            reader = _ZSTD.stream_reader(io.BytesIO(data), read_across_frames=True)
            parts, got = [], 0
            while got < cluster_size:
                chunk = reader.read(cluster_size - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            out = b"".join(parts)
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(path, f"compressed cluster does not decompress: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(path, f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out
