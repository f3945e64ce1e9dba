"""Byte tables for the handshake codec (``nbdserve.protocol.handshake``).

Every table entry is written out by hand from the NBD spec (``doc/proto.md``, plus the
``extension-ext-header`` branch for OPT_EXTENDED_HEADERS), never produced by the code under test.
Decode tables (client bytes -> events) run whole and one byte at a time; encode tables (reply
encoders -> server bytes) compare against the hand-written bytes.
"""

from __future__ import annotations

import pytest

from nbdserve.protocol import constants as C
from nbdserve.protocol.handshake import (
    ClientFlags,
    ExportNameOption,
    InfoOption,
    InvalidOption,
    MetaContextOption,
    ProtocolError,
    ServerHandshake,
    SimpleOption,
    UnknownOption,
    export_name_reply,
    option_reply,
    rep_ack,
    rep_error,
    rep_info_block_size,
    rep_info_description,
    rep_info_export,
    rep_info_name,
    rep_meta_context,
    rep_server,
)

# -- hand-written wire pieces ---------------------------------------------------------------
OPT = "49484156454f5054"  # 'IHAVEOPT', the option request magic
REP = "0003e889045565a9"  # option reply magic
FIXED = "00000001"  # client flags: C_FIXED_NEWSTYLE
FIXED_NZ = "00000003"  # client flags: C_FIXED_NEWSTYLE | C_NO_ZEROES
DISK = "6469736b"  # 'disk'
BASE_ALLOC = "626173653a616c6c6f636174696f6e"  # 'base:allocation' (15 bytes)
QEMU_DEPTH = "71656d753a616c6c6f636174696f6e2d6465707468"  # 'qemu:allocation-depth' (21 bytes)
BASE = "626173653a"  # 'base:'

F1 = ClientFlags(1, True, False)


def h(s: str) -> bytes:
    return bytes.fromhex(s)


def inv(option: int, error: int) -> tuple:
    """Expected InvalidOption (its message is free text, so only option and error are compared)."""
    return ("invalid", option, error)


def _norm(ev):
    if isinstance(ev, InvalidOption):
        assert ev.message, "InvalidOption needs a message for the error reply"
        return inv(ev.option, ev.error)
    return ev


def chunks(data: bytes, split: str):
    if split == "whole":
        yield data
    else:
        for i in range(len(data)):
            yield data[i : i + 1]


def decode(data: bytes, split: str, out: list, **kw) -> ServerHandshake:
    """Feed ``data`` to a fresh ServerHandshake, appending each event to ``out`` as it appears."""
    hs = ServerHandshake(**kw)
    for chunk in chunks(data, split):
        hs.receive_data(chunk)
        while (ev := hs.next_event()) is not None:
            out.append(_norm(ev))
    return hs


SPLITS = ["whole", "bytewise"]

# -- decode: client bytes -> events ---------------------------------------------------------

