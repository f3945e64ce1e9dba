"""The option policy: how nbdserve answers each handshake option.

Owns ``Policy`` (the server's TLS mode and server-wide access rules, fixed for the server's life)
and ``Negotiation``: the per-connection handshake state (TLS up or not, who the client is,
structured replies, extended headers, selected meta contexts and the export they belong to) and
``answer(event)``, which turns one codec event into reply bytes and an outcome.  No I/O:
``server/session.py`` sends the bytes, upgrades the transport on STARTTLS and logs refusals.

TLS, per the NBD spec's three modes (one mode per server, so per connection):
  * NOTLS: STARTTLS -> ERR_POLICY; ERR_TLS_REQD is never sent.
  * FORCEDTLS, before TLS: STARTTLS and ABORT -> ACK; EXPORT_NAME closes; every other option,
    unknown and malformed ones included -> ERR_TLS_REQD.  No export is named to the client.
  * SELECTIVETLS, before TLS: TLS-only exports (``tls = "required"``) are left out of LIST;
    INFO/GO for one of them -> ERR_TLS_REQD, and for an unknown export too when any TLS-only
    export exists (so the answers do not tell which names exist); EXPORT_NAME for one closes;
    meta-context options treat one as unknown.
  * STARTTLS with data, or once TLS is up -> ERR_INVALID.  After the ACK every negotiated state
    (structured replies, extended headers, meta contexts) is forgotten (``tls_started``), and
    ERR_TLS_REQD is never sent again.

Authorisation (rules from ``nbdserve.authz``), decided here for every option, before any export
is named to the client:
  * Server-wide rules refuse a client outright: every option but ABORT -> ERR_POLICY and
    EXPORT_NAME closes.  A client refused by its address or Unix credentials is thus handled as
    in NOTLS mode (the spec lets the mode depend on the session): its STARTTLS gets ERR_POLICY
    too, which spares a TLS handshake for a client that can never be served.  A rule on TLS
    identities cannot be met before TLS, so STARTTLS stays open to such a client (and FORCEDTLS
    answers ERR_TLS_REQD first).
  * An export's own rules hide it from LIST and answer INFO/GO/meta-context options on it with
    ERR_POLICY (or ERR_UNKNOWN when refused exports should look absent); EXPORT_NAME closes.
  * An export at its connection limit answers GO with ERR_POLICY; EXPORT_NAME closes.
  * Every refusal carries a log line (``Outcome.refusal``) naming the rule, once per rule and
    connection.

Other decisions:
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

from dataclasses import dataclass, field, replace

from ..authz import AccessRules, Peer, Refusal
from ..config import ServerConfig
from ..protocol import constants as C
from ..protocol import handshake as H
from .exports import Export, ExportTable

CONTEXTS = (C.CONTEXT_BASE_ALLOCATION, C.CONTEXT_ALLOCATION_DEPTH)
CONTEXT_IDS = {name: i + 1 for i, name in enumerate(CONTEXTS)}
WILDCARDS = ("base:", "qemu:", C.CONTEXT_DIRTY_BITMAP)  # in LIST only

CONTINUE, TRANSMIT, CLOSE, STARTTLS = "continue", "transmit", "close", "starttls"
NOTLS, SELECTIVETLS, FORCEDTLS = "NOTLS", "SELECTIVETLS", "FORCEDTLS"
TLS_MODES = {"off": NOTLS, "on": SELECTIVETLS, "require": FORCEDTLS}


@dataclass(frozen=True)
class Policy:
    tls: str = NOTLS
    access: AccessRules = field(default_factory=AccessRules)  # server-wide rules
    refuse_as_unknown: bool = False  # a refused export answers ERR_UNKNOWN instead of ERR_POLICY

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> Policy:
        return cls(
            TLS_MODES[cfg.tls_mode], AccessRules.build("[server]", cfg.allow, cfg.tls_authz), cfg.refuse_as == "unknown"
        )


@dataclass
class Outcome:
    data: bytes = b""
    action: str = CONTINUE  # CONTINUE, TRANSMIT (export chosen), STARTTLS (upgrade, then go on) or CLOSE
    export: Export | None = None
    reason: str = ""  # for CLOSE: why (logged)
    refusal: str = ""  # an access rule refused the client: the log line (once per rule and connection)


def _option_of(ev: H.Event) -> int:
    if isinstance(ev, H.ExportNameOption):
        return C.OPT_EXPORT_NAME
    return ev.option  # type: ignore[union-attr]


@dataclass
class Negotiation:
    exports: ExportTable
    policy: Policy = field(default_factory=Policy)
    peer: Peer = field(default_factory=Peer)
    tls: bool = False  # TLS is up
    no_zeroes: bool = False
    structured: bool = False
    extended: bool = False
    contexts: tuple[tuple[int, str], ...] = ()  # (id, name) selected by SET_META_CONTEXT
    contexts_export: str | None = None
    _reported: set[str] = field(default_factory=set)

    def answer(self, ev: H.Event) -> Outcome:
        if isinstance(ev, H.ClientFlags):
            self.no_zeroes = ev.no_zeroes
            return Outcome()
        opt = _option_of(ev)
        if opt == C.OPT_ABORT:
            return Outcome(H.rep_ack(opt), CLOSE, reason="client sent ABORT")
        gate = self._gate(ev, opt)
        if gate is not None:
            return gate
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

    def tls_started(self, identity: str = "", dn: tuple[tuple[str, str], ...] | None = None) -> None:
        """TLS is up (after the STARTTLS ACK): remember who the client proved to be, forget the rest."""
        self.tls = True
        self.peer = replace(self.peer, tls_identity=identity, tls_dn=dn)
        self.structured = self.extended = False
        self.contexts, self.contexts_export = (), None

    # -- TLS and server-wide rules -------------------------------------------------------------

    def _gate(self, ev: H.Event, opt: int) -> Outcome | None:
        """The answer when TLS or the server-wide rules decide this option, else None."""
        refused = self.policy.access.check(self.peer, tls=self.tls)
        if refused is not None and not refused.needs_tls:
            return self._refuse_all(opt, refused)
        if opt == C.OPT_STARTTLS:
            assert isinstance(ev, H.SimpleOption)
            if ev.has_data:
                return Outcome(H.rep_error(opt, C.REP_ERR_INVALID, "STARTTLS takes no data"))
            if self.policy.tls == NOTLS:
                return Outcome(H.rep_error(opt, C.REP_ERR_POLICY, "TLS is not configured on this server"))
            if self.tls:
                return Outcome(H.rep_error(opt, C.REP_ERR_INVALID, "TLS is already on"))
            return Outcome(H.rep_ack(opt), STARTTLS)
        if self.policy.tls == FORCEDTLS and not self.tls:
            if opt == C.OPT_EXPORT_NAME:
                return Outcome(action=CLOSE, reason="EXPORT_NAME before STARTTLS, but TLS is required")
            return Outcome(H.rep_error(opt, C.REP_ERR_TLS_REQD, "TLS is required: send STARTTLS first"))
        if refused is not None:
            return self._refuse_all(opt, refused)
        return None

    def _note(self, refusal: Refusal, what: str) -> str:
        """The log line for a refusal, or "" when this rule was already reported."""
        if refusal.rule in self._reported:
            return ""
        self._reported.add(refusal.rule)
        return f"refused {what}: {self.peer.describe()} does not pass {refusal.rule}"

    def _refuse_all(self, opt: int, refused: Refusal) -> Outcome:
        note = self._note(refused, "every export")
        if opt == C.OPT_EXPORT_NAME:
            return Outcome(action=CLOSE, reason="client refused by the server's access rules", refusal=note)
        return Outcome(H.rep_error(opt, C.REP_ERR_POLICY, "access denied by the server's policy"), refusal=note)

    # -- per-export rules ------------------------------------------------------------------------

    def _hidden(self, export: Export) -> bool:
        """A TLS-only export while TLS is not up (SELECTIVETLS): it does not exist yet."""
        return export.tls_only and not self.tls

    def _refusal(self, export: Export) -> Refusal | None:
        return export.access.check(self.peer, tls=self.tls)

    def _refuse(self, opt: int, export: Export, refused: Refusal) -> Outcome:
        note = self._note(refused, f"export {export.name!r}")
        if self.policy.refuse_as_unknown:
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {export.name!r} not found"), refusal=note)
        return Outcome(H.rep_error(opt, C.REP_ERR_POLICY, f"access to export {export.name!r} denied"), refusal=note)

    def _at_limit(self, export: Export) -> str:
        limit = export.max_connections
        if limit and export.connections >= limit:
            return f"refused export {export.name!r}: it has {export.connections} connections (limit {limit})"
        return ""

    # -- options ----------------------------------------------------------------------------

    def _export_name(self, ev: H.ExportNameOption) -> Outcome:
        if self.extended:
            return Outcome(action=CLOSE, reason="EXPORT_NAME after extended headers")
        export = self.exports.get(ev.name)
        if export is None or export.image is None or self._hidden(export):
            return Outcome(action=CLOSE, reason=f"EXPORT_NAME for unknown or unavailable export {ev.name!r}")
        refused = self._refusal(export)
        if refused is not None:
            note = self._note(refused, f"export {export.name!r}")
            return Outcome(action=CLOSE, reason=f"EXPORT_NAME for refused export {ev.name!r}", refusal=note)
        full = self._at_limit(export)
        if full:
            return Outcome(action=CLOSE, reason=full, refusal=full)
        if self.contexts_export != export.name:
            self.contexts = ()
        data = H.export_name_reply(export.size, self.transmission_flags(export), no_zeroes=self.no_zeroes)
        return Outcome(data, TRANSMIT, export)

    def _info(self, ev: H.InfoOption) -> Outcome:
        opt = ev.option
        export = self.exports.get(ev.name)
        if self.policy.tls == SELECTIVETLS and not self.tls:
            hide_unknown = export is None and any(e.tls_only for e in self.exports)
            if hide_unknown or (export is not None and export.tls_only):
                msg = f"export {ev.name!r} needs TLS (or does not exist)"
                return Outcome(H.rep_error(opt, C.REP_ERR_TLS_REQD, msg))
        if export is None:
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {ev.name!r} not found"))
        refused = self._refusal(export)
        if refused is not None:
            return self._refuse(opt, export, refused)
        if export.image is None:
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {ev.name!r} is unavailable: {export.error}"))
        full = self._at_limit(export) if ev.go else ""
        if full:
            return Outcome(H.rep_error(opt, C.REP_ERR_POLICY, full.removeprefix("refused ")), refusal=full)
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
        if ev.has_data:
            return Outcome(H.rep_error(opt, C.REP_ERR_INVALID, f"{C.OPT_NAMES[opt]} takes no data"))
        if opt == C.OPT_LIST:
            shown = [e for e in self.exports if not self._hidden(e) and self._refusal(e) is None]
            return Outcome(b"".join([*(H.rep_server(e.name, e.description) for e in shown), H.rep_ack(opt)]))
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
        if export is None or self._hidden(export):
            return Outcome(H.rep_error(opt, C.REP_ERR_UNKNOWN, f"export {ev.export!r} not found"))
        refused = self._refusal(export)
        if refused is not None:
            return self._refuse(opt, export, refused)
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
