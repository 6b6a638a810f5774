"""The egress gates of a run, for real over loopback: a gate per downloader process with its own record,
per-host politeness (concurrency, rate, the pause a 429 asks for) and `rate_limited` rows from
img2dataset and the video downloader. The multi-node test is in test_ray_cluster.py."""
from __future__ import annotations

import email.utils
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.egress import environment
from pipelines.egress_record import SAMPLE, merge, reason_kind
from pipelines.gates import GATE_VAR, GateError, GateRun, flush_node_gates, init_ray, read_records
from pipelines.hosts import HostLimiter, retry_after_s
from pipelines.images.download import failure_reason, run_img2dataset
from pipelines.safety import UrlPolicy
from pipelines.videos.download import reason_of
from pipelines.videos.workers import CheckedDownloader, DownloadError

ROOT = Path(__file__).resolve().parent.parent


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


class Origin:
    """A loopback image server that logs (time, path, status) and, past `allow` requests in any second,
    answers 429 with Retry-After: 1 (or 503 with it, for paths under /busy/). `hold_s`: each reply waits."""

    def __init__(self, allow: int = 10**6, hold_s: float = 0.0) -> None:
        self.log: list[tuple[float, str, int]] = []
        self.inflight = self.most_inflight = 0
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                now = time.monotonic()
                with origin.lock:
                    accepted = [t for t, _, s in origin.log if s == 200 and t > now - 1.0]
                    status = 200 if len(accepted) < allow else (503 if self.path.startswith("/busy/") else 429)
                    origin.log.append((now, self.path, status))
                    origin.inflight += 1
                    origin.most_inflight = max(origin.most_inflight, origin.inflight)
                time.sleep(hold_s)
                body = JPEG if status == 200 else b"slow down"
                self.send_response(status)
                if status != 200:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with origin.lock:  # before the body: the gate cannot have it all (and move on) before this
                    origin.inflight -= 1
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin_factory() -> Iterator:
    made: list[Origin] = []

    def make(**kwargs) -> Origin:
        made.append(Origin(**kwargs))
        return made[-1]

    yield make
    for origin in made:
        origin.close()


def policy(**changes) -> UrlPolicy:
    return UrlPolicy(**{"allow_public": False, "allow_networks": ["127.0.0.1/32"], "timeout_s": 10, **changes})


def most_in_a_second(times: list[float]) -> int:
    """The most requests the server saw start within any one second."""
    times = sorted(times)
    return max(sum(1 for u in times if t <= u < t + 1.0) for t in times)


