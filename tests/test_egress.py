"""The egress proxy, for real over loopback: allowed fetches, a canary that must hear nothing,
refusals without connection attempts, byte and time caps, urllib and requests through proxy env.

Every outgoing TCP connection made through socket.create_connection (the proxy's, urllib's) is
checked by `connections`: anything outside 127.0.0.0/8 fails instead of connecting."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from pipelines.egress import EgressProxy
from pipelines.safety import UrlPolicy

BIG = 10_000


class Served:
    """A loopback HTTP server in a thread that records the paths it was asked for."""

    def __init__(self, host: str, routes: dict[str, Callable]) -> None:
        self.requests: list[str] = []
        self.stop = threading.Event()
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests.append(self.path)
                routes.get(self.path, lambda h, s: reply(h, b"", status=404))(self, served)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def reply(handler: BaseHTTPRequestHandler, body: bytes, length: bool = True, status: int = 200) -> None:
    handler.send_response(status)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def trickle(handler: BaseHTTPRequestHandler, served: Served) -> None:
    handler.send_response(200)
    handler.end_headers()
    while not served.stop.wait(0.1):  # a byte every 0.1 s, for as long as anyone listens
        try:
            handler.wfile.write(b"x")
            handler.wfile.flush()
        except OSError:
            return


@pytest.fixture
def connections(monkeypatch) -> list[str]:
    """Addresses the code under test tried to connect to; non-loopback ones are refused here."""
    attempts: list[str] = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        attempts.append(address[0])
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise OSError(f"test guard: no connection to {address[0]} allowed")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return attempts


@pytest.fixture
def canary() -> Iterator[Served]:
    served = Served("127.0.0.2", {})
    yield served
    served.close()


@pytest.fixture
def origin(canary: Served) -> Iterator[Served]:
    served = Served("127.0.0.1", {
        "/ok": lambda h, s: reply(h, b"hello"),
        "/to-canary": lambda h, s: (h.send_response(302), h.send_header("Location", canary.url("/secret")),
                                   h.send_header("Content-Length", "0"), h.end_headers()),
        "/big": lambda h, s: reply(h, b"x" * BIG, length=False),
        "/big-declared": lambda h, s: reply(h, b"x" * BIG),
        "/trickle": trickle,
        "/hang": lambda h, s: s.stop.wait(10),
    })
    yield served
    served.close()


def toy_policy(**changes) -> UrlPolicy:
    return UrlPolicy(**{"allow_public": False, "allow_networks": ["127.0.0.1/32"], "timeout_s": 5, **changes})


def no_dns(host: str) -> list[str]:
    raise OSError(f"no DNS in tests ({host})")


def opener_with(monkeypatch, proxy: EgressProxy) -> urllib.request.OpenerDirector:
    """A urllib opener built after the proxy env is set (build_opener reads the env then)."""
    for name, value in proxy.env().items():
        monkeypatch.setenv(name, value)
    return urllib.request.build_opener()


def test_urllib_uses_http_proxy_for_loopback_when_no_proxy_is_empty(monkeypatch, origin, connections):
    with EgressProxy(toy_policy(), resolve=no_dns) as proxy:
        opener = opener_with(monkeypatch, proxy)
        assert urllib.request.getproxies()["http"] == proxy.url
        assert not urllib.request.proxy_bypass("127.0.0.1")
        with opener.open(origin.url("/ok"), timeout=5) as response:
            assert response.read() == b"hello"
    assert proxy.forwarded == [origin.url("/ok")]
    assert origin.requests == ["/ok"]
    assert proxy.refusals == []


def test_canary_hears_nothing_direct_or_by_redirect(monkeypatch, origin, canary, connections):
    with EgressProxy(toy_policy(), resolve=no_dns) as proxy:
        opener = opener_with(monkeypatch, proxy)
        with pytest.raises(urllib.error.HTTPError) as direct:
            opener.open(canary.url("/secret"), timeout=5)
        assert direct.value.code == 403
        direct.value.close()
        with pytest.raises(urllib.error.HTTPError) as redirected:
            opener.open(origin.url("/to-canary"), timeout=5)  # urllib follows the 302 through the proxy
        assert redirected.value.code == 403
        redirected.value.close()
    assert canary.requests == []
    assert origin.requests == ["/to-canary"]
    assert [url for url, _ in proxy.refusals] == [canary.url("/secret")] * 2
    assert all("127.0.0.2" in reason for _, reason in proxy.refusals)
    assert "127.0.0.2" not in connections


@pytest.mark.parametrize(("url", "why"), [
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://10.0.0.1/a.jpg", "private"),
    ("http://93.184.216.34/a.jpg", "public address"),
    ("http://0x7f000002/", "non-canonical"),
])
def test_refused_before_any_connection(monkeypatch, url, why, connections):
    with EgressProxy(toy_policy(), resolve=no_dns) as proxy:
        with pytest.raises(urllib.error.HTTPError) as refused:
            opener_with(monkeypatch, proxy).open(url, timeout=5)
        assert refused.value.code == 403
        assert why in refused.value.read().decode()
        refused.value.close()
    assert len(proxy.refusals) == 1 and proxy.refusals[0][0] == url and why in proxy.refusals[0][1]
    assert set(connections) == {"127.0.0.1"}  # only the client's connection to the proxy itself


def raw_connect(proxy: EgressProxy, target: str) -> tuple[socket.socket, bytes]:
    port = int(proxy.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_connect_is_judged_then_tunnelled(origin, connections):
    with EgressProxy(toy_policy(), resolve=no_dns) as proxy:
        sock, head = raw_connect(proxy, "10.0.0.1:443")
        sock.close()
        assert head.startswith(b"HTTP/1.1 403")
        host, port = origin.server.server_address[:2]
        sock, head = raw_connect(proxy, f"{host}:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /ok HTTP/1.0\r\nHost: x\r\n\r\n")
        body = b""
        while chunk := sock.recv(4096):
            body += chunk
        sock.close()
    assert body.endswith(b"hello")
    assert proxy.refusals == [("https://10.0.0.1:443/", "private address 10.0.0.1")]
    assert "10.0.0.1" not in connections


def test_oversize_body_is_cut_at_max_bytes(monkeypatch, origin, connections):
    with EgressProxy(toy_policy(max_bytes=1000), resolve=no_dns) as proxy:
        opener = opener_with(monkeypatch, proxy)
        with opener.open(origin.url("/big"), timeout=5) as response:
            with pytest.raises(http.client.IncompleteRead) as short:
                response.read()
        assert len(short.value.partial) <= 1000
        with pytest.raises(urllib.error.HTTPError) as declared:
            opener.open(origin.url("/big-declared"), timeout=5)
        assert declared.value.code == 502
        declared.value.close()
        with opener.open(origin.url("/ok"), timeout=5) as response:
            assert response.read() == b"hello"
    assert proxy.cutoffs == [(origin.url("/big"), "body exceeds max_bytes 1000"),
                             (origin.url("/big-declared"), f"Content-Length {BIG} exceeds max_bytes 1000")]


def test_slow_upstream_is_cut_at_timeout(monkeypatch, origin, connections):
    with EgressProxy(toy_policy(timeout_s=1.0), resolve=no_dns) as proxy:
        opener = opener_with(monkeypatch, proxy)
        start = time.monotonic()
        with opener.open(origin.url("/trickle"), timeout=10) as response:
            with pytest.raises(http.client.IncompleteRead):
                response.read()
        with pytest.raises(urllib.error.HTTPError) as hung:
            opener.open(origin.url("/hang"), timeout=10)
        assert hung.value.code == 504
        hung.value.close()
        elapsed = time.monotonic() - start
    assert elapsed < 8  # two 1 s caps; generous for a busy machine
    assert [(url.rsplit("/", 1)[1], why) for url, why in proxy.cutoffs] == \
        [("trickle", "timeout_s reached"), ("hang", "timeout_s reached")]


def test_requests_honours_the_proxy_env(monkeypatch, origin, canary, connections):
    host, port = origin.server.server_address[:2]
    world_dns = {"world.test": [host]}
    with EgressProxy(toy_policy(), resolve=lambda name: world_dns[name]) as proxy:
        for name, value in proxy.env().items():
            monkeypatch.setenv(name, value)
        ok = requests.get(f"http://world.test:{port}/ok", timeout=5)  # resolved by the proxy, not by DNS
        refused = requests.get(canary.url("/secret"), timeout=5)
        redirected = requests.get(origin.url("/to-canary"), timeout=5)
    assert (ok.status_code, ok.content) == (200, b"hello")
    assert refused.status_code == 403 and redirected.status_code == 403
    assert canary.requests == []
    assert proxy.forwarded[0] == f"http://world.test:{port}/ok"


def test_a_client_that_hangs_up_is_recorded_not_a_traceback(origin, capsys):
    """A downloader that gives up before the proxy's 504 (as img2dataset does at its own timeout) leaves a
    cutoff in the record and nothing on stderr: a user's log shows no traceback for an expected failure."""
    with EgressProxy(toy_policy(timeout_s=0.5), resolve=no_dns) as proxy:
        address = urllib.parse.urlsplit(proxy.env()["http_proxy"])
        client = socket.create_connection((address.hostname, address.port))
        client.sendall(f"GET {origin.url('/hang')} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # hang up with RST
        client.close()
        deadline = time.monotonic() + 10
        while not proxy.cutoffs and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the 504 meets the closed socket just after the cutoff is recorded
    assert [why for _, why in proxy.cutoffs] == ["timeout_s reached"]
    assert "Traceback" not in capsys.readouterr().err
