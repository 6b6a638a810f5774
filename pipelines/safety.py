"""Which URLs a downloader may fetch: the decision behind the egress proxy.

Metadata files are third-party input: a URL in a LAION row can point at the cloud metadata
service, a private network or the machine itself (server-side request forgery). `check_url`
resolves the host once and judges every address of the answer; the caller then connects to exactly
those addresses, so a second DNS answer (rebinding) cannot change the target after the check.

Refused unless inside `allow_networks`: loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7),
shared 100.64/10, link-local (169.254/16 with the metadata service 169.254.169.254, fe80::/10),
unspecified, multicast, reserved and any other non-global address; IPv4 hidden in IPv6 (mapped,
6to4, Teredo, NAT64) and legacy IPv4 spellings (2130706433, 0x7f.1, 0177.0.0.1). Public addresses
are allowed only when `allow_public` is set.
"""
from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from model.config import ConfigBase

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], Sequence[str]]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_METADATA = ipaddress.ip_address("169.254.169.254")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_CHARS = re.compile(r"^[a-z0-9._-]+$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_CANONICAL_V4 = re.compile(r"^(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}$")


class UrlPolicy(ConfigBase):
    """What the downloaders may reach. Real runs: public internet only. Tests and the toy world:
    allow_public=False and allow_networks=["127.0.0.1/32"], so only the local world server answers."""

    allowed_schemes: list[str] = Field(default_factory=lambda: ["http", "https"])
    allow_public: bool = True
    allow_networks: list[str] = Field(default_factory=list, description="CIDRs allowed even if non-public")
    max_bytes: int = Field(50 * 1024 * 1024, ge=1, description="largest response body passed on")
    timeout_s: float = Field(30.0, gt=0, description="total time for one request, connect to last byte")
    # Politeness, per host and per gate (a run has a gate per downloader process: a host sees at most
    # these figures times the number of gates fetching from it; see pipelines/hosts.py).
    host_concurrency: int = Field(16, ge=1, description="requests in flight to one host through one gate")
    host_rate: float = Field(50.0, gt=0, description="requests per second to one host through one gate")
    host_queue_s: float = Field(5.0, ge=0, description="longest wait for a host's turn (at most timeout_s/2), "
                                "then the request is deferred: rate_limited")
    backoff_s: float = Field(30.0, ge=0, description="a host's pause after a 429 without Retry-After")
    max_backoff_s: float = Field(600.0, ge=0, description="longest pause a host's Retry-After can ask for")

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, networks: list[str]) -> list[str]:
        for cidr in networks:
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as err:
                raise ValueError(f"allow_networks: {cidr!r} is not a CIDR ({err})") from err
        return networks

    @field_validator("allowed_schemes")
    @classmethod
    def _lower(cls, schemes: list[str]) -> list[str]:
        return [s.lower() for s in schemes]

    def allow_listed(self, address: IPAddress) -> bool:
        return any(address in ipaddress.ip_network(cidr) for cidr in self.allow_networks)


@dataclass(frozen=True)
class UrlDecision:
    """`addresses` are the ones judged; connect to these, never re-resolve `host`."""

    allowed: bool
    reason: str
    addresses: tuple[str, ...] = ()
    host: str = ""
    port: int | None = None