def fetch_all(gates: GateRun, urls: list[str]) -> list[tuple[int, str]]:
    """GET every URL at once (a thread each) through the driver's gate: (status, reason phrase) each."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": gates.url}))
    results: list[tuple[int, str]] = [(0, "")] * len(urls)

    def get(i: int) -> None:
        try:
            with opener.open(urls[i], timeout=30) as reply:
                reply.read()
                results[i] = (reply.status, reply.reason)
        except urllib.error.HTTPError as err:
            results[i] = (err.code, err.reason)
            err.close()

    threads = [threading.Thread(target=get, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_gate_holds_host_rate_and_concurrency(origin_factory, tmp_path):
    origin = origin_factory(hold_s=0.3)
    rate = 8.0
    with GateRun(policy(host_rate=rate, host_concurrency=2), str(tmp_path)) as gates:
        results = fetch_all(gates, [origin.url(f"/img/{i}.jpg") for i in range(12)])
        summary = gates.summary()
    assert results == [(200, "OK")] * 12  # each waited for its turn, none was deferred
    starts = sorted(t for t, _, _ in origin.log)
    assert len(starts) == 12 and most_in_a_second(starts) <= rate + 1  # + 1: the server's own scheduling jitter
    assert starts[-1] - starts[0] >= 11 / rate - 0.1
    assert origin.most_inflight <= 2
    assert summary["forwarded"] == 12 and summary["deferred"]["count"] == 0
    assert summary["bytes"] == 12 * len(JPEG) and summary["gates"] == 1


def test_a_request_that_cannot_have_its_turn_is_deferred_without_upstream(origin_factory, tmp_path):
    origin = origin_factory(hold_s=0.5)
    with GateRun(policy(host_rate=1.0, host_concurrency=1, host_queue_s=0.2), str(tmp_path)) as gates:
        results = fetch_all(gates, [origin.url(f"/img/{i}.jpg") for i in range(4)])
        summary = gates.summary()
    assert sorted(results)[0] == (200, "OK")
    assert sorted(results)[1:] == [(429, "Rate limited by egress gate")] * 3
    assert len(origin.log) == 1  # the deferred ones never left the gate
    assert summary["deferred"]["count"] == 3 and set(summary["deferred"]["by_reason"]) <= {"host busy", "host rate"}


@pytest.mark.parametrize("path", ["/img/", "/busy/"])
def test_upstream_429_or_503_pauses_the_host_for_its_retry_after(origin_factory, tmp_path, path):
    origin = origin_factory(allow=1)
    with GateRun(policy(), str(tmp_path)) as gates:
        first = fetch_all(gates, [origin.url(path + "a.jpg")])
        limited = fetch_all(gates, [origin.url(path + "b.jpg")])  # the origin answers 429/503 + Retry-After: 1
        paused = fetch_all(gates, [origin.url(path + f"{i}.jpg") for i in range(3)])
        heard = len(origin.log)
        time.sleep(1.1)
        after = fetch_all(gates, [origin.url(path + "c.jpg")])
        summary = gates.summary()
    assert first == [(200, "OK")] and after == [(200, "OK")]
    assert limited == paused[:1] == [(429, "Rate limited by egress gate")] and len(set(paused)) == 1
    assert heard == 2  # the paused requests were answered by the gate
    status = 429 if path == "/img/" else 503
    assert summary["deferred"]["by_reason"] == {"upstream": 1, "host paused": 3}
    assert summary["deferred"]["sample"][0][1] == f"upstream {status}"


def test_retry_after_and_limiter_table_stay_bounded():
    assert retry_after_s("7", 30, 600) == 7 and retry_after_s(None, 30, 600) == 30
    assert retry_after_s("junk", 30, 600) == 30 and retry_after_s("99999", 30, 600) == 600
    later = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 17 <= retry_after_s(later, 30, 600) <= 20
    limiter = HostLimiter(concurrency=1, rate=1000.0, max_hosts=8)
    for i in range(100):
        assert limiter.acquire(f"h{i}.test", 1.0) is None
        limiter.release(f"h{i}.test")
    time.sleep(0.01)
    limiter.acquire("last.test", 1.0)
    assert len(limiter) <= 9  # idle hosts forgotten, the table does not grow with hosts met


def test_reasons_are_counted_by_kind_and_records_merge_bounded():
    assert reason_kind("private address 10.0.0.1") == "private address"
    assert reason_kind("non-canonical IPv4 spelling '0x7f.1' of 127.0.0.1") == "non-canonical IPv4 spelling"
    assert reason_kind("IPv6 ::ffff:7f00:1 embeds IPv4 127.0.0.1") == "IPv6"
    records = [{"node_id": f"n{i % 2}", "forwarded": 1, "bytes": 10, "hosts": [f"h{i}"],
                "refused": {"count": 1, "by_reason": {"private address": 1}, "sample": [[f"u{i}", "r"]]}}
               for i in range(100)]
    total = merge(records)
    assert total["gates"] == 100 and total["forwarded"] == 100 and total["refused"]["count"] == 100
    assert len(total["refused"]["sample"]) == SAMPLE and total["more_hosts"] and len(total["hosts"]) < 100
    assert total["nodes"]["n0"]["gates"] == total["nodes"]["n1"]["refused"] == 50


WORKER = """
import os, sys, time, urllib.request
import pipelines.gates as gates
gates.FLUSH_S = 3600  # only an explicit flush writes the record
env = gates.gate_env({gates.GATE_VAR: os.environ[gates.GATE_VAR]})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": env["http_proxy"]}))
opener.open(sys.argv[1], timeout=10).read()
print("fetched", flush=True)
time.sleep(60)
"""


def test_each_process_has_its_own_gate_and_flushes_when_asked(origin_factory, tmp_path):
    origin = origin_factory()
    with GateRun(policy(), str(tmp_path / "egress")) as gates:
        env = {k: v for k, v in gates.env().items() if "proxy" not in k.lower()}  # the spec only
        worker = subprocess.Popen([sys.executable, "-c", WORKER, origin.url("/img/w.jpg")], cwd=ROOT,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdout.readline().strip() == "fetched"
            before = {r["pid"]: r["forwarded"] for r in read_records(gates.record_dir, gates.spec.run_id)}
            assert before.get(worker.pid) == 0  # its first record, written when the gate started
            assert flush_node_gates(gates.record_dir, gates.spec.run_id) == 2
            records = {r["pid"]: r for r in gates.records()}
        finally:
            worker.kill()
            worker.wait()
    assert records[worker.pid]["forwarded"] == 1 and records[worker.pid]["role"] == "worker"
    driver = next(r for r in records.values() if r["role"] == "driver")
    assert driver["forwarded"] == 0 and driver["pid"] != worker.pid and len(records) == 2
    assert records[worker.pid]["port"] != driver["port"]


def test_video_downloader_records_rate_limited(origin_factory, tmp_path):
    origin = origin_factory(allow=0)
    with GateRun(policy(), str(tmp_path / "egress")) as gates, environment({GATE_VAR: gates.env()[GATE_VAR]}):
        # a dead proxy address: the downloader must use this process's gate for the run, not it
        download = CheckedDownloader("http://127.0.0.1:9", 5.0, 2**20, str(tmp_path))
        with pytest.raises(DownloadError) as err:
            download(origin.url("/v.mp4"))
        summary = gates.summary()
    assert reason_of(str(err.value)) == "rate_limited"
    assert summary["deferred"]["count"] == 1 and len(origin.log) == 1


def test_ray_tasks_get_the_runs_spec_never_an_address(tmp_path):
    with GateRun(policy(), str(tmp_path)) as gates:
        runtime_env = gates.ray_runtime_env()
        port = gates.url.rsplit(":", 1)[1]
    assert runtime_env["worker_process_setup_hook"] == "pipelines.gates.start_worker_gate"
    assert list(runtime_env["env_vars"]) == [GATE_VAR] and port not in json.dumps(runtime_env)


@pytest.mark.slow
def test_ray_already_running_without_the_runs_gates_is_refused(ray_session, tmp_path):
    """A process whose Ray job has no gate hook would run img2dataset's tasks ungated: one clear error."""
    with GateRun(policy(), str(tmp_path)) as gates, pytest.raises(GateError, match="without this run's egress gates"):
        init_ray(gates.env(), None)


