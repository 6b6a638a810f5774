"""The egress gates of one download run: where every downloader's request is judged.

`GateRun` is what the data flows hold while they download: it starts the gate that serves this node
and says how downloader processes find theirs (`env()` for processes on this node, `ray_runtime_env()`
for Ray tasks), and `summary()` gives the run's egress record for the manifest.

    with GateRun(policy, record_dir=join(out, "_work", "egress")) as gates:
        run_downloaders(env=gates.env())
        manifest["egress"] = gates.summary()
"""
from __future__ import annotations

from urllib.parse import urlsplit

from pipelines.egress import EgressProxy
from pipelines.safety import Resolver, UrlPolicy, system_resolve


class GateRun:
    """The gates of one run; a context manager."""

    def __init__(self, policy: UrlPolicy, record_dir: str, resolve: Resolver = system_resolve) -> None:
        self.policy = policy
        self.record_dir = record_dir
        self._local = EgressProxy(policy, resolve)

    def __enter__(self) -> "GateRun":
        self._local.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._local.__exit__(*exc)

    @property
    def url(self) -> str:
        """The gate serving processes on this node."""
        return self._local.url

    def env(self) -> dict[str, str]:
        """Proxy variables for downloader processes on this node."""
        return self._local.env()

    def ray_runtime_env(self) -> dict:
        """The runtime_env that gives Ray tasks their gate."""
        return {"env_vars": self.env()}

    def summary(self) -> dict:
        """The run's egress record: refusals and cutoffs (url, reason), and the hosts reached."""
        return {"refused": list(self._local.refusals), "cut": list(self._local.cutoffs),
                "hosts": sorted({urlsplit(u).netloc for u in self._local.forwarded})}
