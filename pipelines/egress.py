"""A forward proxy on 127.0.0.1 that every downloader goes through: the egress gate.

img2dataset (urllib) and video2dataset (requests) cannot be taught a URL policy, but both honour
`http_proxy`/`https_proxy`. Pointed at this proxy with `proxy.env()`, each request is judged by
`check_url` BEFORE any connection; the proxy then connects to exactly the addresses it judged,
never follows redirects (a 3xx goes back to the client, whose next request is judged again), and
cuts bodies at `max_bytes` and requests at `timeout_s`. A cut response ends without its last bytes
(short Content-Length or no final chunk), so the client sees an error, never a silently short file.

Each allowed request also takes its host's turn (`pipelines.hosts`: per-host concurrency, rate and
the pause a 429 or a 503 with Retry-After asks for). A request that cannot have a turn in time is
answered at once with 429 "Rate limited by egress gate" and no upstream request; an upstream 429 (or
503 with Retry-After) pauses the host and reaches the client as that same 429, so downloaders record
one reason, `rate_limited`, for every deferred row. Over https (CONNECT) the gate holds the turns but
cannot read the status inside the tunnel: a 429 there reaches the downloader as it is.

`counters` (`pipelines.egress_record`) keeps counts and small samples, never a list per request.

    with EgressProxy(UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"])) as proxy:
        subprocess.run([...], env={**os.environ, **proxy.env()})
        proxy.refusals  # the last few (url, reason); proxy.counters.snapshot() for the counts
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from pipelines.egress_record import EgressCounters
from pipelines.hosts import Deferral, HostLimiter, retry_after_s
from pipelines.safety import Resolver, UrlDecision, UrlPolicy, check_url, system_resolve

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"})
_CHUNK = 64 * 1024


class Cutoff(Exception):
    """A response passed a cap (bytes or time); the message is the recorded reason."""


class EgressProxy:
    """Context manager running the proxy in a background thread. Samples of the last requests (see
    `counters` for the counts): `refusals` (url, reason) judged out before any connection,
    `cutoffs` (url, reason) stopped at max_bytes or timeout_s, `forwarded` urls sent upstream.
    `resolve` turns a host name into addresses (tests inject a fake: no DNS query leaves).
    `on_flush`, when set, answers a GET of /_gate/flush sent to the gate itself (its record is written)."""

    def __init__(self, policy: UrlPolicy, resolve: Resolver = system_resolve, host: str = "127.0.0.1") -> None:
        self.policy = policy
        self.resolve = resolve
        self.counters = EgressCounters()
        self.limiter = HostLimiter(policy.host_concurrency, policy.host_rate)
        self.on_flush: Callable[[], None] | None = None
        self._host = host
        self._server: HangupTolerantServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "EgressProxy":
        server = HangupTolerantServer((self._host, 0), _ProxyHandler)
        server.egress = self  # type: ignore[attr-defined]
        self._server = server
        # A short poll keeps __exit__ quick: shutdown() waits up to one poll interval.
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="egress-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("EgressProxy is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        """Environment for a downloader process. no_proxy is empty so even loopback goes through."""
        url = self.url
        return {"http_proxy": url, "https_proxy": url, "HTTP_PROXY": url, "HTTPS_PROXY": url,
                "no_proxy": "", "NO_PROXY": ""}

    @property
    def refusals(self) -> list[tuple[str, str]]:
        return list(self.counters.samples["refused"])

    @property
    def cutoffs(self) -> list[tuple[str, str]]:
        return list(self.counters.samples["cut"])

    @property
    def forwarded(self) -> list[str]:
        return list(self.counters.forwarded_sample)

    def record(self, kind: str, url: str, reason: str) -> None:
        """One refused, cut or deferred request."""
        log.info("egress %s %s: %s", kind, url, reason)
        self.counters.note(kind, url, reason)

    def judge(self, url: str) -> UrlDecision:
        decision = check_url(url, self.policy, self.resolve)
        if not decision.allowed:
            self.record("refused", url, decision.reason)
        return decision

    def take_turn(self, url: str, decision: UrlDecision) -> Deferral | None:
        """The host's turn for an allowed request (None: go now), or why it is deferred."""
        policy = self.policy
        deferral = self.limiter.acquire(decision.host, min(policy.host_queue_s, policy.timeout_s / 2))
        if deferral is not None:
            self.record("deferred", url, deferral.reason)
        else:
            self.counters.allowed(url, urlsplit(url).netloc.rpartition("@")[2])  # hosts reached, as host:port
        return deferral

    def pause_host(self, url: str, decision: UrlDecision, status: int, retry_after: str | None) -> float:
        """An upstream 429/503 asked the host's clients to wait: pause it here; the seconds paused."""
        seconds = retry_after_s(retry_after, self.policy.backoff_s, self.policy.max_backoff_s)
        self.limiter.pause(decision.host, seconds)
        self.record("deferred", url, f"upstream {status}")
        return seconds