DECODE = [
    # client flags
    ("flags-none", "00000000", [ClientFlags(0, False, False)]),
    ("flags-fixed", "00000001", [F1]),
    ("flags-no-zeroes-only", "00000002", [ClientFlags(2, False, True)]),
    ("flags-fixed-no-zeroes", "00000003", [ClientFlags(3, True, True)]),
    # EXPORT_NAME: the whole option data is the name
    ("export-name", f"{FIXED} {OPT} 00000001 00000004 {DISK}", [F1, ExportNameOption("disk")]),
    ("export-name-default", f"{FIXED} {OPT} 00000001 00000000", [F1, ExportNameOption("")]),
    ("export-name-utf8", f"{FIXED} {OPT} 00000001 00000002 c3a9", [F1, ExportNameOption("\u00e9")]),
    ("export-name-non-fixed-client", f"00000000 {OPT} 00000001 00000004 {DISK}",
     [ClientFlags(0, False, False), ExportNameOption("disk")]),
    ("export-name-4096-bytes", f"{FIXED} {OPT} 00000001 00001000 " + "61" * 4096, [F1, ExportNameOption("a" * 4096)]),
    ("export-name-4097-bytes-too-big", f"{FIXED} {OPT} 00000001 00001001 " + "61" * 4097,
     [F1, inv(C.OPT_EXPORT_NAME, C.REP_ERR_TOO_BIG)]),
    ("export-name-bad-utf8", f"{FIXED} {OPT} 00000001 00000001 ff", [F1, inv(C.OPT_EXPORT_NAME, C.REP_ERR_INVALID)]),
    ("export-name-nul", f"{FIXED} {OPT} 00000001 00000003 610062", [F1, inv(C.OPT_EXPORT_NAME, C.REP_ERR_INVALID)]),
    # options with no data
    ("abort", f"{FIXED} {OPT} 00000002 00000000", [F1, SimpleOption(C.OPT_ABORT, False)]),
    ("abort-with-data", f"{FIXED} {OPT} 00000002 00000002 abcd", [F1, SimpleOption(C.OPT_ABORT, True)]),
    ("list", f"{FIXED} {OPT} 00000003 00000000", [F1, SimpleOption(C.OPT_LIST, False)]),
    ("list-with-data", f"{FIXED} {OPT} 00000003 00000001 00", [F1, SimpleOption(C.OPT_LIST, True)]),
    ("starttls", f"{FIXED} {OPT} 00000005 00000000", [F1, SimpleOption(C.OPT_STARTTLS, False)]),
    ("structured-reply", f"{FIXED} {OPT} 00000008 00000000", [F1, SimpleOption(C.OPT_STRUCTURED_REPLY, False)]),
    ("extended-headers", f"{FIXED} {OPT} 0000000b 00000000", [F1, SimpleOption(C.OPT_EXTENDED_HEADERS, False)]),
    ("extended-headers-with-data", f"{FIXED} {OPT} 0000000b 00000003 010203",
     [F1, SimpleOption(C.OPT_EXTENDED_HEADERS, True)]),
    # INFO / GO: u32 namelen, name, u16 n, n x u16 info requests
    ("info-no-requests", f"{FIXED} {OPT} 00000006 0000000a 00000004 {DISK} 0000", [F1, InfoOption(False, "disk", ())]),
    ("go-all-requests", f"{FIXED} {OPT} 00000007 00000012 00000004 {DISK} 0004 0000 0001 0002 0003",
     [F1, InfoOption(True, "disk", (0, 1, 2, 3))]),
    ("go-default-export-block-size", f"{FIXED} {OPT} 00000007 00000008 00000000 0001 0003",
     [F1, InfoOption(True, "", (C.INFO_BLOCK_SIZE,))]),
    ("go-unknown-info-request-kept", f"{FIXED} {OPT} 00000007 0000000c 00000004 {DISK} 0001 1234",
     [F1, InfoOption(True, "disk", (0x1234,))]),
    ("info-namelen-past-data", f"{FIXED} {OPT} 00000006 0000000a 00000005 {DISK} 0000",
     [F1, inv(C.OPT_INFO, C.REP_ERR_INVALID)]),
    ("info-namelen-huge", f"{FIXED} {OPT} 00000006 0000000a ffffffff {DISK} 0000",
     [F1, inv(C.OPT_INFO, C.REP_ERR_INVALID)]),
    ("info-namelen-leaves-no-room-for-count", f"{FIXED} {OPT} 00000006 00000009 00000005 {DISK} 61",
     [F1, inv(C.OPT_INFO, C.REP_ERR_INVALID)]),
    ("info-shorter-than-6", f"{FIXED} {OPT} 00000006 00000003 000000", [F1, inv(C.OPT_INFO, C.REP_ERR_INVALID)]),
    ("info-empty", f"{FIXED} {OPT} 00000006 00000000", [F1, inv(C.OPT_INFO, C.REP_ERR_INVALID)]),
    ("go-count-exceeds-requests", f"{FIXED} {OPT} 00000007 0000000c 00000004 {DISK} 0002 0000",
     [F1, inv(C.OPT_GO, C.REP_ERR_INVALID)]),
    ("go-trailing-byte", f"{FIXED} {OPT} 00000007 0000000b 00000004 {DISK} 0000 00",
     [F1, inv(C.OPT_GO, C.REP_ERR_INVALID)]),
    ("go-name-bad-utf8", f"{FIXED} {OPT} 00000007 00000007 00000001 fe 0000", [F1, inv(C.OPT_GO, C.REP_ERR_INVALID)]),
    ("go-name-4097-bytes-too-big", f"{FIXED} {OPT} 00000007 00001007 00001001 " + "61" * 4097 + " 0000",
     [F1, inv(C.OPT_GO, C.REP_ERR_TOO_BIG)]),
    # LIST / SET_META_CONTEXT: u32 namelen, name, u32 nq, nq x (u32 len, query)
    ("list-meta-base-allocation", f"{FIXED} {OPT} 00000009 0000001f 00000004 {DISK} 00000001 0000000f {BASE_ALLOC}",
     [F1, MetaContextOption(False, "disk", ("base:allocation",))]),
    ("list-meta-no-queries", f"{FIXED} {OPT} 00000009 00000008 00000000 00000000",
     [F1, MetaContextOption(False, "", ())]),
    ("set-meta-two-queries", f"{FIXED} {OPT} 0000000a 0000002a 00000000 00000002 00000005 {BASE} 00000015 {QEMU_DEPTH}",
     [F1, MetaContextOption(True, "", ("base:", "qemu:allocation-depth"))]),
    ("set-meta-empty-query", f"{FIXED} {OPT} 0000000a 0000000c 00000000 00000001 00000000",
     [F1, MetaContextOption(True, "", ("",))]),
    ("meta-shorter-than-8", f"{FIXED} {OPT} 00000009 00000004 00000000",
     [F1, inv(C.OPT_LIST_META_CONTEXT, C.REP_ERR_INVALID)]),
    ("meta-namelen-past-data", f"{FIXED} {OPT} 0000000a 00000008 00000009 00000000",
     [F1, inv(C.OPT_SET_META_CONTEXT, C.REP_ERR_INVALID)]),
    ("meta-namelen-leaves-no-room-for-count", f"{FIXED} {OPT} 00000009 0000000a 00000004 {DISK} 0000",
     [F1, inv(C.OPT_LIST_META_CONTEXT, C.REP_ERR_INVALID)]),
    ("meta-count-exceeds-data", f"{FIXED} {OPT} 00000009 0000000c 00000000 00000002 00000000",
     [F1, inv(C.OPT_LIST_META_CONTEXT, C.REP_ERR_INVALID)]),
    ("meta-query-past-option-end", f"{FIXED} {OPT} 0000000a 0000000e 00000000 00000001 00000005 6261",
     [F1, inv(C.OPT_SET_META_CONTEXT, C.REP_ERR_INVALID)]),
    ("meta-trailing-bytes", f"{FIXED} {OPT} 00000009 00000009 00000000 00000000 00",
     [F1, inv(C.OPT_LIST_META_CONTEXT, C.REP_ERR_INVALID)]),
    ("meta-query-4097-bytes-too-big", f"{FIXED} {OPT} 00000009 0000100d 00000000 00000001 00001001 " + "61" * 4097,
     [F1, inv(C.OPT_LIST_META_CONTEXT, C.REP_ERR_TOO_BIG)]),
    # unknown options: reported with their length, data drained, the next option still parses
    ("unknown-option-data-drained", f"{FIXED} {OPT} 07654321 00000005 0102030405 {OPT} 00000002 00000000",
     [F1, UnknownOption(0x7654321, 5), SimpleOption(C.OPT_ABORT, False)]),
    ("unknown-option-data-looks-like-option",
     f"{FIXED} {OPT} ffffffff 00000010 {OPT} 00000003 00000000 {OPT} 00000008 00000000",
     [F1, UnknownOption(0xFFFFFFFF, 16), SimpleOption(C.OPT_STRUCTURED_REPLY, False)]),
    ("peek-export-is-unknown", f"{FIXED} {OPT} 00000004 00000000", [F1, UnknownOption(C.OPT_PEEK_EXPORT, 0)]),
    ("option-zero-is-unknown", f"{FIXED} {OPT} 00000000 00000001 ff", [F1, UnknownOption(0, 1)]),
    # a typical modern client: SR, SET base:allocation, GO
    ("sr-set-go",
     f"{FIXED} {OPT} 00000008 00000000 "
     f"{OPT} 0000000a 0000001f 00000004 {DISK} 00000001 0000000f {BASE_ALLOC} "
     f"{OPT} 00000007 0000000c 00000004 {DISK} 0001 0003",
     [F1, SimpleOption(C.OPT_STRUCTURED_REPLY, False), MetaContextOption(True, "disk", ("base:allocation",)),
      InfoOption(True, "disk", (C.INFO_BLOCK_SIZE,))]),
]  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("client", "events"), [pytest.param(c, e, id=i) for i, c, e in DECODE])
def test_decode(client: str, events: list, split: str) -> None:
    out: list = []
    hs = decode(h(client), split, out)
    assert out == events
    assert hs.buffered == 0


