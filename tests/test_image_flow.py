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

from pipelines.config import ImageDataConfig
from pipelines.flows.images import build_image_dataset
from pipelines.manifest import ManifestError
from pipelines.safety import UrlPolicy

# What each ground-truth category must become: (status, reason).
EXPECTED = {
    "ok": ("written", None), "nsfw": ("filtered", "nsfw"), "watermark": ("filtered", "watermark"),
    "toxic": ("filtered", "toxic"), "too_small": ("filtered", "too_small"), "http_404": ("failed", "http_404"),
    "corrupt": ("failed", "corrupt"), "slow": ("failed", "timeout"),
}
POLICY = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=2.0, max_bytes=2**20)
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


class _Canary(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - stdlib name
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_refused_addresses_never_receive_a_packet(world, tmp_path):
    root, server = world
    canary = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Canary)
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
        assert _Canary.hits == []
        assert any("127.0.0.2" in url for url, _ in manifest["egress"]["refused"])  # refused at the redirect
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


KILL_DRIVER = """
import sys
from pipelines.config import ImageDataConfig
from pipelines.flows.images import build_image_dataset
from pipelines.safety import UrlPolicy

policy = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=2.0, max_bytes=2**20)
cfg = ImageDataConfig(image_size=32, samples_per_shard=8, processes=1, threads=2, retries=0)
build_image_dataset([sys.argv[1]], sys.argv[2], cfg, policy)
"""


def test_a_real_kill_mid_flow_then_resume_matches_an_uninterrupted_run(world, tmp_path):
    """SIGKILL the flow's process group once the first shard is done; the rerun finishes the job and
    ends exactly where an uninterrupted run ends (same outcomes, same samples, no duplicates)."""
    root, _ = world
    meta, out = str(root / "laion.parquet"), tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, meta, str(out)], start_new_session=True,
                            cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 240
    while not list((out / "shards").glob("*_stats.json")):
        assert proc.poll() is None, "the flow ended before it could be killed"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    cfg = IMAGES.model_copy(update={"samples_per_shard": 8, "threads": 2})
    resumed = build_image_dataset([meta], str(out), cfg, POLICY)
    clean = build_image_dataset([meta], str(tmp_path / "clean"), cfg, POLICY)
    assert resumed["counts"] == clean["counts"]
    assert _outcomes(out) == _outcomes(tmp_path / "clean")
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == clean["counts"]["written"]