def _connect(decision: UrlDecision, deadline: float) -> socket.socket:
    """A TCP connection to the first judged address that answers (never a fresh DNS lookup)."""
    error: OSError = OSError("no address")
    for address in decision.addresses:
        try:
            return socket.create_connection((address, decision.port), timeout=_remaining(deadline))
        except OSError as err:
            error = err
    raise error


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Cutoff("timeout_s reached")
    return left


class HangupTolerantServer(ThreadingHTTPServer):
    """A threading HTTP server for which a client that hangs up mid-reply is expected, not an error: a
    downloader gives up at its own timeout or size cap, and the reply (a /slow/ file, the proxy's 504)
    then meets a closed socket. Other errors still print socketserver's traceback."""

    daemon_threads = True
    block_on_close = False  # a handler still asleep or tunnelling must not hold up shutdown

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


_PHRASES = {403: "Refused by egress proxy", 429: "Rate limited by egress gate", 502: "Bad Gateway (egress proxy)",
            504: "Gateway Timeout (egress proxy)"}
FLUSH_PATH = "/_gate/flush"  # origin-form GET to the gate itself: write its record now


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    rbufsize = 0  # unbuffered: bytes after a CONNECT's headers must reach the tunnel, not a read buffer

    @property
    def egress(self) -> EgressProxy:
        return self.server.egress  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        log.debug("proxy: " + format, *args)

    def _reply(self, code: int, message: str, retry_after: float | None = None) -> None:
        body = (message + "\n").encode()
        # The status line's phrase names the proxy, so a client's error message ("HTTP Error 403:
        # Refused by egress proxy") says who refused, not just "Forbidden".
        self.send_response(code, _PHRASES.get(code))
        if retry_after is not None:
            self.send_header("Retry-After", str(max(1, round(retry_after))))
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _in_turn(self, url: str, decision: UrlDecision, run: Callable[[str, UrlDecision], None]) -> None:
        """Run the request in its host's turn (the limiter), or answer 429 at once when the host defers it."""
        deferral = self.egress.take_turn(url, decision)
        if deferral is not None:
            self._reply(429, f"egress gate deferred: {deferral.reason}", deferral.retry_after_s)
            return
        self.egress.counters.add(active=1)
        try:
            run(url, decision)
        finally:
            self.egress.limiter.release(decision.host)
            self.egress.counters.add(active=-1)

    def _refuse_method(self) -> None:
        self.egress.record("refused", self.path, f"method {self.command} not allowed")
        self._reply(405, f"egress proxy: method {self.command} not allowed")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _refuse_method

    def do_GET(self) -> None:
        if self.path == FLUSH_PATH and self.egress.on_flush is not None:
            self.egress.on_flush()
            self._reply(200, "egress gate: record written")
            return
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        url = self.path
        if not url.lower().startswith("http://"):
            self._reply(400, "egress proxy: absolute http:// URI required (https goes through CONNECT)")
            return
        decision = self.egress.judge(url)
        if not decision.allowed:
            self._reply(403, f"egress proxy refused: {decision.reason}")
            return
        self._in_turn(url, decision, self._forward_allowed)
        self.close_connection = True

    def _forward_allowed(self, url: str, decision: UrlDecision) -> None:
        deadline = time.monotonic() + self.egress.policy.timeout_s
        headers_sent = False
        try:
            upstream = _connect(decision, deadline)
            response: http.client.HTTPResponse | None = None
            try:
                response = self._send_upstream(upstream, url, deadline)
                if response.status == 429 or (response.status == 503 and response.getheader("Retry-After")):
                    paused = self.egress.pause_host(url, decision, response.status, response.getheader("Retry-After"))
                    self._reply(429, f"egress gate deferred: upstream {response.status}", paused)
                    return
                self._check_declared_length(response)
                headers_sent = True
                self._relay(response, upstream, deadline)
            finally:
                if response is not None:
                    response.close()
                upstream.close()
        except Cutoff as cut:
            self.egress.record("cut", url, str(cut))
            if not headers_sent:
                self._reply(504 if "timeout" in str(cut) else 502, f"egress proxy cut: {cut}")
        except (TimeoutError, socket.timeout):
            self.egress.record("cut", url, "timeout_s reached")
            if not headers_sent:
                self._reply(504, "egress proxy cut: timeout_s reached")
        except (OSError, ValueError, http.client.HTTPException) as err:  # ValueError: http.client's InvalidURL
            if not headers_sent:
                self._reply(502, f"egress proxy: upstream failed: {err}")

    def _send_upstream(self, upstream: socket.socket, url: str, deadline: float) -> http.client.HTTPResponse:
        """Send the client's request to the judged address; return the response with its headers read."""
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80)
        conn.sock = upstream
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", parts.netloc.rpartition("@")[2])
        for name, value in self.headers.items():
            if name.lower() not in HOP_BY_HOP:
                conn.putheader(name, value)
        conn.putheader("Connection", "close")
        conn.endheaders()
        upstream.settimeout(_remaining(deadline))
        return conn.getresponse()

    def _check_declared_length(self, response: http.client.HTTPResponse) -> None:
        """Refuse a body announced as too big before any of it is passed on."""
        declared = response.getheader("Content-Length")
        limit = self.egress.policy.max_bytes
        if self.command != "HEAD" and declared and declared.isdigit() and int(declared) > limit:
            raise Cutoff(f"Content-Length {declared} exceeds max_bytes {limit}")

    def _relay(self, response: http.client.HTTPResponse, upstream: socket.socket, deadline: float) -> None:
        """Pass status, headers and body on; redirects go back as they are (never followed here)."""
        declared = response.getheader("Content-Length")
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        chunked = has_body and declared is None
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if declared is not None:
            self.send_header("Content-Length", declared)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        if not has_body:
            return
        sent, limit = 0, self.egress.policy.max_bytes
        while True:
            upstream.settimeout(_remaining(deadline))
            data = response.read1(_CHUNK)
            if not data:
                break
            if sent + len(data) > limit:
                self._write(data[: limit - sent], chunked)
                self.egress.counters.add(nbytes=limit - sent)
                raise Cutoff(f"body exceeds max_bytes {limit}")
            self._write(data, chunked)
            sent += len(data)
            self.egress.counters.add(nbytes=len(data))
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write(self, data: bytes, chunked: bool) -> None:
        if not data:
            return
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
        self.wfile.flush()

    def do_CONNECT(self) -> None:
        """https: judge host:port, then relay bytes both ways under the same caps."""
        url = f"https://{self.path}/"
        decision = self.egress.judge(url)
        if not decision.allowed:
            self._reply(403, f"egress proxy refused: {decision.reason}")
            return
        self._in_turn(url, decision, self._open_tunnel)  # one turn per tunnel

    def _open_tunnel(self, url: str, decision: UrlDecision) -> None:
        deadline = time.monotonic() + self.egress.policy.timeout_s
        try:
            upstream = _connect(decision, deadline)
        except (OSError, Cutoff) as err:
            self._reply(502, f"egress proxy: upstream failed: {err}")
            return
        try:
            self.send_response_only(200, "Connection established")
            self.end_headers()
            self._tunnel(upstream, deadline)
        except Cutoff as cut:
            self.egress.record("cut", url, str(cut))
        except OSError:
            pass
        finally:
            upstream.close()
            self.close_connection = True

    def _tunnel(self, upstream: socket.socket, deadline: float) -> None:
        client, received, limit = self.connection, 0, self.egress.policy.max_bytes
        while True:
            readable, _, _ = select.select([client, upstream], [], [], _remaining(deadline))
            for source in readable:
                data = source.recv(_CHUNK)
                if not data:
                    return
                if source is upstream:
                    received += len(data)
                    self.egress.counters.add(nbytes=len(data))
                    if received > limit:
                        raise Cutoff(f"tunnel exceeds max_bytes {limit}")
                (upstream if source is client else client).sendall(data)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for the block, and so for processes spawned in it (the downloaders' workers
    inherit os.environ), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