def test_event_option_codes() -> None:
    assert InfoOption(False, "", ()).option == C.OPT_INFO
    assert InfoOption(True, "", ()).option == C.OPT_GO
    assert MetaContextOption(False, "", ()).option == C.OPT_LIST_META_CONTEXT
    assert MetaContextOption(True, "", ()).option == C.OPT_SET_META_CONTEXT


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000, 4099])
def test_unknown_option_data_is_drained_not_buffered(chunk: int) -> None:
    # 100000 bytes of data made of fake option headers: a parser that lost sync would see LISTs.
    fake = h(f"{OPT} 00000003 00000000") * 6250
    data = h(f"{FIXED} {OPT} 12345678 000186a0") + fake + h(f"{OPT} 00000002 00000000")
    hs = ServerHandshake(max_option_length=1024)
    out = []
    for i in range(0, len(data), chunk):
        hs.receive_data(data[i : i + chunk])
        assert hs.buffered <= chunk + 16
        while (ev := hs.next_event()) is not None:
            out.append(ev)
    assert out == [F1, UnknownOption(0x12345678, 100000), SimpleOption(C.OPT_ABORT, False)]
    assert hs.options_seen == 2


def test_unknown_option_reported_before_its_data_arrives() -> None:
    hs = ServerHandshake()
    hs.receive_data(h(f"{FIXED} {OPT} 00000063 00000004"))
    assert hs.next_event() == F1
    assert hs.next_event() == UnknownOption(0x63, 4)
    hs.receive_data(h("01020304"))
    assert hs.next_event() is None
    hs.receive_data(h(f"{OPT} 00000003 00000000"))
    assert hs.next_event() == SimpleOption(C.OPT_LIST, False)


