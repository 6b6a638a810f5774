"""The image flow for real: toy-world metadata -> filters -> img2dataset over loopback HTTP -> shards.

Every input row must end in exactly the outcome the world's ground truth says; nothing but
127.0.0.0/8 is ever contacted (a canary on 127.0.0.2 proves the redirect path is closed too).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.config import LOOPBACK_HOST_RATE, ImageDataConfig
from pipelines.flows.images import build_image_dataset
from pipelines.images.decide import HostCache, decide_urls
from pipelines.images.plan import MetadataError
from pipelines.manifest import ManifestError
from pipelines.safety import HostsFile, UrlPolicy, check_url

# What each ground-truth category must become: (status, reason).
EXPECTED = {
    "ok": ("written", None), "nsfw": ("filtered", "nsfw"), "watermark": ("filtered", "watermark"),
    "toxic": ("filtered", "toxic"), "too_small": ("filtered", "too_small"), "http_404": ("failed", "http_404"),
    "corrupt": ("failed", "corrupt"), "slow": ("failed", "timeout"),
}
POLICY = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=2.0, max_bytes=2**20,
                   host_rate=LOOPBACK_HOST_RATE)
IMAGES = ImageDataConfig(image_size=32, samples_per_shard=16, processes=1, threads=4, retries=0)


@pytest.fixture(scope="module")
def world(served_world):
    return served_world


def _outcomes(out: Path) -> dict[int, tuple[str, str | None]]:
    table = pq.read_table(out / "outcomes.parquet")
    return {r["row_id"]: (r["status"], r["reason"]) for r in table.to_pylist()}


def _keys(out: Path) -> list[str]:
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)]


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """One real run over the tiny world, shared by the tests that read its result."""
    root, _ = world
    out = tmp_path_factory.mktemp("built") / "images"
    return out, build_image_dataset([str(root / "laion.parquet")], str(out), IMAGES, POLICY)


def test_every_row_ends_as_the_ground_truth_says(world, built):
    root, _ = world
    out, manifest = built
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas().query("source == 'laion'")
    outcomes = _outcomes(out)
    assert len(outcomes) == len(truth) == manifest["rows"] == manifest["input_rows"]
    for row in truth.itertuples():
        assert outcomes[row.row] == EXPECTED[row.expected], (row.row, row.expected, row.url)
    # Counts add up and match the shards; every shard sample is readable and carries image, caption, json.
    assert sum(manifest["counts"].values()) == manifest["rows"]
    written = manifest["counts"]["written"]
    assert sum(s["samples"] for s in manifest["shards"]) == written == (truth.expected == "ok").sum()
    tars = [str(out / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == written
    for sample in samples:
        assert sample["jpg"].size == (32, 32) and sample["txt"]
        assert json.loads(json.dumps(sample["json"]))["row_id"] in outcomes
    for entry in manifest["shards"]:
        assert entry["sha256"] == hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest()


def test_resume_after_a_kill_loses_and_duplicates_nothing(world, built, tmp_path):
    root, _ = world
    out = tmp_path / "images"
    shutil.copytree(built[0], out)
    first, cfg = built[1], IMAGES
    before = _outcomes(out)
    # A kill mid-shard leaves a truncated tar and no _stats.json: that shard must be redone.
    (out / "shards" / "00001_stats.json").unlink()
    tar = out / "shards" / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    second = build_image_dataset([str(root / "laion.parquet")], str(out), cfg, POLICY)
    assert _outcomes(out) == before
    assert second["counts"] == first["counts"]
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == first["counts"]["written"]
    with pytest.raises(ManifestError, match="settings"):
        build_image_dataset([str(root / "laion.parquet")], str(out), cfg.model_copy(update={"image_size": 16}), POLICY)


class Canary(http.server.BaseHTTPRequestHandler):
    """A server on 127.0.0.2 (loopback, but outside the policy's 127.0.0.1/32) that must hear nothing."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - stdlib name
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_refused_addresses_never_receive_a_packet(world, tmp_path):
    root, server = world
    canary = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Canary)
    threading.Thread(target=canary.serve_forever, daemon=True).start()
    try:
        target = f"http://127.0.0.2:{canary.server_address[1]}/img.jpg"
        good = f"{server.url}/files/images/img000000.jpg"
        urls = [target, f"{server.url}/redirect?to={target}", "http://169.254.169.254/latest/meta-data",
                "http://10.0.0.1/a.jpg", "http://93.184.216.34/a.jpg", "file:///etc/passwd", good]
        table = pa.table({"URL": urls, "TEXT": ["a red circle"] * len(urls), "WIDTH": [64] * len(urls),
                          "HEIGHT": [64] * len(urls)})
        meta = tmp_path / "meta.parquet"
        pq.write_table(table, meta)
        manifest = build_image_dataset([str(meta)], str(tmp_path / "out"), IMAGES, POLICY)
        outcomes = _outcomes(tmp_path / "out")
        assert [outcomes[i] for i in range(len(urls))] == [("failed", "refused")] * 6 + [("written", None)]
        assert Canary.hits == []
        refused = manifest["egress"]["refused"]  # by the gate: only the redirect's hop reached it
        assert refused["count"] == 1 and refused["by_reason"] == {"loopback address": 1}
        assert [url for url, _ in refused["sample"]] == [target]
    finally:
        canary.shutdown()
        canary.server_close()


