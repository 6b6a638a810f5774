"""What an egress gate counts, in a size that does not grow with the rows it serves.

Each gate keeps counts (requests forwarded, body bytes passed on, refusals, cutoffs and deferrals by
reason) and small samples (the last few refused/cut/deferred URLs, the first hosts reached).
A refusal's reason names an address or a host ("private address 10.0.0.1"); it is counted under its
kind ("private address"), so the table of reasons stays as small as the policy's vocabulary.
`merge` adds the records of many gates into one run's egress record, again of bounded size.
"""
from __future__ import annotations

import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable

SAMPLE = 16  # URLs kept per kind (refused, cut, deferred), per gate and per run
HOSTS = 32  # hosts named per gate and per run
REASON_KINDS = 32  # distinct reason kinds per kind; further ones count under "other"
KINDS = ("refused", "cut", "deferred")
_WORD = re.compile(r"^(IPv[46]|[A-Za-z][A-Za-z()-]*)$")


def reason_kind(reason: str) -> str:
    """The reason up to its first variable part (an address, a number, a quoted name)."""
    words = []
    for word in reason.split():
        word = word.rstrip(":,")
        if not _WORD.match(word):
            break
        words.append(word)
    return " ".join(words) or "other"


class EgressCounters:
    """A gate's counts and samples; `on_change` is called (outside the lock) after every update."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.on_change = on_change
        self.forwarded = self.bytes = self.active = 0
        self.reasons: dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self.samples: dict[str, deque] = {kind: deque(maxlen=SAMPLE) for kind in KINDS}
        self.forwarded_sample: deque[str] = deque(maxlen=SAMPLE)
        self.hosts: dict[str, None] = {}
        self.more_hosts = False
        self._lock = threading.Lock()

    def note(self, kind: str, url: str, reason: str) -> None:
        """One refused, cut or deferred request."""
        with self._lock:
            counts = self.reasons[kind]
            key = reason_kind(reason)
            counts[key if key in counts or len(counts) < REASON_KINDS else "other"] += 1
            self.samples[kind].append((url, reason))
        self.on_change()

    def allowed(self, url: str, host: str) -> None:
        """One request judged allowed (it goes upstream unless its host's turn defers it)."""
        with self._lock:
            self.forwarded += 1
            self.forwarded_sample.append(url)
            if host not in self.hosts and len(self.hosts) >= HOSTS:
                self.more_hosts = True
            elif host:
                self.hosts[host] = None
        self.on_change()

    def add(self, active: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.active += active
            self.bytes += nbytes
        self.on_change()

    def snapshot(self) -> dict:
        with self._lock:
            return {"forwarded": self.forwarded, "bytes": self.bytes, "active": self.active,
                    **{kind: {"count": sum(self.reasons[kind].values()), "by_reason": dict(self.reasons[kind]),
                              "sample": [list(x) for x in self.samples[kind]]} for kind in KINDS},
                    "hosts": list(self.hosts), "more_hosts": self.more_hosts,
                    "last_forwarded": list(self.forwarded_sample)}


def merge(records: Iterable[dict]) -> dict:
    """One run's egress record from its gates' records: totals, reasons, samples, hosts and a line per
    node (gates, requests) - bounded by the policy's vocabulary and the cluster's size, not the rows."""
    total: dict = {"gates": 0, "forwarded": 0, "bytes": 0, "active": 0, "hosts": [], "more_hosts": False,
                   "nodes": {}, **{kind: {"count": 0, "by_reason": {}, "sample": []} for kind in KINDS}}
    hosts: dict[str, None] = {}
    for rec in records:
        total["gates"] += 1
        for key in ("forwarded", "bytes", "active"):
            total[key] += rec.get(key, 0)
        for kind in KINDS:
            mine, theirs = total[kind], rec.get(kind) or {}
            mine["count"] += theirs.get("count", 0)
            for why, n in (theirs.get("by_reason") or {}).items():
                key = why if why in mine["by_reason"] or len(mine["by_reason"]) < REASON_KINDS else "other"
                mine["by_reason"][key] = mine["by_reason"].get(key, 0) + n
            mine["sample"] = (mine["sample"] + [list(x) for x in theirs.get("sample", [])])[:SAMPLE]
        for host in rec.get("hosts", []):
            if host not in hosts and len(hosts) >= HOSTS:
                total["more_hosts"] = True
            else:
                hosts[host] = None
        total["more_hosts"] |= bool(rec.get("more_hosts"))
        node = total["nodes"].setdefault(rec.get("node_id", "?"), dict.fromkeys(("gates", "forwarded", "bytes",
                                                                                  *KINDS), 0))
        node["gates"] += 1
        for key in ("forwarded", "bytes"):
            node[key] += rec.get(key, 0)
        for kind in KINDS:
            node[kind] += (rec.get(kind) or {}).get("count", 0)
    total["hosts"] = sorted(hosts)
    return total