@pytest.mark.slow
def test_img2dataset_rows_past_the_hosts_rate_end_rate_limited(origin_factory, tmp_path):
    """img2dataset for real through the gate, against a host that answers 429 (Retry-After: 1) past
    3 requests a second: the gate keeps its own rate, sends nothing while the host asked for a pause,
    and every row ends once, written or rate_limited (the flows fetch those again in a later round)."""
    origin = origin_factory(allow=3)
    rate, rows = 10.0, 24
    urls = [origin.url(f"/img/{i}.jpg") for i in range(rows)]
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": ["a red square"] * rows, "row_id": list(range(rows))}), url_list)
    with GateRun(policy(host_rate=rate, timeout_s=5), str(tmp_path / "egress")) as gates:
        run_img2dataset(str(url_list), str(tmp_path / "shards"), image_size=16, samples_per_shard=8, processes=1,
                        threads=4, retries=0, timeout=5, distributor="multiprocessing", proxy_env=gates.env())
        summary = gates.summary()
    parts = pa.concat_tables(pq.read_table(p, columns=["row_id", "status", "error_message"])
                             for p in sorted((tmp_path / "shards").glob("*.parquet")))
    outcomes = [(r["row_id"], "written" if r["status"] == "success" else failure_reason(r["error_message"]))
                for r in parts.to_pylist()]
    assert sorted(r for r, _ in outcomes) == list(range(rows))  # every row once, none lost
    reasons = [why for _, why in outcomes]
    assert set(reasons) == {"written", "rate_limited"} and reasons.count("written") >= 3
    assert summary["deferred"]["count"] == reasons.count("rate_limited")
    assert most_in_a_second([t for t, _, _ in origin.log]) <= rate + 1
    for t, _, status in origin.log:
        if status == 429:  # the gate paused the host for the second it asked: nothing reached it meanwhile
            assert not [u for u, _, _ in origin.log if t + 0.05 < u < t + 0.95]
    assert json.dumps(summary)  # plain data for the manifest