def test_real_laion_rows_rewritten_to_loopback(world, shared_data, tmp_path):
    """img2dataset's 1,000 real rows: their TEXT through the filters, their URLs pointed at the loopback
    server (a few at toy images, the rest at paths that 404); each ends as the right outcome."""
    root, server = world
    real = pq.read_table(shared_data / "test_1000.parquet")
    served = sorted(p.name for p in (root / "files" / "images").glob("img*.jpg"))[:5]
    urls = [f"{server.url}/files/images/{served[i]}" if i < len(served)
            else f"{server.url}/rewritten/{hashlib.sha1(u.encode()).hexdigest()}.jpg"
            for i, u in enumerate(real.column("URL").to_pylist())]
    rewritten = real.set_column(real.schema.get_field_index("URL"), "URL", pa.array(urls))
    meta = tmp_path / "real.parquet"
    pq.write_table(rewritten, meta)
    cfg = IMAGES.model_copy(update={"samples_per_shard": 500, "threads": 16})
    # No slow rows here: a generous timeout keeps a loaded machine from turning 404s into timeouts.
    policy = POLICY.model_copy(update={"timeout_s": 15.0})
    manifest = build_image_dataset([str(meta)], str(tmp_path / "out"), cfg, policy)
    outcomes = _outcomes(tmp_path / "out")
    assert len(outcomes) == 1000 == manifest["rows"]
    statuses = {o for o in outcomes.values()}
    assert statuses <= {("written", None), ("filtered", "toxic"), ("failed", "http_404"), ("failed", "corrupt")}
    assert manifest["counts"].get("filtered:toxic", 0) >= 1
    written = [i for i, o in outcomes.items() if o == ("written", None)]
    assert set(written) <= set(range(len(served)))
    assert all(outcomes[i][0] in ("failed", "filtered") for i in range(len(served), 1000))
    assert all(url.startswith(server.url) for url in rewritten.column("URL").to_pylist())


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Fails the first request for each path with a 503, then serves the toy image."""

    seen: set[str] = set()
    image: bytes = b""

    def do_GET(self):  # noqa: N802 - stdlib name
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        if self.path not in self.seen:
            self.seen.add(self.path)
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args):
        pass


def test_retry_failed_fetches_only_the_failed_rows_again(world, tmp_path):
    root, _ = world
    _Flaky.image = next((root / "files" / "images").glob("img*.jpg")).read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/a.jpg", f"{base}/b.jpg", f"{base}/missing.jpg"]
        meta = tmp_path / "meta.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": ["a red circle"] * 3, "WIDTH": [64] * 3,
                                 "HEIGHT": [64] * 3}), meta)
        out = tmp_path / "out"
        first = build_image_dataset([str(meta)], str(out), IMAGES, POLICY)
        assert first["counts"] == {"failed:http_404": 1, "failed:http_error": 2}
        again = build_image_dataset([str(meta)], str(out), IMAGES, POLICY, retry_failed=True)
        assert again["counts"] == {"failed:http_404": 1, "written": 2}
        assert again["egress"]["retried"] == 3
        outcomes = _outcomes(out)
        assert [outcomes[i][0] for i in range(3)] == ["written", "written", "failed"]
        keys = _keys(out)
        assert len(keys) == len(set(keys)) == 2  # the failed attempts left no sample behind
        # A plain rerun keeps the retried outcomes (resume never goes backwards).
        assert build_image_dataset([str(meta)], str(out), IMAGES, POLICY)["counts"] == again["counts"]
    finally:
        server.shutdown()
        server.server_close()


def kill_after_first_shard(args: list[str], out: Path) -> None:
    """Run `python -c *args` in its own process group and SIGKILL the group once a shard of `out` is done."""
    proc = subprocess.Popen([sys.executable, "-c", *args], start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 240
    while not list((out / "shards").glob("*_stats.json")):
        assert proc.poll() is None, "the flow ended before it could be killed"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()


DNS_DRIVER = """
import sys
from pipelines.config import LOOPBACK_HOST_RATE, ImageDataConfig
from pipelines.flows.images import build_image_dataset
from pipelines.safety import HostsFile, UrlPolicy

