"""The option policy: how nbdserve answers each handshake option.

Owns ``Negotiation``: the per-connection handshake state (structured replies, extended headers,
selected meta contexts and the export they belong to) and ``answer(event)``, which turns one
codec event into reply bytes and an outcome.  No I/O: ``server/session.py`` sends the bytes.

Policy decisions (NOTLS mode, as the spec defines it):
  * STARTTLS -> ERR_POLICY (TLS is not configured); never ERR_TLS_REQD.
  * INFO/GO always send INFO_EXPORT, INFO_BLOCK_SIZE (min 1, preferred 4096, max payload) and
    INFO_DESCRIPTION when the export has one; INFO_NAME when asked.
  * Meta contexts: ``base:allocation``, ``qemu:allocation-depth`` and ``qemu:dirty-bitmap:NAME``
    for each bitmap the export names (``-B``), with ids in that order from 1; ``base:``, ``qemu:``
    and ``qemu:dirty-bitmap:`` are wildcards in LIST and ignored in SET (as qemu-nbd does);
    unknown namespaces and leaves are ignored.  SET before structured replies -> ERR_INVALID.
    A SET replaces the selection even when it fails.  GO for another export than the one
    contexts were selected for drops them.
  * EXPORT_NAME of an unknown export, with a malformed name, or after extended headers, ends the
    connection (it cannot carry an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import constants as C
from ..protocol import handshake as H
from .exports import Export, ExportTable

CONTEXTS = (C.CONTEXT_BASE_ALLOCATION, C.CONTEXT_ALLOCATION_DEPTH)
CONTEXT_IDS = {name: i + 1 for i, name in enumerate(CONTEXTS)}
WILDCARDS = ("base:", "qemu:", C.CONTEXT_DIRTY_BITMAP)  # in LIST only

CONTINUE, TRANSMIT, CLOSE = "continue", "transmit", "close"


@dataclass
class Outcome:
    data: bytes = b""
    action: str = CONTINUE  # CONTINUE, TRANSMIT (export chosen) or CLOSE
    export: Export | None = None
    reason: str = ""  # for CLOSE: why (logged)


@dataclass
class Negotiation:
    exports: ExportTable
    no_zeroes: bool = False
    structured: bool = False
    extended: bool = False
    contexts: tuple[tuple[int, str], ...] = ()  # (id, name) selected by SET_META_CONTEXT
    contexts_export: str | None = None
    log: list[str] = field(default_factory=list)

    def answer(self, ev: H.Event) -> Outcome:
        if isinstance(ev, H.ClientFlags):
            self.no_zeroes = ev.no_zeroes
            return Outcome()
        if isinstance(ev, H.ExportNameOption):
            return self._export_name(ev)
        if isinstance(ev, H.InfoOption):
            return self._info(ev)
        if isinstance(ev, H.MetaContextOption):
            return self._meta(ev)
        if isinstance(ev, H.SimpleOption):
            return self._simple(ev)
        if isinstance(ev, H.InvalidOption):
            if ev.option == C.OPT_EXPORT_NAME:  # cannot carry an error reply
                return Outcome(action=CLOSE, reason=f"bad EXPORT_NAME: {ev.message}")
            if ev.option == C.OPT_SET_META_CONTEXT:  # a SET replaces the selection even when it fails
                self.contexts, self.contexts_export = (), None
            return Outcome(H.rep_error(ev.option, ev.error, ev.message))
        if isinstance(ev, H.UnknownOption):
            return Outcome(H.rep_error(ev.option, C.REP_ERR_UNSUP, f"option {ev.option} is not supported"))
        raise AssertionError(f"unexpected handshake event {ev!r}")

    # -- options ----------------------------------------------------------------------------

    def _export_name(self, ev: H.ExportNameOption) -> Outcome:
        if self.extended:
            return Outcome(action=CLOSE, reason="EXPORT_NAME after extended headers")
        export = self.exports.get(ev.name)
        if export is None or export.image is None:
            return Outcome(action=CLOSE, reason=f"EXPORT_NAME for unknown or unavailable export {ev.name!r}")
        if self.contexts_export != export.name:
            self.contexts = ()
        data = H.export_name_reply(export.size, self.transmission_flags(export), no_zeroes=self.no_zeroes)
        return Outcome(data, TRANSMIT, export)

    def _info(self, ev: H.InfoOption) -> Outcome:
        opt = ev.option
        export = self.exports.get(ev.name)
        if export is None:
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {ev.name!r} not found"))
        if export.image is None:
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {ev.name!r} is unavailable: {export.error}"))
        out = [H.rep_info_export(opt, export.size, self.transmission_flags(export))]
        if C.INFO_NAME in ev.requests:
            out.append(H.rep_info_name(opt, export.name))
        if export.description or C.INFO_DESCRIPTION in ev.requests:
            out.append(H.rep_info_description(opt, export.description))
        out.append(H.rep_info_block_size(opt, 1, 4096, C.DEFAULT_MAX_PAYLOAD))
        out.append(H.rep_ack(opt))
        data = b"".join(out)
        if not ev.go:
            return Outcome(data)
        if self.contexts_export != export.name:
            self.contexts = ()
        return Outcome(data, TRANSMIT, export)

    def _simple(self, ev: H.SimpleOption) -> Outcome:
        opt = ev.option
        if opt == C.OPT_ABORT:
            return Outcome(H.rep_ack(opt), CLOSE, reason="client sent ABORT")
        if ev.has_data:
            return Outcome(H.rep_error(opt, C.REP_ERR_INVALID, f"{C.OPT_NAMES[opt]} takes no data"))
        if opt == C.OPT_LIST:
            return Outcome(b"".join([*(H.rep_server(e.name, e.description) for e in self.exports), H.rep_ack(opt)]))
        if opt == C.OPT_STARTTLS:
            return Outcome(H.rep_error(opt, C.REP_ERR_POLICY, "TLS is not configured on this server"))
        if opt == C.OPT_STRUCTURED_REPLY:
            if self.extended:
                return Outcome(H.rep_error(opt, C.REP_ERR_EXT_HEADER_REQD, "extended headers are already on"))
            self.structured = True
            return Outcome(H.rep_ack(opt))
        if opt == C.OPT_EXTENDED_HEADERS:
            self.extended = True
            return Outcome(H.rep_ack(opt))
        raise AssertionError(f"unhandled option {opt}")

    def _meta(self, ev: H.MetaContextOption) -> Outcome:
        opt = ev.option
        if ev.set:
            self.contexts, self.contexts_export = (), None
            if not (self.structured or self.extended):
                return Outcome(H.rep_error(opt, C.REP_ERR_INVALID, "SET_META_CONTEXT needs structured replies first"))
        export = self.exports.get(ev.export)
        if export is None:
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {ev.export!r} not found"))
        offered = offered_contexts(export)
        names = select_contexts(ev.queries, listing=not ev.set, offered=offered)
        if ev.set:
            ids = {n: i + 1 for i, n in enumerate(offered)}
            self.contexts = tuple((ids[n], n) for n in names)
            self.contexts_export = export.name
            out = [H.rep_meta_context(opt, cid, n) for cid, n in self.contexts]
        else:
            out = [H.rep_meta_context(opt, 0, n) for n in names]
        out.append(H.rep_ack(opt))
        return Outcome(b"".join(out))

    # -- export flags -----------------------------------------------------------------------

    def transmission_flags(self, export: Export) -> int:
        flags = C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH | C.FLAG_SEND_FUA | C.FLAG_SEND_CACHE | C.FLAG_CAN_MULTI_CONN
        if export.readonly:
            flags |= C.FLAG_READ_ONLY
        else:
            flags |= C.FLAG_SEND_TRIM | C.FLAG_SEND_WRITE_ZEROES | C.FLAG_SEND_FAST_ZERO
        if self.structured or self.extended:
            flags |= C.FLAG_SEND_DF
        return flags


def offered_contexts(export: Export) -> tuple[str, ...]:
    """The contexts ``export`` offers, in id order (id = position + 1)."""
    return CONTEXTS + tuple(C.CONTEXT_DIRTY_BITMAP + name for name in export.bitmaps)


def select_contexts(queries: tuple[str, ...], *, listing: bool, offered: tuple[str, ...] = CONTEXTS) -> list[str]:
    """Context names of ``offered`` matched by ``queries`` (no queries: all when listing, none
    when setting)."""
    if not queries:
        return list(offered) if listing else []
    out: list[str] = []
    for q in queries:
        if q in offered:
            matched = [q]
        elif listing and q in WILDCARDS:
            matched = [c for c in offered if c.startswith(q)]
        else:
            matched = []
        for name in matched:
            if name not in out:
                out.append(name)
    return out
