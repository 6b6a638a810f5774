"""URL decisions at scale: distinct hosts resolved concurrently, answers kept in a bounded per-run cache.

`check_url` resolves a host name once per call; over LAION's ~10^6 hosts a serial loop spends hours
in DNS before the first byte. Here each batch's distinct, not yet cached host names are resolved by a
thread pool first, and `check_url` then reads the answers from the cache. A failed resolution is
cached as its error, so the same refusal reason comes out as from a direct call. Decisions are made
once per distinct scheme://authority (vectorised grouping with pyarrow), not once per row.
"""
from __future__ import annotations

import ipaddress
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.safety import Resolver, UrlPolicy, check_url, parse_legacy_ipv4, system_resolve

RESOLVE_ERRORS = (OSError, UnicodeError, ValueError)
NAME_CHARS = re.compile(r"^[a-z0-9._-]+$")


class HostCache:
    """A bounded LRU of host -> addresses (or the error resolving it raised), filled concurrently.

    One per run: an answer is reused within the run, and a later run asks again."""

    def __init__(self, resolve: Resolver = system_resolve, maxsize: int = 65536, workers: int = 32) -> None:
        self.resolve, self.maxsize, self.workers = resolve, maxsize, workers
        self.answers: OrderedDict[str, tuple[str, ...] | Exception] = OrderedDict()
        self.decisions: OrderedDict[str, str | None] = OrderedDict()  # scheme://authority -> refusal or None
        self.lookups = self.decided = 0
        self._lock = threading.Lock()

    def remember(self, origin: str, reason: str | None) -> None:
        self.decisions[origin] = reason
        while len(self.decisions) > self.maxsize:
            self.decisions.popitem(last=False)

    def _lookup(self, host: str) -> tuple[str, ...] | Exception:
        try:
            return tuple(self.resolve(host))
        except RESOLVE_ERRORS as err:
            return err

    def _store(self, host: str, answer: tuple[str, ...] | Exception) -> None:
        with self._lock:
            self.answers[host] = answer
            self.answers.move_to_end(host)
            while len(self.answers) > self.maxsize:
                self.answers.popitem(last=False)

    def prefetch(self, hosts: set[str]) -> dict[str, tuple[str, ...] | Exception]:
        """The answers for `hosts`: cached ones, the rest resolved `workers` at a time (and cached)."""
        found = {h: a for h in hosts if (a := self.answers.get(h)) is not None}
        todo = [h for h in hosts if h not in found]
        self.lookups += len(todo)
        if len(todo) > 1 and self.workers > 1:
            with ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                answers = list(pool.map(self._lookup, todo))
        else:
            answers = [self._lookup(h) for h in todo]
        for host, answer in zip(todo, answers):
            self._store(host, answer)
            found[host] = answer
        return found

    def __call__(self, host: str) -> Sequence[str]:
        answer = self.answers.get(host)
        if answer is None:
            self.lookups += 1
            answer = self._lookup(host)
            self._store(host, answer)
        return _unwrap(answer)


def _unwrap(answer: tuple[str, ...] | Exception) -> Sequence[str]:
    if isinstance(answer, Exception):
        raise answer
    return answer


def host_name(url: str) -> str | None:
    """The name `check_url` would resolve for `url`, or None (an IP literal, or no usable host)."""
    try:
        host = (urlsplit(url).hostname or "").lower()
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii")
        if not NAME_CHARS.match(host) or parse_legacy_ipv4(host.rstrip(".")) is not None:
            return None  # refused or judged as an address by check_url: nothing to resolve
    except (UnicodeError, ValueError):
        return None
    return host


# A URL's decision depends on its scheme and authority only, once no character of it is one that
# check_url refuses or urlsplit strips (whitespace, controls, backslash): such URLs, and those not of
# the form scheme://authority..., are decided one by one.
SUSPECT = r"[\x00-\x20\x7f-\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}\\]"
ORIGIN = r"^(?P<origin>[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)"


def _decide_each(urls: list[str], policy: UrlPolicy, cache: HostCache) -> list[str | None]:
    batch = cache.prefetch({h for h in map(host_name, urls) if h is not None})

    def answer(host: str) -> Sequence[str]:  # this batch's answers even where the cache let them go
        return _unwrap(batch[host]) if host in batch else cache(host)

    return [None if d.allowed else d.reason for d in (check_url(u, policy, answer) for u in urls)]


def decide_column(urls: pa.Array | pa.ChunkedArray, policy: UrlPolicy, cache: HostCache) -> pa.Array:
    """The refusal reason of each URL, null where allowed. check_url runs once per distinct
    scheme://authority (remembered in `cache` for the run) and once per URL only for odd spellings."""
    urls = pc.cast(urls, pa.string())
    urls = urls.combine_chunks() if isinstance(urls, pa.ChunkedArray) else urls
    origin = pc.struct_field(pc.extract_regex(urls, ORIGIN), "origin")
    slow = pc.fill_null(pc.or_(pc.match_substring_regex(urls, SUSPECT), pc.is_null(origin)), True)
    keys = pc.if_else(slow, pa.scalar(None, pa.string()), origin)
    unique = pc.drop_null(pc.unique(keys))
    # This batch's decisions are read from `known` and `made`, never from the cache after it has
    # taken new ones: an answer the bounded cache let go must not read as "allowed" (None).
    known = {k: cache.decisions[k] for k in unique.to_pylist() if k in cache.decisions}
    todo = [k for k in unique.to_pylist() if k not in known]
    made = dict(zip(todo, _decide_each([k + "/" for k in todo], policy, cache)))
    for key, reason in made.items():
        cache.remember(key, reason)
    cache.decided += len(todo)
    reasons = pa.array([known[k] if k in known else made[k] for k in unique.to_pylist()], pa.string())
    decided = reasons.take(pc.index_in(keys, value_set=unique))
    if not pc.any(slow).as_py():
        return decided
    odd = pc.filter(urls, slow).to_pylist()
    return pc.replace_with_mask(decided, slow, pa.array(_decide_each(odd, policy, cache), pa.string()))


def decide_urls(urls: list[str], policy: UrlPolicy, resolve: Resolver = system_resolve,
                cache: HostCache | None = None) -> list[str | None]:
    """The refusal reason of each URL (None: allowed). Hosts go through `cache` (a run's HostCache;
    without one, a cache for this call over `resolve`)."""
    cache = cache if cache is not None else HostCache(resolve)
    return decide_column(pa.array(urls, pa.string()), policy, cache).to_pylist()