policy = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=2.0, max_bytes=2**20,
                   host_rate=LOOPBACK_HOST_RATE)
cfg = ImageDataConfig(image_size=32, samples_per_shard=4, processes=1, threads=2, retries=0, batch_rows=16)
build_image_dataset([sys.argv[1]], sys.argv[2], cfg, policy, resolve=HostsFile(sys.argv[3]))
"""


def _plan_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "_work").glob("plan*/**/*.parquet"))}


@pytest.mark.slow
def test_dns_changes_between_a_kill_and_the_resume_move_no_row(world, tmp_path):
    """Rows on named hosts (answered by a hosts file, never DNS). SIGKILL after a shard is done, then
    change the answers: a host that was allowed now points at a private address, a refused one at
    loopback. The resume keeps the saved plan (no host is asked again for a decision), and every row
    still ends in exactly one outcome: none lost, none duplicated, shard samples matching counts."""
    root, server = world
    port = server.url.rsplit(":", 1)[1]
    table = pq.read_table(root / "laion.parquet")
    urls = [u.replace(f"127.0.0.1:{port}", f"h{i % 4}.test:{port}") for i, u in enumerate(table["URL"].to_pylist())]
    meta, out, hosts = tmp_path / "named.parquet", tmp_path / "out", tmp_path / "hosts.json"
    pq.write_table(table.set_column(table.schema.get_field_index("URL"), "URL", pa.array(urls)), meta)
    hosts.write_text(json.dumps({"h0.test": ["127.0.0.1"], "h1.test": ["127.0.0.1"], "h2.test": ["127.0.0.1"],
                                 "h3.test": ["10.0.0.1"]}))
    kill_after_first_shard([DNS_DRIVER, str(meta), str(out), str(hosts)], out)
    plan = _plan_files(out)
    assert any("to_download" in name for name in plan) and any("refused" in name for name in plan)
    hosts.write_text(json.dumps({"h0.test": ["127.0.0.1"], "h1.test": ["10.0.0.7"], "h2.test": ["127.0.0.1"],
                                 "h3.test": ["127.0.0.1"]}))
    asked: list[str] = []

    def resolve(host: str) -> list[str]:
        asked.append(host)
        return HostsFile(str(hosts))(host)

    cfg = IMAGES.model_copy(update={"samples_per_shard": 4, "threads": 2, "batch_rows": 16})
    manifest = build_image_dataset([str(meta)], str(out), cfg, POLICY, resolve=resolve)
    assert _plan_files(out) == plan  # the plan was not written again
    assert "h3.test" not in asked  # deciding again would have asked for it; only the gate asked for hosts
    outcomes = pq.read_table(out / "outcomes.parquet")
    assert sorted(outcomes["row_id"].to_pylist()) == list(range(len(urls)))  # none lost, none twice
    got = _outcomes(out)
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas().query("source == 'laion'")
    for row in truth.itertuples():
        expected = EXPECTED[row.expected]
        if row.row % 4 == 3 and expected[0] != "filtered":  # refused by the plan, whatever DNS says now
            assert got[row.row] == ("failed", "refused"), row
        elif row.row % 4 == 1 and expected[0] != "filtered":  # fetched before the kill, or refused by the gate
            assert got[row.row] in (expected, ("failed", "refused")), row
        else:
            assert got[row.row] == expected, row
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == manifest["counts"]["written"] == sum(s["samples"] for s in manifest["shards"])
    assert manifest["rows"] == len(urls) and sum(manifest["counts"].values()) == len(urls)
    # The change bit: rows of the host now pointing at 10.0.0.7 that were still to fetch were refused by the gate.
    assert any(got[r.row] == ("failed", "refused") and EXPECTED[r.expected] == ("written", None)
               for r in truth.itertuples() if r.row % 4 == 1)


def test_hosts_are_resolved_once_each_concurrently_in_a_bounded_cache():
    calls: list[str] = []
    gate = threading.Barrier(4, timeout=5)

    def resolve(host: str) -> list[str]:
        calls.append(host)
        if host.startswith("w"):
            gate.wait()  # four lookups must be in flight at once to pass
        if host == "gone.test":
            raise OSError("no such host")
        return ["127.0.0.1"] if host.startswith(("w", "a")) else ["10.0.0.1"]

    cache = HostCache(resolve, maxsize=3, workers=8)
    urls = [f"http://w{i}.test/x.jpg" for i in range(4)] * 3 + ["http://gone.test/a", "http://127.0.0.1/b"]
    reasons = decide_urls(urls, POLICY, cache=cache)
    assert reasons[:12] == [None] * 12 and "cannot resolve" in reasons[12] and reasons[13] is None
    assert sorted(calls) == sorted({f"w{i}.test" for i in range(4)} | {"gone.test"})  # once per name, no IP literal
    assert len(cache.answers) == 3  # bounded: the oldest answers left
    assert decide_urls(["http://p.test/x"], POLICY, cache=cache)[0].startswith("private")


ODD_URLS = [
    "http://10.0.0.1/a.jpg", "http://[::ffff:7f00:1]/", "http://2130706433:8000/x", "http://0x7f.2/", "http://127.1/",
    "http://1.2.3.4.5/", "ftp://example.com/a.jpg", "file:///etc/passwd", "//example.com/a.jpg", "http:///a.jpg",
    "http://exa mple.com/", "http://a.com\\@127.0.0.1/", "http://example.com:99999/", "http://ex%41mple.com/",
    "HTTP://127.0.0.1:80/a", "http://127.0.0.1:80/a\tb", "http://127.0.0.1/\u3000x", "http://user@127.0.0.1/a?q#f",
    "http://bücher.test/a", "http://w0.test/a", "http://W0.TEST/b", "http://gone.test/", "mailto:a@b", "", "http:",
    "http://127.0.0.1:8123/a.jpg", "http://127.0.0.2:8123/a.jpg", "http://[fe80::1%25eth0]/", "http://a.test:0x50/",
]


def test_batched_decisions_equal_check_url_on_every_odd_url():
    """Decisions grouped by scheme://authority must be exactly what check_url says URL by URL."""
    hosts = {"w0.test": ["127.0.0.1"], "xn--bcher-kva.test": ["10.1.1.1"]}

    def resolve(host: str) -> list[str]:
        if host not in hosts:
            raise OSError(f"unknown host {host}")
        return hosts[host]

    expected = [None if d.allowed else d.reason for d in (check_url(u, POLICY, resolve) for u in ODD_URLS)]
    assert decide_urls(ODD_URLS * 2, POLICY, resolve) == expected * 2
    # A run's cache far smaller than a batch's distinct hosts: what it lets go is decided again, never allowed.
    cache = HostCache(resolve, maxsize=2)
    for _ in range(3):
        assert decide_urls(ODD_URLS, POLICY, cache=cache) == expected
    assert None in expected and expected.count(None) < len(expected)  # both kinds are in the list


