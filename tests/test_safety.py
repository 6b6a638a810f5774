"""URL policy: every refused address class, odd spellings, multi-address answers. No DNS: IP
literals and injected resolvers only."""
from __future__ import annotations

import ipaddress
import socket

import pytest
from pydantic import ValidationError

from pipelines.safety import UrlPolicy, check_url, parse_legacy_ipv4

TOY = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"])
PUBLIC = UrlPolicy()


def no_dns(host: str) -> list[str]:
    raise AssertionError(f"resolver called for {host!r}: IP literals must never be resolved")


def fake_dns(table: dict[str, list[str]]):
    def resolve(host: str) -> list[str]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]
    return resolve


@pytest.mark.parametrize(("url", "why"), [
    ("http://10.0.0.1/a.jpg", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://127.0.0.1/", "loopback"),
    ("http://127.8.9.10:8080/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.251/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://[fd00::1]/", "private"),
    ("http://[::ffff:169.254.169.254]/", "embeds IPv4 169.254.169.254"),
    ("http://[::ffff:7f00:1]/", "embeds IPv4 127.0.0.1"),
    ("http://[2002:a00:1::]/", "embeds IPv4 10.0.0.1"),
    ("http://[64:ff9b::a9fe:a9fe]/", "embeds IPv4 169.254.169.254"),
])
def test_non_public_addresses_are_refused_even_with_public_allowed(url, why):
    decision = check_url(url, PUBLIC, no_dns)
    assert not decision.allowed
    assert why in decision.reason


@pytest.mark.parametrize(("url", "address"), [
    ("http://2130706433/", "127.0.0.1"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://0177.0.0.1/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"),
    ("http://0xa9fea9fe/", "169.254.169.254"),
    ("http://10.0.0.1./", "10.0.0.1"),
])
def test_legacy_ipv4_spellings_are_decoded_and_refused(url, address):
    decision = check_url(url, PUBLIC, no_dns)
    assert not decision.allowed
    assert decision.addresses == (address,)


def test_legacy_spelling_of_a_public_address_is_refused_but_allow_listed_one_passes():
    assert "non-canonical" in check_url("http://1572395042/", PUBLIC, no_dns).reason  # 93.184.216.34
    assert check_url("http://2130706433:8000/x", TOY, no_dns).allowed  # 127.0.0.1 is allow-listed
    assert not check_url("http://0x7f.2/", TOY, no_dns).allowed


@pytest.mark.parametrize("url", ["http://1.2.3.4.5/", "http://08.0.0.1/", "http://256.1.1.1/", "http://1.16777216/",
                                 "http://example.123/"])
def test_malformed_numeric_hosts_are_refused(url):
    decision = check_url(url, PUBLIC, no_dns)
    assert not decision.allowed and "numeric host" in decision.reason


@pytest.mark.parametrize("host", ["1.2.3.4", "1.65539", "0x1.0x2.0x3.0x4", "1.2.65535", "017700000001", "0x7f.0.1"])
def test_parse_legacy_ipv4_reads_like_inet_aton(host):
    # inet_aton is a local C function: no packet leaves the machine.
    assert parse_legacy_ipv4(host) == ipaddress.IPv4Address(socket.inet_aton(host))


def test_parse_legacy_ipv4_leaves_names_alone():
    assert parse_legacy_ipv4("example.com") is None
    assert parse_legacy_ipv4("0x7f.example") is None


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/a.jpg", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://127.0.0.1/", "scheme"),
    ("//example.com/a.jpg", "scheme"),
    ("http:///a.jpg", "no host"),
    ("http://exa mple.com/", "whitespace"),
    ("http://a.com\\@127.0.0.1/", "backslash"),
    ("http://example.com:99999/", "unparsable"),
    ("http://ex%41mple.com/", "invalid host"),
])
def test_malformed_urls_are_refused(url, why):
    decision = check_url(url, PUBLIC, no_dns)
    assert not decision.allowed and why in decision.reason


def test_public_addresses_follow_allow_public():
    assert check_url("https://93.184.216.34/cat.jpg", PUBLIC, no_dns).allowed
    decision = check_url("https://93.184.216.34/cat.jpg", TOY, no_dns)
    assert not decision.allowed and "not in allow_networks" in decision.reason


def test_allow_networks_open_exactly_the_listed_range():
    decision = check_url("http://127.0.0.1:8123/a.jpg", TOY, no_dns)
    assert decision.allowed and decision.addresses == ("127.0.0.1",) and decision.port == 8123
    assert not check_url("http://127.0.0.2:8123/a.jpg", TOY, no_dns).allowed
    lab = UrlPolicy(allow_networks=["10.1.0.0/16"])
    assert check_url("http://10.1.2.3/", lab, no_dns).allowed
    assert not check_url("http://10.2.0.1/", lab, no_dns).allowed


def test_names_are_resolved_once_and_every_address_must_pass():
    dns = fake_dns({"world.test": ["127.0.0.1"], "mixed.test": ["93.184.216.34", "10.0.0.1"],
                    "cdn.test": ["93.184.216.34", "2606:2800:220:1::1"], "empty.test": []})
    ok = check_url("http://world.test:9000/x.jpg", TOY, dns)
    assert ok.allowed and ok.addresses == ("127.0.0.1",) and ok.host == "world.test"
    mixed = check_url("http://mixed.test/x.jpg", PUBLIC, dns)
    assert not mixed.allowed and "10.0.0.1" in mixed.reason
    assert check_url("http://CDN.test/x.jpg", PUBLIC, dns).allowed
    assert "cannot resolve" in check_url("http://nowhere.test/", PUBLIC, dns).reason
    assert "no address" in check_url("http://empty.test/", PUBLIC, dns).reason


def test_policy_rejects_bad_fields():
    with pytest.raises(ValidationError, match="not a CIDR"):
        UrlPolicy(allow_networks=["127.0.0.1/33"])
    with pytest.raises(ValidationError):
        UrlPolicy(max_bytes=0)
    assert UrlPolicy(allowed_schemes=["HTTP"]).allowed_schemes == ["http"]