@pytest.mark.parametrize("split", SPLITS)
def test_bytes_after_go_are_kept_for_transmission(split: str) -> None:
    go = f"{FIXED} {OPT} 00000007 0000000a 00000004 {DISK} 0000"
    request = "25609513 0000 0000 0000000000000001 0000000000000000 00000200"
    out: list = []
    hs = ServerHandshake()
    for c in chunks(h(f"{go} {request}"), split):
        hs.receive_data(c)
        while not out or not isinstance(out[-1], InfoOption):
            ev = hs.next_event()
            if ev is None:
                break
            out.append(ev)
    assert out == [F1, InfoOption(True, "disk", ())]
    assert hs.take_buffered() == h(request)
    assert hs.buffered == 0


# -- STARTTLS: the codec keeps parsing after the upgrade; early bytes break the protocol ------

STARTTLS = f"{OPT} 00000005 00000000"


@pytest.mark.parametrize("split", SPLITS)
def test_starttls_then_options_over_tls(split: str) -> None:
    """Before the ACK the client sends nothing more; afterwards (decrypted) options parse as usual."""
    out: list = []
    hs = decode(h(f"{FIXED} {STARTTLS}"), split, out)
    assert out == [F1, SimpleOption(C.OPT_STARTTLS, False)]
    hs.starttls()
    assert hs.tls
    for c in chunks(h(f"{OPT} 00000008 00000000 {OPT} 00000003 00000000"), split):
        hs.receive_data(c)
        while (ev := hs.next_event()) is not None:
            out.append(ev)
    assert out[2:] == [SimpleOption(C.OPT_STRUCTURED_REPLY, False), SimpleOption(C.OPT_LIST, False)]


@pytest.mark.parametrize(
    "early",
    [
        pytest.param("16 0301 0200", id="client-hello-before-the-ack"),
        pytest.param(f"{OPT} 00000003 00000000", id="plaintext-option-before-the-ack"),
        pytest.param("00", id="one-byte"),
    ],
)
def test_bytes_behind_starttls_are_a_protocol_error(early: str) -> None:
    hs = ServerHandshake()
    hs.receive_data(h(f"{FIXED} {STARTTLS} {early}"))
    assert hs.next_event() == F1
    assert hs.next_event() == SimpleOption(C.OPT_STARTTLS, False)
    with pytest.raises(ProtocolError, match="after STARTTLS"):
        hs.starttls()
    assert not hs.tls