def test_metadata_with_other_column_names_is_mapped_and_bad_files_are_one_line(tmp_path, capsys):
    """LAION-style parquet with lowercase url/caption (and other score names) reads through the mapping;
    every row ends in one outcome (all refused or filtered here: nothing is fetched)."""
    meta = tmp_path / "coyo.parquet"
    pq.write_table(pa.table({"url": ["http://10.0.0.1/a.jpg", "http://10.0.0.2/b.jpg", "http://10.0.0.3/c.jpg"],
                             "caption": ["a red circle", None, "a blue square"], "nsfw_score": [0.1, 0.1, 0.9]}), meta)
    cfg = IMAGES.model_copy(update={"url_col": "url", "caption_col": "caption", "punsafe_col": "nsfw_score"})
    manifest = build_image_dataset([str(meta)], str(tmp_path / "out"), cfg, POLICY)
    assert _outcomes(tmp_path / "out") == {0: ("failed", "refused"), 1: ("filtered", "no_text"),
                                           2: ("filtered", "nsfw")}
    assert manifest["rows"] == 3 and manifest["shards"] == []
    # The same file under LAION's names (URL, TEXT): lowercase `url` matches, `caption` does not.
    with pytest.raises(MetadataError, match=r"coyo\.parquet: no column 'TEXT'"):
        build_image_dataset([str(meta)], str(tmp_path / "other"), IMAGES, POLICY)
    from pipelines.cli import main

    broken, texty = tmp_path / "broken.parquet", tmp_path / "texty.parquet"
    broken.write_bytes(b"url,caption\nhttp://x/a.jpg,a\n")
    pq.write_table(pa.table({"URL": ["http://10.0.0.1/a"], "TEXT": ["a"], "punsafe": ["high"]}), texty)
    cases = {str(broken): "cannot read it as parquet", str(tmp_path / "missing.parquet"): "no such file",
             str(texty): "column 'punsafe' (punsafe) holds string, not numbers", str(meta): "no column 'TEXT'"}
    for path, message in cases.items():
        assert main(["data", "images", path, "--out", str(tmp_path / "cli"), "--url-col", "url"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path in err and message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_rows_a_host_defers_are_fetched_in_later_rounds_and_never_dropped(tmp_path):
    """A host that answers 429 (Retry-After: 1) past 4 requests a second: the rows it defers are
    fetched again in a later round, after the pause; a row still deferred after the last round ends
    `rate_limited`. Every row ends once, nothing is lost or written twice."""
    from test_gates import Origin  # the loopback origin of the gate tests

    origin = Origin(allow=4)
    try:
        rows = 12
        meta, out = tmp_path / "meta.parquet", tmp_path / "out"
        pq.write_table(pa.table({"URL": [origin.url(f"/img/{i}.jpg") for i in range(rows)],
                                 "TEXT": ["a red square"] * rows, "WIDTH": [64] * rows, "HEIGHT": [64] * rows}), meta)
        cfg = IMAGES.model_copy(update={"threads": 4, "deferred_rounds": 1, "deferred_wait_s": 1.1})
        manifest = build_image_dataset([str(meta)], str(out), cfg, POLICY.model_copy(update={"host_rate": 10.0}))
    finally:
        origin.close()
    outcomes = _outcomes(out)
    assert sorted(outcomes) == list(range(rows)) and manifest["rows"] == rows
    assert set(outcomes.values()) <= {("written", None), ("failed", "rate_limited")}
    assert manifest["egress"]["deferred_rounds"] == 1 and any(status == 429 for _, _, status in origin.log)
    first, later = (pq.read_table(out / "shards" / f"{n}.parquet").to_pylist() for n in ("00000", "00001"))
    deferred = {r["row_id"] for r in first if r["status"] != "success"}
    assert deferred and {r["row_id"] for r in later} == deferred  # each deferred row was fetched again
    assert any(r["status"] == "success" for r in later)
    still = {i for i, o in outcomes.items() if o == ("failed", "rate_limited")}
    assert still == {r["row_id"] for r in later if r["status"] != "success"}
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == manifest["counts"]["written"] == rows - len(still)