def system_resolve(host: str) -> list[str]:
    """The host's addresses from the system resolver (a real DNS query: never used in tests)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class HostsFile:
    """A resolver answering from a JSON file {host: [addresses]}, read on every call like /etc/hosts, so
    an edit is seen at once (tests, air-gapped runs: no DNS query leaves). Unlisted hosts do not resolve.
    A plain picklable object: it can travel to the processes that run the egress gates."""

    path: str

    def __call__(self, host: str) -> list[str]:
        with open(self.path, encoding="utf-8") as fh:
            hosts = json.load(fh)
        if host not in hosts:
            raise OSError(f"{host} is not in {self.path}")
        return list(hosts[host])


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's reading of a host made of 1-4 decimal/octal/hex parts (what many clients do
    with "2130706433" or "0x7f.1"), or None when the host is not numeric at all.
    Raises ValueError for a numeric host that is no valid address."""
    labels = host.split(".")
    if not _NUMERIC_LABEL.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_LABEL.match(label) for label in labels):
        raise ValueError("malformed numeric host")
    try:
        parts = [int(lb, 16) if lb.startswith("0x") else int(lb, 8) if lb.startswith("0") and lb != "0" else int(lb)
                 for lb in (label if label != "0x" else "0x0" for label in labels)]
    except ValueError as err:
        raise ValueError("malformed numeric host") from err
    *head, last = parts
    if any(p > 255 for p in head) or last >= 256 ** (4 - len(head)):
        raise ValueError("numeric host out of range")
    value = sum(p << (8 * (3 - i)) for i, p in enumerate(head)) + last
    return ipaddress.IPv4Address(value)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: IPAddress) -> str | None:
    """Why an address is not a public internet host, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return f"IPv6 {address} embeds IPv4 {inner}"
    checks = [
        (address == _METADATA, "link-local cloud metadata address"),
        (address.is_loopback, "loopback address"),
        (address.is_link_local, "link-local address"),
        (address.is_unspecified, "unspecified address"),
        (address.is_multicast, "multicast address"),
        (address in _CGNAT, "shared (carrier-grade NAT) address"),
        (address.is_reserved, "reserved address"),
        (address.is_private, "private address"),
        (not address.is_global, "non-global address"),
    ]
    return next((f"{why} {address}" for hit, why in checks if hit), None)


def judge_address(address: IPAddress, policy: UrlPolicy) -> str | None:
    """None when the policy lets this address be reached; else the reason."""
    if policy.allow_listed(address):
        return None
    refusal = address_refusal(address)
    if refusal is not None:
        return refusal
    return None if policy.allow_public else f"public address {address} not in allow_networks"


def _host_addresses(host: str, policy: UrlPolicy, resolve: Resolver) -> tuple[list[IPAddress], str | None]:
    """The addresses behind a host, or a refusal reason for hosts that are spelled suspiciously."""
    try:
        return [ipaddress.ip_address(host)], None
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii")  # internationalised names as the resolver sees them
    except UnicodeError:
        return [], f"invalid host {host!r}"
    if not _HOST_CHARS.match(host):
        return [], f"invalid host {host!r}"
    try:
        legacy = parse_legacy_ipv4(host.rstrip("."))
    except ValueError as err:
        return [], f"{err}: {host!r}"
    if legacy is not None:
        if _CANONICAL_V4.match(host) is None and not policy.allow_listed(legacy):
            return [legacy], f"non-canonical IPv4 spelling {host!r} of {legacy}"
        return [legacy], None
    try:
        answers = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(host)]
    except (OSError, UnicodeError, ValueError) as err:
        return [], f"cannot resolve {host!r}: {err}"
    return answers, (None if answers else f"no address for {host!r}")


def check_url(url: str, policy: UrlPolicy, resolve: Resolver = system_resolve) -> UrlDecision:
    """Allow or refuse one URL before any connection. Every address of the answer must pass."""
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in url):
        return UrlDecision(False, "whitespace, control character or backslash in URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        return UrlDecision(False, f"unparsable URL: {err}")
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        return UrlDecision(False, f"scheme {scheme or '(none)'!r} not allowed")
    host = (parts.hostname or "").lower()
    if not host:
        return UrlDecision(False, "no host")
    port = port or {"http": 80, "https": 443}.get(scheme)
    addresses, refusal = _host_addresses(host, policy, resolve)
    shown = tuple(str(a) for a in addresses)
    if refusal is not None:
        return UrlDecision(False, refusal, shown, host, port)
    for address in addresses:
        why = judge_address(address, policy)
        if why is not None:
            return UrlDecision(False, why, shown, host, port)
    return UrlDecision(True, "allowed", shown, host, port)