def test_starttls_counts_against_the_option_limit() -> None:
    out: list = []
    with pytest.raises(ProtocolError):
        decode(h(f"{FIXED} {STARTTLS} {STARTTLS} {STARTTLS}"), "whole", out, max_options=2)
    assert out == [F1, SimpleOption(C.OPT_STARTTLS, False), SimpleOption(C.OPT_STARTTLS, False)]


# -- protocol errors: the connection must be dropped ----------------------------------------

PROTOCOL_ERRORS = [
    ("client-flag-bit2-unknown", "00000004", {}, []),
    ("client-flag-bit31-unknown", "80000001", {}, []),
    ("bad-option-magic", f"{FIXED} 49484156454f5055 00000003 00000000", {}, [F1]),
    ("bad-option-magic-after-option", f"{FIXED} {OPT} 00000003 00000000 0000000000000000 00000003 00000000", {},
     [F1, SimpleOption(C.OPT_LIST, False)]),
    # the cap is enforced from the header alone, before any data is buffered
    ("go-over-default-64k-cap", f"{FIXED} {OPT} 00000007 00010001", {}, [F1]),
    ("export-name-over-cap", f"{FIXED} {OPT} 00000001 00000041", {"max_option_length": 64}, [F1]),
    ("meta-over-cap", f"{FIXED} {OPT} 0000000a ffffffff", {}, [F1]),
    ("too-many-options", f"{FIXED}" + f" {OPT} 00000003 00000000" * 4, {"max_options": 3},
     [F1, *[SimpleOption(C.OPT_LIST, False)] * 3]),
    ("too-many-unknown-options", f"{FIXED}" + f" {OPT} 00000063 00000001 00" * 3, {"max_options": 2},
     [F1, UnknownOption(0x63, 1), UnknownOption(0x63, 1)]),
    ("non-fixed-client-sends-list", f"00000000 {OPT} 00000003 00000000", {}, [ClientFlags(0, False, False)]),
    ("non-fixed-client-sends-go", f"00000002 {OPT} 00000007 0000000a 00000004 {DISK} 0000", {},
     [ClientFlags(2, False, True)]),
    ("non-fixed-client-sends-unknown", f"00000000 {OPT} 07654321 00000000", {}, [ClientFlags(0, False, False)]),
]  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("client", "kw", "before"), [pytest.param(c, k, b, id=i) for i, c, k, b in PROTOCOL_ERRORS])
def test_protocol_error(client: str, kw: dict, before: list, split: str) -> None:
    out: list = []
    with pytest.raises(ProtocolError):
        decode(h(client), split, out, **kw)
    assert out == before


# -- encode: replies -> server bytes ---------------------------------------------------------

