"""Who a client is, and which allow-list rules it passes.  Pure logic: no sockets, no files.

Owns:
  * ``Peer``: what the server knows about one client.  A TCP client has an IP address; a Unix
    socket client has the uid and gid the kernel reports for it (``SO_PEERCRED``).  After TLS
    with a verified client certificate it also has the certificate's distinguished name; after
    TLS-PSK, the PSK username.
  * Allow-list entries (``parse_allow``): an IPv4 or IPv6 address, a CIDR network
    (``10.0.0.0/8``, ``fd00::/8``), ``uid:N`` / ``uid:NAME`` or ``gid:N`` / ``gid:NAME``.
  * ``AccessRules``: one allow list plus one list of TLS identities (distinguished names or PSK
    usernames), and ``check(peer)``: None when the peer passes, else a ``Refusal`` naming the
    rule it failed.

Semantics (the same for the server-wide rules and for each export's rules):
  * An empty allow list allows everyone.  A non-empty one must be matched by at least one entry:
    a TCP client matches only address/network entries, a Unix-socket client only ``uid:`` and
    ``gid:`` entries (so ``allow = ["10.0.0.0/8"]`` also shuts out Unix-socket clients).  An
    IPv4-mapped IPv6 address (``::ffff:10.1.2.3``) matches as the IPv4 address it carries.
  * An empty identity list allows any client.  A non-empty one must contain the client's TLS
    identity, so a client without TLS (or without a verified certificate) is refused.
  * Distinguished names compare as sequences of (attribute, value) in RFC 4514 order (most
    specific first: ``CN=client,O=Example,C=GB``); attribute names are case-insensitive and
    long names equal their short forms (``commonName`` = ``CN``); values compare exactly.

User and group names in ``uid:``/``gid:`` entries are looked up once, when the entry is parsed.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleError(ValueError):
    """An allow-list entry or distinguished name that cannot be parsed; the message says why."""


# -- clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    address: IPAddress | None = None  # TCP clients
    uid: int | None = None  # Unix-socket clients (SO_PEERCRED)
    gid: int | None = None
    tls_identity: str = ""  # after TLS: the client certificate's DN (RFC 4514) or the PSK username
    tls_dn: tuple[tuple[str, str], ...] | None = None  # the DN, normalised (see ``parse_dn``)

    @staticmethod
    def from_address(host: str) -> Peer:
        addr = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone index
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return Peer(address=addr)

    def describe(self) -> str:
        if self.address is not None:
            who = str(self.address)
        elif self.uid is not None:
            who = f"uid {self.uid} gid {self.gid}"
        else:
            who = "unknown peer"
        return f"{who}, TLS identity {self.tls_identity!r}" if self.tls_identity else who


# -- allow-list entries ------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowEntry:
    text: str  # as written, for messages
    network: IPNetwork | None = None
    uid: int | None = None
    gid: int | None = None

    def matches(self, peer: Peer) -> bool:
        if self.network is not None:
            return peer.address is not None and peer.address in self.network
        if self.uid is not None:
            return peer.uid == self.uid
        return self.gid is not None and peer.gid == self.gid


def _id_of(kind: str, value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if kind == "uid" else grp.getgrnam(value).gr_gid
    except KeyError:
        raise RuleError(f"allow entry '{kind}:{value}': no such {'user' if kind == 'uid' else 'group'}") from None


def parse_allow(text: str) -> AllowEntry:
    """One allow-list entry: ADDRESS, NETWORK/PREFIX, uid:N|NAME or gid:N|NAME."""
    t = text.strip()
    kind, sep, value = t.partition(":")
    if sep and kind in ("uid", "gid"):
        if not value:
            raise RuleError(f"allow entry {text!r}: {kind}: needs a number or a name")
        n = _id_of(kind, value)
        return AllowEntry(t, uid=n) if kind == "uid" else AllowEntry(t, gid=n)
    try:
        net = ipaddress.ip_network(t, strict=False)
    except ValueError:
        raise RuleError(f"allow entry {text!r}: not an IP address, a network (ADDR/PREFIX), uid:ID or gid:ID") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 128 and net.network_address.ipv4_mapped:
        net = ipaddress.ip_network(net.network_address.ipv4_mapped)
    return AllowEntry(t, network=net)


# -- distinguished names -----------------------------------------------------------------------

# Attribute names as Python's ssl module reports them (OpenSSL long names) and their RFC 4514
# short forms; a name not listed here is kept as written, upper-cased.
_SHORT = {
    "commonname": "CN",
    "organizationname": "O",
    "organizationalunitname": "OU",
    "localityname": "L",
    "stateorprovincename": "ST",
    "countryname": "C",
    "domaincomponent": "DC",
    "userid": "UID",
    "streetaddress": "STREET",
    "emailaddress": "EMAIL",
    "e": "EMAIL",
    "serialnumber": "SERIALNUMBER",
    "title": "TITLE",
    "givenname": "GN",
    "surname": "SN",
}

_ESCAPABLE = ',+"\\<>;= #'


def _attr(name: str) -> str:
    n = name.strip()
    return _SHORT.get(n.lower(), n.upper())


def _unescape(raw: str, dn: str) -> str:
    out, i = bytearray(), 0
    while i < len(raw):
        c = raw[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        nxt = raw[i + 1 : i + 3]
        if len(nxt) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in nxt):
            out.append(int(nxt, 16))
            i += 3
        elif nxt[:1] and nxt[0] in _ESCAPABLE:
            out += nxt[0].encode()
            i += 2
        else:
            raise RuleError(f"distinguished name {dn!r}: bad escape at {raw[i:]!r}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise RuleError(f"distinguished name {dn!r}: escaped bytes are not UTF-8") from None


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur += text[i : i + 2]
            i += 2
            continue
        if c == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def parse_dn(text: str) -> tuple[tuple[str, str], ...]:
    """An RFC 4514 string (``CN=a\\,b,O=Example``) as ((attribute, value), ...), most specific
    first; a multi-valued RDN (``CN=a+UID=b``) contributes its pairs in sorted order."""
    if not text.strip():
        raise RuleError("empty distinguished name")
    out: list[tuple[str, str]] = []
    for rdn in _split_unescaped(text, ","):
        pairs = []
        for ava in _split_unescaped(rdn, "+"):
            name, eq, value = ava.partition("=")
            if not eq or not name.strip():
                raise RuleError(f"distinguished name {text!r}: {ava.strip()!r} is not ATTRIBUTE=VALUE")
            value = value.lstrip()
            while value.endswith(" ") and not value.endswith("\\ "):  # keep an escaped trailing space
                value = value[:-1]
            pairs.append((_attr(name), _unescape(value, text)))
        out += sorted(pairs)
    return tuple(out)


def dn_of_subject(subject: Iterable[Iterable[tuple[str, str]]]) -> tuple[tuple[str, str], ...]:
    """The normalised DN of a certificate subject as ``ssl.SSLObject.getpeercert()`` gives it
    (RDNs in certificate order, least specific first; each a tuple of (long name, value))."""
    out: list[tuple[str, str]] = []
    for rdn in reversed(list(subject)):
        out += sorted((_attr(name), value) for name, value in rdn)
    return tuple(out)


def format_dn(dn: tuple[tuple[str, str], ...]) -> str:
    """RFC 4514 text of a normalised DN (special characters escaped)."""

    def esc(v: str) -> str:
        s = "".join("\\" + c if c in ',+"\\<>;=' else c for c in v)
        if s[:1] in (" ", "#"):
            s = "\\" + s
        if s.endswith(" ") and not s.endswith("\\ "):
            s = s[:-1] + "\\ "
        return s

    return ",".join(f"{a}={esc(v)}" for a, v in dn)


# -- rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    rule: str  # which rule the client failed, e.g. "[server] allow = 10.0.0.0/8"
    needs_tls: bool = False  # an identity rule, failed only because TLS is not up yet


@dataclass(frozen=True)
class AccessRules:
    where: str = "[server]"  # names the rules in messages: "[server]" or "export 'disk'"
    allow: tuple[AllowEntry, ...] = ()
    identities: tuple[tuple[tuple[str, str], ...] | str, ...] = ()  # normalised DNs, or PSK usernames
    identity_text: tuple[str, ...] = ()

    @classmethod
    def build(cls, where: str, allow: Iterable[str] = (), identities: Iterable[str] = ()) -> AccessRules:
        """Parse allow-list entries and identities (a DN when it contains '=', else a PSK username)."""
        ids = tuple(identities)
        return cls(
            where,
            tuple(parse_allow(a) for a in allow),
            tuple(parse_dn(i) if "=" in i else i for i in ids),
            ids,
        )

    @property
    def empty(self) -> bool:
        return not self.allow and not self.identities

    def check(self, peer: Peer, *, tls: bool) -> Refusal | None:
        if self.allow and not any(e.matches(peer) for e in self.allow):
            return Refusal(f"{self.where} allow = {', '.join(e.text for e in self.allow)}")
        if self.identities:
            have = peer.tls_dn if peer.tls_dn is not None else peer.tls_identity
            if not have or have not in self.identities:
                return Refusal(f"{self.where} tls-authz = {'; '.join(self.identity_text)}", needs_tls=not tls)
        return None
