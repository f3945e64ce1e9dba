"""Byte tables for the option policy (``nbdserve.server.options``), end to end through the codec.

Each case is a client byte stream (greeting reply + options) and the exact server bytes the spec
demands, written out by hand from ``doc/proto.md`` (and the ``extension-ext-header`` branch).  The
stream is fed to ``ServerHandshake`` whole and one byte at a time; every event is answered by
``Negotiation.answer`` and the replies are concatenated.  In an expected stream, ``*`` stands for
an error reply's u32 length and free-text UTF-8 message (whose wording is not part of the protocol).

Exports served: ``disk`` (1 MiB raw, writable, description "test disk"), ``ro`` (64 KiB raw,
read-only, no description) and ``bad`` (failed to open).  Real raw images, opened once per module.

TLS and access tables: a ``|`` in a client stream is where the TLS handshake happens (the option
before it must be an accepted STARTTLS; the bytes after it are what TLS delivers, decrypted).
Their scenarios (``SCENARIOS``) give the TLS mode, the access rules and who the client is.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from nbdserve.authz import AccessRules, Peer, parse_dn
from nbdserve.cache import ClusterCache
from nbdserve.image import ImageSpec, open_image
from nbdserve.protocol import constants as C
from nbdserve.protocol.handshake import ServerHandshake
from nbdserve.server.exports import Export, ExportTable
from nbdserve.server.options import (
    CLOSE,
    CONTEXT_IDS,
    CONTINUE,
    FORCEDTLS,
    SELECTIVETLS,
    STARTTLS,
    TRANSMIT,
    Negotiation,
    Policy,
    select_contexts,
)

OPT = "49484156454f5054"  # 'IHAVEOPT'
REP = "0003e889045565a9"  # option reply magic
FIXED = "00000001"
FIXED_NZ = "00000003"
DISK = "6469736b"  # 'disk'
BASE_ALLOC = "626173653a616c6c6f636174696f6e"  # 'base:allocation'
QEMU_DEPTH = "71656d753a616c6c6f636174696f6e2d6465707468"  # 'qemu:allocation-depth'
ZEROES = " 00" * 124

# client options
SR = f"{OPT} 00000008 00000000"
EH = f"{OPT} 0000000b 00000000"
ABORT = f"{OPT} 00000002 00000000"
LIST = f"{OPT} 00000003 00000000"
EXPORT_DISK = f"{OPT} 00000001 00000004 {DISK}"
EXPORT_RO = f"{OPT} 00000001 00000002 726f"
GO_RO = f"{OPT} 00000007 00000008 00000002 726f 0000"
GO_DISK = f"{OPT} 00000007 0000000a 00000004 {DISK} 0000"
SET_BASE = f"{OPT} 0000000a 0000001f 00000004 {DISK} 00000001 0000000f {BASE_ALLOC}"
SET_DEPTH = f"{OPT} 0000000a 00000025 00000004 {DISK} 00000001 00000015 {QEMU_DEPTH}"

# server replies
SR_ACK = f"{REP} 00000008 00000001 00000000"
EH_ACK = f"{REP} 0000000b 00000001 00000000"
ABORT_ACK = f"{REP} 00000002 00000001 00000000"
SET_ACK = f"{REP} 0000000a 00000001 00000000"
LIST_META_ACK = f"{REP} 00000009 00000001 00000000"
META_SET_BASE = f"{REP} 0000000a 00000004 00000013 00000001 {BASE_ALLOC}"
META_SET_DEPTH = f"{REP} 0000000a 00000004 00000019 00000002 {QEMU_DEPTH}"
META_LIST_BASE = f"{REP} 00000009 00000004 00000013 00000000 {BASE_ALLOC}"
META_LIST_DEPTH = f"{REP} 00000009 00000004 00000019 00000000 {QEMU_DEPTH}"
# GO/INFO (option 7/6) for 'ro': size 64 KiB; flags HAS_FLAGS|READ_ONLY|FLUSH|FUA|MULTI_CONN|CACHE = 0x050f
GO_RO_REPLY = (
    f"{REP} 00000007 00000003 0000000c 0000 0000000000010000 050f "
    f"{REP} 00000007 00000003 0000000e 0003 00000001 00001000 02000000 "
    f"{REP} 00000007 00000001 00000000"
)
# ... and once structured replies are on, SEND_DF joins: 0x058f
GO_RO_REPLY_DF = GO_RO_REPLY.replace("050f", "058f")
# 'disk': size 1 MiB; flags HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|MULTI_CONN|CACHE|FAST_ZERO = 0x0d6d (+DF 0x0ded)
GO_DISK_REPLY_DF = (
    f"{REP} 00000007 00000003 0000000c 0000 0000000000100000 0ded "
    f"{REP} 00000007 00000003 0000000b 0002 74657374206469736b "
    f"{REP} 00000007 00000003 0000000e 0003 00000001 00001000 02000000 "
    f"{REP} 00000007 00000001 00000000"
)

B, D = (1, "base:allocation"), (2, "qemu:allocation-depth")

# Columns: id, client bytes, expected server bytes, final action, selected contexts afterwards
CASES = [
    # -- EXPORT_NAME: no option-reply header; 124 zeroes unless C_NO_ZEROES ------------------
    ("export-name-zero-padding", f"{FIXED} {EXPORT_DISK}", f"0000000000100000 0d6d {ZEROES}", TRANSMIT, ()),
    ("export-name-no-zeroes", f"{FIXED_NZ} {EXPORT_DISK}", "0000000000100000 0d6d", TRANSMIT, ()),
    ("export-name-read-only", f"{FIXED} {EXPORT_RO}", f"0000000000010000 050f {ZEROES}", TRANSMIT, ()),
    ("export-name-non-fixed-client", f"00000000 {EXPORT_RO}", f"0000000000010000 050f {ZEROES}", TRANSMIT, ()),
    ("export-name-after-sr-advertises-df", f"{FIXED_NZ} {SR} {EXPORT_DISK}", f"{SR_ACK} 0000000000100000 0ded",
     TRANSMIT, ()),
    ("export-name-unknown-closes", f"{FIXED} {OPT} 00000001 00000004 6e6f7065", "", CLOSE, ()),
    ("export-name-unavailable-closes", f"{FIXED} {OPT} 00000001 00000003 626164", "", CLOSE, ()),
    ("export-name-too-long-closes", f"{FIXED} {OPT} 00000001 00001001" + " 61" * 4097, "", CLOSE, ()),
    ("export-name-bad-utf8-closes", f"{FIXED} {OPT} 00000001 00000002 c328", "", CLOSE, ()),
    ("export-name-after-eh-closes", f"{FIXED} {EH} {EXPORT_DISK}", EH_ACK, CLOSE, ()),
    # -- INFO / GO ------------------------------------------------------------------------
    ("info-disk-no-requests", f"{FIXED} {OPT} 00000006 0000000a 00000004 {DISK} 0000",
     f"{REP} 00000006 00000003 0000000c 0000 0000000000100000 0d6d "
     f"{REP} 00000006 00000003 0000000b 0002 74657374206469736b "
     f"{REP} 00000006 00000003 0000000e 0003 00000001 00001000 02000000 "
     f"{REP} 00000006 00000001 00000000", CONTINUE, ()),
    ("go-disk-all-requests-after-sr", f"{FIXED} {SR} {OPT} 00000007 00000012 00000004 {DISK} 0004 0000 0001 0002 0003",
     f"{SR_ACK} "
     f"{REP} 00000007 00000003 0000000c 0000 0000000000100000 0ded "
     f"{REP} 00000007 00000003 00000006 0001 {DISK} "
     f"{REP} 00000007 00000003 0000000b 0002 74657374206469736b "
     f"{REP} 00000007 00000003 0000000e 0003 00000001 00001000 02000000 "
     f"{REP} 00000007 00000001 00000000", TRANSMIT, ()),
    ("go-ro-no-requests", f"{FIXED} {GO_RO}", GO_RO_REPLY, TRANSMIT, ()),
    ("go-unknown-info-request-ignored", f"{FIXED} {OPT} 00000007 0000000a 00000002 726f 0001 1234", GO_RO_REPLY,
     TRANSMIT, ()),
    ("info-then-go-same-information", f"{FIXED} {OPT} 00000006 00000008 00000002 726f 0000 {GO_RO}",
     GO_RO_REPLY.replace(f"{REP} 00000007", f"{REP} 00000006") + " " + GO_RO_REPLY, TRANSMIT, ()),
    ("info-missing-export-err-unknown", f"{FIXED} {OPT} 00000006 0000000a 00000004 6e6f7065 0000",
     f"{REP} 00000006 80000006 *", CONTINUE, ()),
    ("go-unavailable-export-err-unknown-then-go", f"{FIXED} {OPT} 00000007 00000009 00000003 626164 0000 {GO_RO}",
     f"{REP} 00000007 80000006 * {GO_RO_REPLY}", TRANSMIT, ()),
    ("go-namelen-past-data-err-invalid-then-abort", f"{FIXED} {OPT} 00000007 0000000a 00000005 {DISK} 0000 {ABORT}",
     f"{REP} 00000007 80000003 * {ABORT_ACK}", CLOSE, ()),
    ("go-name-too-long-err-too-big", f"{FIXED} {OPT} 00000007 00001007 00001001" + " 61" * 4097 + " 0000",
     f"{REP} 00000007 80000009 *", CONTINUE, ()),
    ("eh-go-disk-advertises-df", f"{FIXED} {EH} {OPT} 00000007 0000000c 00000004 {DISK} 0001 0003",
     f"{EH_ACK} {GO_DISK_REPLY_DF}", TRANSMIT, ()),
    # -- LIST, ABORT, STARTTLS, SR, EH ----------------------------------------------------
    ("list-with-descriptions", f"{FIXED} {LIST}",
     f"{REP} 00000003 00000002 00000011 00000004 {DISK} 74657374206469736b "
     f"{REP} 00000003 00000002 00000006 00000002 726f "
     f"{REP} 00000003 00000002 00000007 00000003 626164 "
     f"{REP} 00000003 00000001 00000000", CONTINUE, ()),
    ("list-with-data-err-invalid", f"{FIXED} {OPT} 00000003 00000001 00", f"{REP} 00000003 80000003 *", CONTINUE, ()),
    ("abort-ack-closes", f"{FIXED} {ABORT}", ABORT_ACK, CLOSE, ()),
    ("abort-with-data-still-ack", f"{FIXED} {OPT} 00000002 00000003 010203", ABORT_ACK, CLOSE, ()),
    ("starttls-err-policy", f"{FIXED} {OPT} 00000005 00000000", f"{REP} 00000005 80000002 *", CONTINUE, ()),
    ("starttls-with-data-err-invalid", f"{FIXED} {OPT} 00000005 00000001 00", f"{REP} 00000005 80000003 *",
     CONTINUE, ()),
    ("structured-reply-ack-then-df", f"{FIXED} {SR} {GO_RO}", f"{SR_ACK} {GO_RO_REPLY_DF}", TRANSMIT, ()),
    ("structured-reply-with-data-invalid-no-df", f"{FIXED} {OPT} 00000008 00000001 00 {GO_RO}",
     f"{REP} 00000008 80000003 * {GO_RO_REPLY}", TRANSMIT, ()),
    ("extended-headers-ack-then-df", f"{FIXED} {EH} {GO_RO}", f"{EH_ACK} {GO_RO_REPLY_DF}", TRANSMIT, ()),
    ("extended-headers-with-data-invalid", f"{FIXED} {OPT} 0000000b 00000002 0000 {GO_RO}",
     f"{REP} 0000000b 80000003 * {GO_RO_REPLY}", TRANSMIT, ()),
    ("structured-reply-after-eh-err-ext-header-reqd", f"{FIXED} {EH} {SR}", f"{EH_ACK} {REP} 00000008 8000000a *",
     CONTINUE, ()),
    ("sr-then-eh-both-ack", f"{FIXED} {SR} {EH}", f"{SR_ACK} {EH_ACK}", CONTINUE, ()),
    # -- unknown options: ERR_UNSUP, data drained, stream stays in sync --------------------
    ("unknown-option-err-unsup-then-abort", f"{FIXED} {OPT} 07654321 00000005 0102030405 {ABORT}",
     f"{REP} 07654321 80000001 * {ABORT_ACK}", CLOSE, ()),
    ("unknown-option-data-of-fake-options", f"{FIXED} {OPT} 000000ff 00000140" + f" {LIST}" * 20 + f" {ABORT}",
     f"{REP} 000000ff 80000001 * {ABORT_ACK}", CLOSE, ()),
    ("peek-export-err-unsup", f"{FIXED} {OPT} 00000004 00000000", f"{REP} 00000004 80000001 *", CONTINUE, ()),
    # -- meta contexts -------------------------------------------------------------------
    ("set-meta-before-sr-err-invalid", f"{FIXED} {SET_BASE}", f"{REP} 0000000a 80000003 *", CONTINUE, ()),
    ("set-meta-base-allocation", f"{FIXED} {SR} {SET_BASE}", f"{SR_ACK} {META_SET_BASE} {SET_ACK}", CONTINUE, (B,)),
    ("set-meta-after-eh", f"{FIXED} {EH} {SET_BASE}", f"{EH_ACK} {META_SET_BASE} {SET_ACK}", CONTINUE, (B,)),
    ("set-meta-both-contexts",
     f"{FIXED} {SR} {OPT} 0000000a 00000038 00000004 {DISK} 00000002 00000015 {QEMU_DEPTH} 0000000f {BASE_ALLOC}",
     f"{SR_ACK} {META_SET_DEPTH} {META_SET_BASE} {SET_ACK}", CONTINUE, (D, B)),
    ("set-meta-wildcards-ignored", f"{FIXED} {SR} {OPT} 0000000a 0000001e 00000004 {DISK} 00000002 "
     "00000005 626173653a 00000005 71656d753a", f"{SR_ACK} {SET_ACK}", CONTINUE, ()),
    ("set-meta-unknown-namespace-and-leaf-ignored", f"{FIXED} {SR} {OPT} 0000000a 00000029 00000004 {DISK} 00000002 "
     "00000009 782d666f6f3a626172 0000000c 626173653a756e6b6e6f776e", f"{SR_ACK} {SET_ACK}", CONTINUE, ()),
    ("set-meta-no-queries-selects-none", f"{FIXED} {SR} {OPT} 0000000a 0000000c 00000004 {DISK} 00000000",
     f"{SR_ACK} {SET_ACK}", CONTINUE, ()),
    ("set-meta-missing-export-err-unknown",
     f"{FIXED} {SR} {OPT} 0000000a 0000001f 00000004 6e6f7065 00000001 0000000f {BASE_ALLOC}",
     f"{SR_ACK} {REP} 0000000a 80000006 *", CONTINUE, ()),
    ("list-meta-all", f"{FIXED} {OPT} 00000009 0000000c 00000004 {DISK} 00000000",
     f"{META_LIST_BASE} {META_LIST_DEPTH} {LIST_META_ACK}", CONTINUE, ()),
    ("list-meta-base-wildcard", f"{FIXED} {SR} {OPT} 00000009 00000015 00000004 {DISK} 00000001 00000005 626173653a",
     f"{SR_ACK} {META_LIST_BASE} {LIST_META_ACK}", CONTINUE, ()),
    ("list-meta-qemu-wildcard", f"{FIXED} {SR} {OPT} 00000009 00000015 00000004 {DISK} 00000001 00000005 71656d753a",
     f"{SR_ACK} {META_LIST_DEPTH} {LIST_META_ACK}", CONTINUE, ()),
    ("list-meta-unknown-ignored", f"{FIXED} {OPT} 00000009 0000003f 00000004 {DISK} 00000004 "
     "0000000c 6e62642d7365727665723a78 00000005 782d793a7a 00000009 626173653a6e6f7065 "
     "00000009 71656d753a6e6f7065", LIST_META_ACK, CONTINUE, ()),
    ("list-meta-no-duplicates", f"{FIXED} {OPT} 00000009 00000028 00000004 {DISK} 00000002 "
     f"0000000f {BASE_ALLOC} 00000005 626173653a", f"{META_LIST_BASE} {LIST_META_ACK}", CONTINUE, ()),
    ("list-meta-missing-export-err-unknown", f"{FIXED} {OPT} 00000009 0000000c 00000004 6e6f7065 00000000",
     f"{REP} 00000009 80000006 *", CONTINUE, ()),
    ("list-meta-query-past-end-err-invalid", f"{FIXED} {OPT} 00000009 0000000e 00000000 00000001 00000005 6261",
     f"{REP} 00000009 80000003 *", CONTINUE, ()),
    # SET replaces the selection, even when it fails
    ("set-replaced-by-failed-set-unknown-export",
     f"{FIXED} {SR} {SET_BASE} {OPT} 0000000a 0000001f 00000004 6e6f7065 00000001 0000000f {BASE_ALLOC}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {REP} 0000000a 80000006 *", CONTINUE, ()),
    ("set-replaced-by-malformed-set",
     f"{FIXED} {SR} {SET_BASE} {OPT} 0000000a 0000000e 00000000 00000001 00000005 6261",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {REP} 0000000a 80000003 *", CONTINUE, ()),
    ("set-replaced-by-empty-set", f"{FIXED} {SR} {SET_BASE} {OPT} 0000000a 0000000c 00000004 {DISK} 00000000",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {SET_ACK}", CONTINUE, ()),
    ("set-replaced-by-second-set", f"{FIXED} {SR} {SET_BASE} {SET_DEPTH}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {META_SET_DEPTH} {SET_ACK}", CONTINUE, (D,)),
    ("set-kept-by-list-meta", f"{FIXED} {SR} {SET_BASE} {OPT} 00000009 0000000c 00000004 {DISK} 00000000",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {META_LIST_BASE} {META_LIST_DEPTH} {LIST_META_ACK}", CONTINUE, (B,)),
    # contexts belong to the export they were selected for
    ("go-same-export-keeps-contexts", f"{FIXED} {SR} {SET_BASE} {GO_DISK}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {GO_DISK_REPLY_DF}", TRANSMIT, (B,)),
    ("go-other-export-drops-contexts", f"{FIXED} {SR} {SET_BASE} {GO_RO}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {GO_RO_REPLY_DF}", TRANSMIT, ()),
    ("export-name-other-export-drops-contexts", f"{FIXED_NZ} {SR} {SET_BASE} {EXPORT_RO}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} 0000000000010000 058f", TRANSMIT, ()),
    ("export-name-same-export-keeps-contexts", f"{FIXED_NZ} {SR} {SET_BASE} {EXPORT_DISK}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} 0000000000100000 0ded", TRANSMIT, (B,)),
]  # fmt: skip


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    for name, size in (("disk.img", 1 << 20), ("ro.img", 64 << 10)):
        with open(d / name, "wb") as f:
            f.truncate(size)
    cache = ClusterCache()

    async def open_both():
        disk = await open_image(ImageSpec(str(d / "disk.img"), format="raw"), cache)
        ro = await open_image(ImageSpec(str(d / "ro.img"), format="raw", readonly=True), cache)
        return disk, ro

    disk, ro = asyncio.run(open_both())
    table = ExportTable(
        [
            Export("disk", "test disk", False, disk),
            Export("ro", "", True, ro),
            Export("bad", "", True, None, "bad.img: unknown format"),
        ]
    )
    yield table

    async def close_both():
        await disk.close()
        await ro.close()

    asyncio.run(close_both())


def negotiate(exports: ExportTable, client: bytes | list[bytes], split: str, neg: Negotiation | None = None, tls=None):
    """Run the handshake; returns (server bytes, last outcome, negotiation, handshake).

    ``client`` may be a list of segments with a TLS handshake between each two: the last option
    of a segment must be an accepted STARTTLS, after which ``neg.tls_started(*tls)`` runs."""
    hs, out, last = ServerHandshake(), bytearray(), None
    neg = neg if neg is not None else Negotiation(exports)
    segments = client if isinstance(client, list) else [client]
    for n, segment in enumerate(segments):
        if n:
            assert last is not None and last.action == STARTTLS, "a TLS handshake needs an accepted STARTTLS"
            hs.starttls()
            neg.tls_started(*(tls or ()))
        pieces = [segment] if split == "whole" else [segment[i : i + 1] for i in range(len(segment))]
        for piece in pieces:
            hs.receive_data(piece)
            while (ev := hs.next_event()) is not None:
                last = neg.answer(ev)
                out += last.data
                if last.action not in (CONTINUE, STARTTLS):
                    return bytes(out), last, neg, hs
    return bytes(out), last, neg, hs


def expected_bytes(pattern: str, actual: bytes) -> bytes:
    """``pattern`` as bytes, each ``*`` replaced by the length + message found at that place in
    ``actual`` (checked to be UTF-8 and at most 4096 bytes)."""
    out = b""
    parts = pattern.split("*")
    for i, part in enumerate(parts):
        out += bytes.fromhex(part)
        if i < len(parts) - 1:
            assert len(actual) >= len(out) + 4, "reply too short for an error message"
            (n,) = struct.unpack_from(">I", actual, len(out))
            msg = actual[len(out) + 4 : len(out) + 4 + n]
            assert len(msg) == n and 0 < n <= C.MAX_STRING
            msg.decode("utf-8")
            out += actual[len(out) : len(out) + 4 + n]
    return out


@pytest.mark.parametrize("split", ["whole", "bytewise"])
@pytest.mark.parametrize(
    ("client", "server", "action", "contexts"), [pytest.param(c, s, a, x, id=i) for i, c, s, a, x in CASES]
)
def test_negotiation(exports, client: str, server: str, action: str, contexts: tuple, split: str) -> None:
    out, last, neg, hs = negotiate(exports, bytes.fromhex(client), split)
    assert out.hex(" ") == expected_bytes(server, out).hex(" ")
    assert last is not None and last.action == action
    if action == CONTINUE:
        assert hs.buffered == 0
    if action == TRANSMIT:
        assert last.export is not None and last.export.image is not None
    if action == CLOSE:
        assert last.reason
    assert neg.contexts == contexts


def test_transmit_carries_the_export_and_leftover_bytes(exports) -> None:
    request = "25609513 0000 0000 0000000000000001 0000000000000000 00000200"
    _, last, neg, hs = negotiate(exports, bytes.fromhex(f"{FIXED} {SR} {SET_BASE} {GO_DISK} {request}"), "whole")
    assert last.action == TRANSMIT and last.export.name == "disk"
    assert (neg.structured, neg.extended, neg.contexts_export) == (True, False, "disk")
    assert hs.take_buffered() == bytes.fromhex(request)


# -- transmission flags -----------------------------------------------------------------------

FLAGS = [
    # (id, export, structured, extended, expected flags written by hand)
    ("writable-simple", "disk", False, False, 0x0D6D),
    ("writable-structured", "disk", True, False, 0x0DED),
    ("writable-extended", "disk", False, True, 0x0DED),
    ("read-only-simple", "ro", False, False, 0x050F),
    ("read-only-structured", "ro", True, False, 0x058F),
]  # fmt: skip


@pytest.mark.parametrize(("name", "sr", "eh", "expected"), [pytest.param(*f[1:], id=f[0]) for f in FLAGS])
def test_transmission_flags(exports, name: str, sr: bool, eh: bool, expected: int) -> None:
    flags = Negotiation(exports, structured=sr, extended=eh).transmission_flags(exports.get(name))
    assert f"{flags:04x}" == f"{expected:04x}"
    assert flags & C.FLAG_HAS_FLAGS
    assert bool(flags & C.FLAG_READ_ONLY) == (name == "ro")
    assert bool(flags & C.FLAG_SEND_DF) == (sr or eh), "DF only with structured replies"
    if flags & C.FLAG_SEND_FAST_ZERO:
        assert flags & C.FLAG_SEND_WRITE_ZEROES, "FAST_ZERO only with WRITE_ZEROES"
    if flags & C.FLAG_READ_ONLY:
        assert not flags & (C.FLAG_SEND_TRIM | C.FLAG_SEND_WRITE_ZEROES | C.FLAG_SEND_FAST_ZERO)


# -- select_contexts --------------------------------------------------------------------------

SELECT = [
    ("list-nothing-means-all", (), True, ["base:allocation", "qemu:allocation-depth"]),
    ("set-nothing-means-none", (), False, []),
    ("exact-names", ("qemu:allocation-depth", "base:allocation"), False,
     ["qemu:allocation-depth", "base:allocation"]),
    ("base-wildcard-in-list", ("base:",), True, ["base:allocation"]),
    ("base-wildcard-ignored-in-set", ("base:",), False, []),
    ("qemu-wildcard-in-list", ("qemu:",), True, ["qemu:allocation-depth"]),
    ("qemu-wildcard-ignored-in-set", ("qemu:",), False, []),
    ("unknown-namespaces-and-leaves", ("x-a:b", "nbd-server:", "base:x", "qemu:dirty-bitmap:", "nocolon"), True, []),
    ("duplicates-once", ("base:allocation", "base:", "base:allocation"), True, ["base:allocation"]),
]  # fmt: skip


@pytest.mark.parametrize(("queries", "listing", "expected"), [pytest.param(*s[1:], id=s[0]) for s in SELECT])
def test_select_contexts(queries: tuple, listing: bool, expected: list) -> None:
    assert select_contexts(queries, listing=listing) == expected


def test_context_ids_are_unique_and_nonzero() -> None:
    assert sorted(CONTEXT_IDS.values()) == list(range(1, len(CONTEXT_IDS) + 1))


# -- TLS (the spec's NOTLS, FORCEDTLS and SELECTIVETLS answers) and access rules ----------------

STARTTLS_OPT = f"{OPT} 00000005 00000000"
STARTTLS_ACK = f"{REP} 00000005 00000001 00000000"
SECRET = "736563726574"  # 'secret', the TLS-only export of the SELECTIVETLS scenarios
GO_SECRET = f"{OPT} 00000007 0000000c 00000006 {SECRET} 0000"
EXPORT_SECRET = f"{OPT} 00000001 00000006 {SECRET}"
SET_SECRET = f"{OPT} 0000000a 00000021 00000006 {SECRET} 00000001 0000000f {BASE_ALLOC}"
GO_DISK_REPLY = GO_DISK_REPLY_DF.replace("0ded", "0d6d")  # structured replies not negotiated
LIST_DISK = f"{REP} 00000003 00000002 00000011 00000004 {DISK} 74657374206469736b"
LIST_SECRET = f"{REP} 00000003 00000002 0000000a 00000006 {SECRET}"
LIST_ACK = f"{REP} 00000003 00000001 00000000"
LAN = "6c616e"  # 'lan': an export only 10.0.0.0/8 and uid 0 may use
GO_BOSS = f"{OPT} 00000007 0000000a 00000004 626f7373 0000"  # 'boss': only ALICE's certificate
GO_LAN = f"{OPT} 00000007 00000009 00000003 {LAN} 0000"
EXPORT_LAN = f"{OPT} 00000001 00000003 {LAN}"
LIST_LAN = f"{REP} 00000003 00000002 00000007 00000003 {LAN}"
INFO_NOPE = f"{OPT} 00000006 0000000a 00000004 6e6f7065 0000"
# every option but STARTTLS, ABORT and EXPORT_NAME: known, unknown, malformed
EVERY_OPTION = (
    f"{LIST} {OPT} 00000006 0000000a 00000004 {DISK} 0000 {GO_DISK} {SR} {EH} {SET_BASE} "
    f"{OPT} 00000009 0000000c 00000004 {DISK} 00000000 {OPT} 00000004 00000000 {OPT} 07654321 00000002 abcd "
    f"{OPT} 00000006 00000000"
)
EVERY_OPTION_CODES = ("03", "06", "07", "08", "0b", "0a", "09", "04", "07654321", "06")
ALICE, MALLORY = "CN=alice,O=nbdserve tests", "CN=mallory,O=nbdserve tests"


def every_option_answered(error: str) -> str:
    return " ".join(f"{REP} {code.rjust(8, '0')} {error} *" for code in EVERY_OPTION_CODES)


def scenario(name: str, exports: ExportTable) -> tuple[ExportTable, Negotiation]:
    """The exports, policy and client of a named scenario."""
    disk, ro = exports.get("disk"), exports.get("ro")
    secret = Export("secret", "", True, ro.image, tls_only=True)
    lan = Export("lan", "", True, ro.image, access=AccessRules.build("export 'lan'", ["10.0.0.0/8", "uid:0"]))
    local = Peer.from_address("127.0.0.1")
    table, policy, peer = ExportTable([disk, secret]), Policy(), local
    if name == "forced":
        policy = Policy(FORCEDTLS)
    elif name == "selective":
        policy = Policy(SELECTIVETLS)
    elif name == "forced-alice-only":
        policy = Policy(FORCEDTLS, AccessRules.build("[server]", identities=[ALICE]))
        table = ExportTable([disk])
    elif name in ("address-refused", "address-refused-forced"):
        policy = Policy(FORCEDTLS if name.endswith("forced") else SELECTIVETLS, AccessRules.build("[server]", ["::1"]))
        table = ExportTable([disk])
    elif name in ("export-rules", "export-rules-unknown", "export-rules-uid0", "export-rules-uid1000"):
        table, policy = ExportTable([disk, lan]), Policy(refuse_as_unknown=name == "export-rules-unknown")
        peer = Peer(uid=int(name[16:])) if "uid" in name else local
    elif name == "export-dn":
        boss = Export("boss", "", True, ro.image, access=AccessRules.build("export 'boss'", identities=[ALICE]))
        table, policy = ExportTable([disk, boss]), Policy(SELECTIVETLS)
    elif name == "limit":
        table = ExportTable([disk, Export("one", "", True, ro.image, max_connections=1, connections=1)])
    else:
        raise AssertionError(name)
    return table, Negotiation(table, policy, peer)


# Columns: id, scenario, client (| = TLS handshake), expected server bytes, final action,
# TLS identity shown after the handshake (DN text or "")
TLS_CASES = [
    # -- FORCEDTLS: before TLS, everything but STARTTLS and ABORT is ERR_TLS_REQD ------------------
    ("forced-every-option-tls-reqd", "forced", f"{FIXED} {EVERY_OPTION} {ABORT}",
     f"{every_option_answered('80000005')} {ABORT_ACK}", CLOSE, ""),
    ("forced-export-name-before-tls-closes", "forced", f"{FIXED} {EXPORT_DISK}", "", CLOSE, ""),
    ("forced-starttls-with-data-err-invalid", "forced", f"{FIXED} {OPT} 00000005 00000002 abcd",
     f"{REP} 00000005 80000003 *", CONTINUE, ""),
    ("forced-starttls-ack-then-list", "forced", f"{FIXED} {STARTTLS_OPT} | {LIST}",
     f"{STARTTLS_ACK} {LIST_DISK} {LIST_SECRET} {LIST_ACK}", CONTINUE, ""),
    ("forced-second-starttls-err-invalid", "forced", f"{FIXED} {STARTTLS_OPT} | {STARTTLS_OPT} {GO_DISK}",
     f"{STARTTLS_ACK} {REP} 00000005 80000003 * {GO_DISK_REPLY}", TRANSMIT, ""),
    ("forced-after-tls-export-name", "forced", f"{FIXED_NZ} {STARTTLS_OPT} | {EXPORT_DISK}",
     f"{STARTTLS_ACK} 0000000000100000 0d6d", TRANSMIT, ""),
    ("forced-after-tls-unknown-export-err-unknown", "forced", f"{FIXED} {STARTTLS_OPT} | {INFO_NOPE}",
     f"{STARTTLS_ACK} {REP} 00000006 80000006 *", CONTINUE, ""),
    # -- SELECTIVETLS: TLS-only exports hidden and refused with ERR_TLS_REQD before TLS --------------
    ("selective-list-hides-tls-only", "selective", f"{FIXED} {LIST}", f"{LIST_DISK} {LIST_ACK}", CONTINUE, ""),
    ("selective-list-after-tls-shows-all", "selective", f"{FIXED} {LIST} {STARTTLS_OPT} | {LIST}",
     f"{LIST_DISK} {LIST_ACK} {STARTTLS_ACK} {LIST_DISK} {LIST_SECRET} {LIST_ACK}", CONTINUE, ""),
    ("selective-go-tls-only-err-tls-reqd", "selective", f"{FIXED} {GO_SECRET}", f"{REP} 00000007 80000005 *",
     CONTINUE, ""),
    ("selective-info-unknown-err-tls-reqd", "selective", f"{FIXED} {INFO_NOPE}", f"{REP} 00000006 80000005 *",
     CONTINUE, ""),
    ("selective-export-name-tls-only-closes", "selective", f"{FIXED} {EXPORT_SECRET}", "", CLOSE, ""),
    ("selective-set-meta-tls-only-err-unknown", "selective", f"{FIXED} {SR} {SET_SECRET}",
     f"{SR_ACK} {REP} 0000000a 80000006 *", CONTINUE, ""),
    ("selective-plain-export-served-without-tls", "selective", f"{FIXED} {SR} {GO_DISK}",
     f"{SR_ACK} {GO_DISK_REPLY_DF}", TRANSMIT, ""),
    ("selective-go-tls-only-after-tls", "selective", f"{FIXED} {STARTTLS_OPT} | {GO_SECRET}",
     f"{STARTTLS_ACK} {GO_RO_REPLY}", TRANSMIT, ""),
    ("selective-state-forgotten-after-starttls", "selective", f"{FIXED} {SR} {SET_BASE} {STARTTLS_OPT} | {GO_DISK}",
     f"{SR_ACK} {META_SET_BASE} {SET_ACK} {STARTTLS_ACK} {GO_DISK_REPLY}", TRANSMIT, ""),
    ("selective-eh-forgotten-after-starttls", "selective", f"{FIXED} {EH} {STARTTLS_OPT} | {SR} {GO_DISK}",
     f"{EH_ACK} {STARTTLS_ACK} {SR_ACK} {GO_DISK_REPLY_DF}", TRANSMIT, ""),
    ("selective-second-starttls-err-invalid", "selective", f"{FIXED} {STARTTLS_OPT} | {STARTTLS_OPT}",
     f"{STARTTLS_ACK} {REP} 00000005 80000003 *", CONTINUE, ""),
    # -- server-wide rules --------------------------------------------------------------------
    ("address-refused-every-option-err-policy", "address-refused",
     f"{FIXED} {EVERY_OPTION} {STARTTLS_OPT} {ABORT}",
     f"{every_option_answered('80000002')} {REP} 00000005 80000002 * {ABORT_ACK}", CLOSE, ""),
    ("address-refused-before-tls-reqd", "address-refused-forced", f"{FIXED} {LIST} {STARTTLS_OPT}",
     f"{REP} 00000003 80000002 * {REP} 00000005 80000002 *", CONTINUE, ""),
    ("address-refused-export-name-closes", "address-refused", f"{FIXED} {EXPORT_DISK}", "", CLOSE, ""),
    ("identity-rule-tls-reqd-before-tls", "forced-alice-only", f"{FIXED} {LIST} {STARTTLS_OPT} | {LIST}",
     f"{REP} 00000003 80000005 * {STARTTLS_ACK} {LIST_DISK} {LIST_ACK}", CONTINUE, ALICE),
    ("identity-rule-other-dn-err-policy", "forced-alice-only", f"{FIXED} {STARTTLS_OPT} | {LIST} {GO_DISK}",
     f"{STARTTLS_ACK} {REP} 00000003 80000002 * {REP} 00000007 80000002 *", CONTINUE, MALLORY),
    ("identity-rule-no-certificate-err-policy", "forced-alice-only", f"{FIXED} {STARTTLS_OPT} | {EXPORT_DISK}",
     STARTTLS_ACK, CLOSE, ""),
    # -- an export's own rules ----------------------------------------------------------------
    ("export-rules-list-hides-refused", "export-rules", f"{FIXED} {LIST}", f"{LIST_DISK} {LIST_ACK}", CONTINUE, ""),
    ("export-rules-go-err-policy", "export-rules", f"{FIXED} {GO_LAN} {GO_DISK}",
     f"{REP} 00000007 80000002 * {GO_DISK_REPLY}", TRANSMIT, ""),
    ("export-rules-refused-looks-unknown", "export-rules-unknown", f"{FIXED} {GO_LAN}", f"{REP} 00000007 80000006 *",
     CONTINUE, ""),
    ("export-rules-set-meta-err-policy", "export-rules", f"{FIXED} {SR} {OPT} 0000000a 0000001e 00000003 {LAN} "
     f"00000001 0000000f {BASE_ALLOC}", f"{SR_ACK} {REP} 0000000a 80000002 *", CONTINUE, ""),
    ("export-rules-export-name-closes", "export-rules", f"{FIXED} {EXPORT_LAN}", "", CLOSE, ""),
    ("export-rules-uid-allowed", "export-rules-uid0", f"{FIXED} {LIST} {GO_LAN}",
     f"{LIST_DISK} {LIST_LAN} {LIST_ACK} {GO_RO_REPLY}", TRANSMIT, ""),
    ("export-rules-uid-refused", "export-rules-uid1000", f"{FIXED} {GO_LAN}", f"{REP} 00000007 80000002 *",
     CONTINUE, ""),
    ("export-dn-refused-before-tls", "export-dn", f"{FIXED} {GO_BOSS} {LIST}",
     f"{REP} 00000007 80000002 * {LIST_DISK} {LIST_ACK}", CONTINUE, ""),
    ("export-dn-served-to-alice", "export-dn", f"{FIXED} {STARTTLS_OPT} | {GO_BOSS}",
     f"{STARTTLS_ACK} {GO_RO_REPLY}", TRANSMIT, ALICE),
    ("export-dn-refused-to-mallory", "export-dn",
     f"{FIXED} {STARTTLS_OPT} | {GO_BOSS} {GO_DISK}",
     f"{STARTTLS_ACK} {REP} 00000007 80000002 * {GO_DISK_REPLY}", TRANSMIT, MALLORY),
    # -- connection limit ---------------------------------------------------------------------
    ("limit-go-err-policy-info-still-answered", "limit", f"{FIXED} {OPT} 00000007 00000009 00000003 6f6e65 0000 "
     f"{OPT} 00000006 00000009 00000003 6f6e65 0000", f"{REP} 00000007 80000002 * "
     + GO_RO_REPLY.replace(f"{REP} 00000007", f"{REP} 00000006"), CONTINUE, ""),
    ("limit-export-name-closes", "limit", f"{FIXED} {OPT} 00000001 00000003 6f6e65", "", CLOSE, ""),
]  # fmt: skip


@pytest.mark.parametrize("split", ["whole", "bytewise"])
@pytest.mark.parametrize(
    ("name", "client", "server", "action", "dn"), [pytest.param(*c[1:], id=c[0]) for c in TLS_CASES]
)
def test_tls_and_access(exports, name: str, client: str, server: str, action: str, dn: str, split: str) -> None:
    table, neg = scenario(name, exports)
    segments = [bytes.fromhex(seg) for seg in client.split("|")]
    out, last, neg, hs = negotiate(table, segments, split, neg, tls=(dn, parse_dn(dn) if dn else None))
    assert out.hex(" ") == expected_bytes(server, out).hex(" ")
    assert last is not None and last.action == action
    assert neg.tls == ("|" in client)
    if action == CONTINUE:
        assert hs.buffered == 0
    if action == CLOSE:
        assert last.reason


def test_err_tls_reqd_never_without_tls_configured(exports) -> None:
    """NOTLS: every option of every kind, none answered ERR_TLS_REQD."""
    out, *_ = negotiate(exports, bytes.fromhex(f"{FIXED} {EVERY_OPTION} {STARTTLS_OPT} {GO_SECRET}"), "whole")
    assert "80000005" not in out.hex()


def test_refusal_logged_once_per_rule(exports) -> None:
    _, neg = scenario("address-refused", exports)
    notes = []
    hs = ServerHandshake()
    hs.receive_data(bytes.fromhex(f"{FIXED} {LIST} {GO_DISK} {LIST}"))
    while (ev := hs.next_event()) is not None:
        notes.append(neg.answer(ev).refusal)
    assert notes[0] == ""  # client flags
    assert "127.0.0.1" in notes[1] and "[server] allow = ::1" in notes[1]
    assert notes[2:] == ["", ""]


def test_starttls_ack_only_when_the_session_can_upgrade(exports) -> None:
    """The outcome of an accepted STARTTLS asks the session to upgrade; the negotiation does not
    consider TLS up until ``tls_started``."""
    table, neg = scenario("forced", exports)
    _, last, neg, _ = negotiate(table, bytes.fromhex(f"{FIXED} {STARTTLS_OPT}"), "whole", neg)
    assert last.action == STARTTLS and last.data == bytes.fromhex(STARTTLS_ACK)
    assert not neg.tls