ENCODE = [
    ("greeting", ServerHandshake.greeting, "4e42444d41474943 49484156454f5054 0003"),
    ("ack-abort", lambda: rep_ack(C.OPT_ABORT), f"{REP} 00000002 00000001 00000000"),
    ("ack-structured-reply", lambda: rep_ack(C.OPT_STRUCTURED_REPLY), f"{REP} 00000008 00000001 00000000"),
    ("ack-extended-headers", lambda: rep_ack(C.OPT_EXTENDED_HEADERS), f"{REP} 0000000b 00000001 00000000"),
    ("server-with-description", lambda: rep_server("disk", "my disk"),
     f"{REP} 00000003 00000002 0000000f 00000004 {DISK} 6d79206469736b"),
    ("server-default-export", lambda: rep_server(""), f"{REP} 00000003 00000002 00000004 00000000"),
    ("info-export", lambda: rep_info_export(C.OPT_GO, 0x100000, 0x0D6D),
     f"{REP} 00000007 00000003 0000000c 0000 0000000000100000 0d6d"),
    ("info-export-huge-size", lambda: rep_info_export(C.OPT_INFO, (1 << 63) + 0x200, 0x0001),
     f"{REP} 00000006 00000003 0000000c 0000 8000000000000200 0001"),
    ("info-name", lambda: rep_info_name(C.OPT_INFO, "disk"), f"{REP} 00000006 00000003 00000006 0001 {DISK}"),
    ("info-description", lambda: rep_info_description(C.OPT_GO, "d\u00e9"),
     f"{REP} 00000007 00000003 00000005 0002 64c3a9"),
    ("info-block-size", lambda: rep_info_block_size(C.OPT_GO, 1, 4096, 32 << 20),
     f"{REP} 00000007 00000003 0000000e 0003 00000001 00001000 02000000"),
    ("meta-context-set", lambda: rep_meta_context(C.OPT_SET_META_CONTEXT, 1, "base:allocation"),
     f"{REP} 0000000a 00000004 00000013 00000001 {BASE_ALLOC}"),
    ("meta-context-list", lambda: rep_meta_context(C.OPT_LIST_META_CONTEXT, 0, "qemu:allocation-depth"),
     f"{REP} 00000009 00000004 00000019 00000000 {QEMU_DEPTH}"),
    ("err-unsup-with-message", lambda: rep_error(0x7654321, C.REP_ERR_UNSUP, "no"),
     f"{REP} 07654321 80000001 00000002 6e6f"),
    ("err-policy", lambda: rep_error(C.OPT_STARTTLS, C.REP_ERR_POLICY), f"{REP} 00000005 80000002 00000000"),
    ("err-invalid", lambda: rep_error(C.OPT_LIST, C.REP_ERR_INVALID), f"{REP} 00000003 80000003 00000000"),
    ("err-platform", lambda: rep_error(C.OPT_GO, C.REP_ERR_PLATFORM), f"{REP} 00000007 80000004 00000000"),
    ("err-tls-reqd", lambda: rep_error(C.OPT_GO, C.REP_ERR_TLS_REQD), f"{REP} 00000007 80000005 00000000"),
    ("ack-starttls", lambda: rep_ack(C.OPT_STARTTLS), f"{REP} 00000005 00000001 00000000"),
    ("err-invalid-second-starttls", lambda: rep_error(C.OPT_STARTTLS, C.REP_ERR_INVALID),
     f"{REP} 00000005 80000003 00000000"),
    ("err-unknown", lambda: rep_error(C.OPT_INFO, C.REP_ERR_UNKNOWN), f"{REP} 00000006 80000006 00000000"),
    ("err-shutdown", lambda: rep_error(C.OPT_GO, C.REP_ERR_SHUTDOWN), f"{REP} 00000007 80000007 00000000"),
    ("err-block-size-reqd", lambda: rep_error(C.OPT_GO, C.REP_ERR_BLOCK_SIZE_REQD),
     f"{REP} 00000007 80000008 00000000"),
    ("err-too-big", lambda: rep_error(C.OPT_SET_META_CONTEXT, C.REP_ERR_TOO_BIG), f"{REP} 0000000a 80000009 00000000"),
    ("err-ext-header-reqd", lambda: rep_error(C.OPT_STRUCTURED_REPLY, C.REP_ERR_EXT_HEADER_REQD),
     f"{REP} 00000008 8000000a 00000000"),
    ("raw-option-reply", lambda: option_reply(C.OPT_LIST, C.REP_ACK, b"\x01"), f"{REP} 00000003 00000001 00000001 01"),
    ("export-name-reply-with-zeroes", lambda: export_name_reply(0x100000, 0x0D6D, no_zeroes=False),
     "0000000000100000 0d6d" + " 00" * 124),
    ("export-name-reply-no-zeroes", lambda: export_name_reply(0x100000, 0x0D6D, no_zeroes=True),
     "0000000000100000 0d6d"),
]  # fmt: skip


@pytest.mark.parametrize(("encode", "expected"), [pytest.param(f, x, id=i) for i, f, x in ENCODE])
def test_encode(encode, expected: str) -> None:
    assert encode().hex(" ") == h(expected).hex(" ")


def test_error_message_capped_at_max_string() -> None:
    out = rep_error(C.OPT_GO, C.REP_ERR_UNKNOWN, "x" * 5000)
    assert out[:20] == h(f"{REP} 00000007 80000006 00001000")
    assert len(out) == 20 + 4096


def test_rep_error_refuses_non_error_type() -> None:
    with pytest.raises(AssertionError):
        rep_error(C.OPT_GO, C.REP_ACK)


def test_error_message_cut_on_a_character_boundary() -> None:
    out = rep_error(C.OPT_GO, C.REP_ERR_UNKNOWN, "a" + "\u00e9" * 3000)  # 6001 bytes; byte 4096 splits an 'é'
    assert out[:20] == h(f"{REP} 00000007 80000006 00000fff")
    assert out[20:].decode("utf-8") == "a" + "\u00e9" * 2047
