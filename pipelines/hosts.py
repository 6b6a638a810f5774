"""Per-host politeness inside one egress gate: a concurrency cap, a request rate, and a pause that a
host asks for with 429 (or 503 with Retry-After).

A request takes its host's turn in `HostLimiter.acquire`: first a free connection slot (at most
`concurrency` in flight), then the next point of the host's schedule (requests start at least
1/`rate` seconds apart, no bursts). A request that would wait longer than `wait_s` for either, or
that arrives while its host pauses, is deferred at once: the gate answers it without any upstream
request, and the downloader records `rate_limited` so that the row is fetched again in a later round.

The limits hold per gate. Gates do not talk to each other, so a host sees at most the sum over the
gates that fetch from it: `rate` x gates requests per second and `concurrency` x gates connections
(a run's gates are its downloader processes on every node; `GateRun.summary()` counts them).

The host table is bounded (`max_hosts`): hosts with nothing in flight, no pause and no reserved turn
are forgotten oldest first, so a gate's memory does not grow with the number of hosts it has met.
"""
from __future__ import annotations

import email.utils
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Host:
    active: int = 0
    waiting: int = 0
    next_start: float = 0.0  # monotonic time of the host's next free turn
    paused_until: float = 0.0


@dataclass(frozen=True)
class Deferral:
    """Why a request was not sent now, and how long until its host could take it (for Retry-After)."""

    reason: str
    retry_after_s: float


class HostLimiter:
    """Concurrency, rate and pauses per host, shared by a gate's handler threads."""

    def __init__(self, concurrency: int, rate: float, max_hosts: int = 10_000) -> None:
        self.concurrency, self.interval, self.max_hosts = concurrency, 1.0 / rate, max_hosts
        self._hosts: OrderedDict[str, _Host] = OrderedDict()
        self._cond = threading.Condition()

    def acquire(self, host: str, wait_s: float) -> Deferral | None:
        """Take a turn for `host` (None), or say why the request is deferred. Call `release` after a turn."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            state = self._state(host)
            state.waiting += 1
            try:
                deferral = self._paused(state)
                while deferral is None and state.active >= self.concurrency:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return Deferral("host busy", self.interval)
                    self._cond.wait(left)
                    deferral = self._paused(state)
                if deferral is not None:
                    return deferral
                now = time.monotonic()
                start = max(now, state.next_start)
                if start > deadline:
                    return Deferral("host rate", start - now)
                state.next_start = start + self.interval
                state.active += 1
            finally:
                state.waiting -= 1
        if start > now:
            time.sleep(start - now)
            with self._cond:
                deferral = self._paused(state)  # the host asked for a pause while this turn waited
            if deferral is not None:
                self.release(host)
                return deferral
        return None

    def release(self, host: str) -> None:
        with self._cond:
            state = self._hosts.get(host)
            if state is not None:
                state.active -= 1
            self._cond.notify_all()

    def pause(self, host: str, seconds: float) -> None:
        """Hold every request for `host` back for `seconds` (what its Retry-After asked)."""
        with self._cond:
            state = self._state(host)
            state.paused_until = max(state.paused_until, time.monotonic() + seconds)
            self._cond.notify_all()

    def _paused(self, state: _Host) -> Deferral | None:
        left = state.paused_until - time.monotonic()
        return Deferral("host paused", left) if left > 0 else None

    def _state(self, host: str) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = _Host()
            self._forget_idle()
        self._hosts.move_to_end(host)
        return state

    def _forget_idle(self) -> None:
        """Drop the least recently used hosts that hold nothing, while the table is over its bound."""
        now = time.monotonic()
        for host in list(self._hosts)[: max(0, len(self._hosts) - self.max_hosts)]:
            state = self._hosts[host]
            if not (state.active or state.waiting or state.paused_until > now or state.next_start > now):
                del self._hosts[host]

    def __len__(self) -> int:
        return len(self._hosts)


def retry_after_s(value: str | None, default: float, most: float) -> float:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), `default` when absent or
    unreadable, never more than `most`."""
    seconds = default
    if value:
        text = value.strip()
        if text.isdigit():
            seconds = float(text)
        else:
            try:
                seconds = email.utils.parsedate_to_datetime(text).timestamp() - time.time()
            except (TypeError, ValueError, IndexError):
                seconds = default
    return min(max(seconds, 0.0), most)
