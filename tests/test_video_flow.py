"""The video data flow for real: video2dataset, ffmpeg and HTTP on 127.0.0.1, one outcome per row.

The tiny world's WebVid rows and HD-VILA clips end where its ground truth says; the real WebVid CSV
is fetched from a loopback mirror only; real clips are cut to their spans; a killed shard is redone.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import shutil
import subprocess
import tarfile
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import decord
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.config import LOOPBACK_HOST_RATE, VideoDataConfig
from pipelines.flows.videos import build_video_dataset, read_sources, video_data
from pipelines.manifest import ManifestError
from pipelines.safety import UrlPolicy
from pipelines.videos.download import RATE_LIMIT_ROUNDS, make_worker
from pipelines.videos.readers import rewritten_path
from pipelines.world import generate_world, rebase_world, serve_world, world_preset
from training.data import VideoDecoder, stage_batches
from training.lineage import text_fields
from training.stages import VideoView

pytestmark = pytest.mark.slow
LOOPBACK = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=3.0, host_rate=LOOPBACK_HOST_RATE)
CFG = VideoDataConfig(clip_size=32, samples_per_shard=4, processes=2)
# The world's category (and, for bad spans, its detail) -> the outcome the flow must record.
EXPECTED = {"ok": ("written", None), "http_404": ("failed", "http_404"), "corrupt": ("failed", "corrupt"),
            "html": ("failed", "html"), "slow": ("failed", "timeout"),
            "end_before_start": ("filtered", "bad_span"), "past_end": ("failed", "span_past_end")}


# --- helpers ---------------------------------------------------------------------------------


class _Quiet(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


class _Mirror:
    """A static file server on 127.0.0.1 (a free port) with the list of requested paths."""

    def __init__(self, root: Path) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        self.server.paths = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def paths(self) -> list[str]:
        return self.server.paths  # type: ignore[attr-defined]

    def __enter__(self) -> "_Mirror":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _samples(out: Path, manifest: dict) -> list[dict]:
    """Every sample of every shard in the manifest, read with webdataset."""
    samples = []
    for shard in manifest["shards"]:
        samples += list(wds.WebDataset(str(out / shard["name"]), shardshuffle=False, empty_check=False))
    return samples


def _decode(mp4: bytes) -> tuple[tuple[int, ...], float]:
    reader = decord.VideoReader(io.BytesIO(mp4))
    return reader.get_batch(list(range(len(reader)))).shape, reader.get_avg_fps()


def _outcomes(out: Path) -> list[dict]:
    """Every outcome part of the dataset, in row order."""
    return pq.read_table(out / "outcomes.parquet").sort_by("row_id").to_pylist()


def _source_urls(out: Path) -> dict[str, str]:
    """Sample key -> the URL it was fetched from: kept in each shard's parquet, not in the tar."""
    return {r["key"]: r["url"] for p in sorted((out / "shards").glob("*.parquet"))
            for r in pq.read_table(p, columns=["key", "url"]).to_pylist()}


def _check_shards(out: Path, manifest: dict, size: int) -> list[dict]:
    """Shards hold exactly the written rows, as .mp4 + .json with no text, decodable at `size`."""
    samples = _samples(out, manifest)
    written = {r["sample_key"]: r for r in _outcomes(out) if r["status"] == "written"}
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == len(written) == manifest["counts"].get("written", 0)
    assert set(keys) == set(written)
    for sample in samples:
        assert {k for k in sample if not k.startswith("__")} == {"mp4", "json"}  # no .txt, no .caption
        meta = json.loads(sample["json"])
        assert not {"caption", "txt", "name", "text", "url"} & set(meta)  # the URL stays in outcomes.parquet
        assert list(text_fields(meta)) == []
        assert meta["row_id"] == written[sample["__key__"]]["row_id"]
        shape, _ = _decode(sample["mp4"])
        assert shape == (meta["frames"], size, size, 3)
    return samples


# --- the tiny world --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, world_preset("tiny"))
    with serve_world(root, port=0) as server:
        rebase_world(root, server.url)
        yield root, server


@pytest.fixture(scope="module")
def world_build(world, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root, _ = world
    out = tmp_path_factory.mktemp("videos") / "v1"
    sources = [("webvid", str(root / "webvid.csv")), ("hdvila", str(root / "hdvila.jsonl"))]
    # Metadata in batches of 8 rows: several jobs files, shards numbered on across them.
    return out, build_video_dataset(sources, str(out), CFG, LOOPBACK, distributor="local", batch_rows=8)


def _expected_by_row(root: Path) -> list[tuple[str, tuple[str, str | None]]]:
    """(ground-truth category, expected outcome) in the flow's row order: WebVid rows, then HD-VILA clips."""
    truth = pq.read_table(root / "ground_truth.parquet").to_pylist()
    webvid = sorted((r for r in truth if r["source"] == "webvid"), key=lambda r: r["row"])
    clips = [r for r in truth if r["source"] == "hdvila"]  # in file order, clips in span order
    return [(r["expected"], EXPECTED[r["detail"] if r["expected"] == "bad_span" else r["expected"]])
            for r in webvid + clips]


def test_every_world_row_ends_as_its_ground_truth_says(world, world_build):
    root, _ = world
    out, manifest = world_build
    rows = read_sources([("webvid", str(root / "webvid.csv")), ("hdvila", str(root / "hdvila.jsonl"))])
    outcomes = _outcomes(out)
    expected = _expected_by_row(root)
    assert [r["row_id"] for r in outcomes] == list(range(len(rows))) and len(outcomes) == len(expected)
    assert [r["key"] for r in outcomes] == rows["key"].to_pylist()
    assert {c for c, _ in expected} >= {"ok", "http_404", "corrupt", "html", "slow", "bad_span"}
    for (category, (status, reason)), got in zip(expected, outcomes):
        assert (got["status"], got["reason"]) == (status, reason), (category, got)
        assert (got["shard"] is not None) == (status == "written")
    assert manifest["kind"] == "videos" and manifest["rows"] == manifest["input_rows"] == len(rows)
    assert sum(manifest["counts"].values()) == len(rows)
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["counts"]["written"]
    assert len(manifest["shards"]) >= 2  # samples_per_shard=4: several shards
    jobs = sorted((out / "_work" / "jobs").glob("*.parquet"))
    assert len(jobs) >= 2 and [int(p.stem) for p in jobs][0] == 0
    parts = {p.stem for p in (out / "outcomes.parquet").glob("*.parquet")}
    assert {f"shard-{Path(s['name']).stem}" for s in manifest["shards"]} <= parts  # a part per shard
    assert manifest["egress"]["refused"]["count"] == 0
    assert manifest["egress"]["hosts"] == [world[1].url.split("//", 1)[1]]


def test_world_shards_hold_mp4_clips_at_clip_size_and_no_text(world, world_build):
    out, manifest = world_build
    samples = _check_shards(out, manifest, CFG.clip_size)
    truth = pq.read_table(world[0] / "ground_truth.parquet").to_pylist()
    seconds = {r["url"]: r["duration"] for r in truth if r["source"] == "webvid"}
    url = _source_urls(out)
    for sample in samples:
        meta = json.loads(sample["json"])
        if not meta["clips"]:  # a whole WebVid video keeps every frame (24 fps in the world)
            assert meta["frames"] == round(seconds[url[sample["__key__"]]] * 24)


def test_a_stage_selects_clips_by_the_dataset_each_clip_records(world_build):
    """WebVid videos are whole (no span), HD-VILA clips cut spans; a stage configured for one dataset
    decodes only that dataset's clips, the other's are skipped before decoding."""
    out, manifest = world_build
    samples = _samples(out, manifest)
    by_dataset = Counter(json.loads(s["json"])["dataset"] for s in samples)
    assert set(by_dataset) == {"webvid", "hdvila"}
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["dataset"] == ("hdvila" if meta["clips"] else "webvid")
    view, rng = VideoView(size=16, frames=4), np.random.default_rng(0)
    for wanted in (("webvid",), ("hdvila",), ("webvid", "hdvila")):
        decode = VideoDecoder(str(out), view, datasets=wanted)
        read = Counter(json.loads(s["json"])["dataset"] for s in samples if decode(s, rng, 0.0) is not None)
        assert read == Counter({d: n for d, n in by_dataset.items() if d in wanted})
    batch = next(stage_batches(str(out), view, global_batch=2, rank=0, world=1, seed=0, total_steps=1,
                               video_datasets=("hdvila",)))
    assert batch["video"].shape == (2, 3, 4, 16, 16)


def test_kill_mid_shard_then_resume(world, world_build, tmp_path):
    _, server = world
    first_out, first = world_build
    out = tmp_path / "resumed"
    shutil.copytree(first_out, out)
    shards = out / "shards"
    victim = next(Path(s["name"]).stem for s in first["shards"][1:] if s["samples"])  # a shard with clips
    (shards / f"{victim}_stats.json").unlink()
    tar = shards / f"{victim}.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # as if killed while writing
    before = len(server.request_log)
    sources = [("webvid", str(world[0] / "webvid.csv")), ("hdvila", str(world[0] / "hdvila.jsonl"))]
    again = build_video_dataset(sources, str(out), CFG, LOOPBACK, distributor="multiprocessing", batch_rows=8)
    assert _outcomes(out) == _outcomes(first_out)
    assert again["counts"] == first["counts"] and again["rows"] == first["rows"]
    assert [(s["name"], s["samples"]) for s in again["shards"]] == [(s["name"], s["samples"]) for s in first["shards"]]
    names = [m for p in sorted(shards.glob("*.tar")) for m in tarfile.open(p).getnames()]
    assert len(names) == len(set(names))
    _check_shards(out, again, CFG.clip_size)
    # Only the killed shard was fetched again.
    redone = {r["key"] for r in _outcomes(out) if r["shard"] == f"{victim}.tar"}
    assert redone and len(server.request_log) > before
    url = _source_urls(out)
    others = {url[s["__key__"]].split("//", 1)[1].split("/", 1)[1]
              for s in _samples(out, again) if not s["__url__"].endswith(f"{victim}.tar")}
    assert not {p.lstrip("/") for p in server.request_log[before:]} & others
    with pytest.raises(ManifestError, match="settings"):
        build_video_dataset(sources, str(out), CFG.model_copy(update={"clip_size": 16}), LOOPBACK)


def test_refused_before_any_connection_and_on_a_redirect(world, tmp_path):
    _, server = world
    good = "/files/videos/1000002.mp4"
    off_list = f"http://127.0.0.2:{server.url.rsplit(':', 1)[1]}{good}"  # loopback, but not 127.0.0.1/32
    urls = [f"http://10.1.2.3{good}",  # refused by the decision step: never requested
            f"{server.url}/redirect?to={off_list}",  # the redirect's hop is refused by the proxy
            f"{server.url}/redirect?to={good}"]
    csv_path = tmp_path / "webvid.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        writer.writerows([i + 1, "a caption", 1, "000001_000050", "PT00H00M04S", url] for i, url in enumerate(urls))
    before = len(server.request_log)
    manifest = build_video_dataset([("webvid", str(csv_path))], str(tmp_path / "out"), CFG, LOOPBACK)
    got = [(o["status"], o["reason"]) for o in _outcomes(tmp_path / "out")]
    assert got == [("failed", "refused"), ("failed", "refused"), ("written", None)]
    assert manifest["egress"]["refused"]["count"] == 1
    assert [url for url, _ in manifest["egress"]["refused"]["sample"]] == [off_list]
    assert sorted(server.request_log[before:]) == sorted([urls[1][len(server.url):], urls[2][len(server.url):], good])
    _check_shards(tmp_path / "out", manifest, CFG.clip_size)


# --- the real files --------------------------------------------------------------------------


def _excerpt(src: Path, dst: Path, seconds: float) -> None:
    """The first seconds of a real video, stream-copied (a whole 2-minute 1080p file costs ~20 s to scale)."""
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(src), "-t", str(seconds), "-c", "copy",
                    str(dst)], check=True)


def test_real_webvid_rows_fetched_only_from_the_loopback_mirror(shared_data, tmp_path):
    csv_path = shared_data / "test_webvid.csv"
    rows = read_sources([("webvid", str(csv_path))]).to_pylist()
    mirror_root = tmp_path / "mirror"
    (mirror_root / "rewritten").mkdir(parents=True)
    served = [rows[i]["url"] for i in (0, 7, 13)]
    _excerpt(shared_data / "test_video.mp4", tmp_path / "excerpt.mp4", 2.0)
    for url in served:
        shutil.copy(tmp_path / "excerpt.mp4", mirror_root / rewritten_path(url).lstrip("/"))
    out = tmp_path / "webvid"
    with _Mirror(mirror_root) as mirror:
        manifest = video_data.fn([["webvid", str(csv_path)]], str(out), preset="tiny", rewrite_base=mirror.url,
                                 overrides=["data.videos.clip_size=32", "data.videos.processes=1"])
    network = manifest["settings"]["network"]
    assert network["allow_public"] is False and network["allow_networks"] == ["127.0.0.1/32"]
    assert manifest["egress"]["hosts"] == [mirror.url.split("//", 1)[1]] and manifest["egress"]["refused"]["count"] == 0
    assert sorted(mirror.paths) == sorted(rewritten_path(r["url"]) for r in rows)  # each row fetched once, here
    outcomes = _outcomes(out)
    assert [o["key"] for o in outcomes] == [r["key"] for r in rows]
    for row, got in zip(rows, outcomes):
        want = ("written", None) if row["url"] in served else ("failed", "http_404")
        assert (got["status"], got["reason"]) == want, got
    assert manifest["counts"] == {"failed:http_404": len(rows) - 3, "written": 3}
    _check_shards(out, manifest, 32)


def test_real_video_cut_into_hdvila_spans(shared_data, tmp_path):
    mirror_root = tmp_path / "mirror"
    mirror_root.mkdir()
    shutil.copy(shared_data / "test_video.mp4", mirror_root / "real.mp4")
    spans = {"a": ("00:00:02.000", "00:00:04.500"), "b": ("00:00:30.250", "00:00:33.000"),
             "c": ("00:00:03.000", "00:00:05.000"),  # overlaps a: a second pass over the same video
             "d": ("00:02:00.000", "00:02:10.000")}  # past the end (122.7 s)
    jsonl = tmp_path / "hdvila.jsonl"
    out = tmp_path / "clips"
    with _Mirror(mirror_root) as mirror:
        record = {"video_id": "real0", "url": f"{mirror.url}/real.mp4",
                  "clip": [{"clip_id": k, "span": list(v)} for k, v in spans.items()]}
        jsonl.write_text(json.dumps(record) + "\n")
        manifest = build_video_dataset([("hdvila", str(jsonl))], str(out), VideoDataConfig(clip_size=32), LOOPBACK)
    outcomes = _outcomes(out)
    assert [(o["status"], o["reason"]) for o in outcomes] == [("written", None)] * 3 + [("failed", "span_past_end")]
    assert manifest["counts"] == {"failed:span_past_end": 1, "written": 3}
    by_key = {s["__key__"]: s for s in _check_shards(out, manifest, 32)}
    for outcome, (start, end) in zip(outcomes[:3], [(2.0, 4.5), (30.25, 33.0), (3.0, 5.0)]):
        shape, fps = _decode(by_key[outcome["sample_key"]]["mp4"])
        assert abs(shape[0] / fps - (end - start)) <= 2.0 / fps, (outcome, shape, fps)
        assert json.loads(by_key[outcome["sample_key"]]["json"])["clips"] == [[start, end]]


def test_ray_distributor_runs_each_shard_as_a_task(world, tmp_path, ray_session):
    root, _ = world
    sources = [("webvid", str(root / "webvid.csv")), ("hdvila", str(root / "hdvila.jsonl"))]
    manifest = build_video_dataset(sources, str(tmp_path / "ray"), CFG, LOOPBACK, distributor="ray")
    expected = Counter(f"{s}:{r}" if r else s for _, (s, r) in _expected_by_row(root))
    assert manifest["counts"] == dict(expected)
    _check_shards(tmp_path / "ray", manifest, CFG.clip_size)


def test_building_leaves_decord_returning_its_own_arrays(shared_data, tmp_path):
    """video2dataset flips decord's bridge to torch when its dataloader is imported; building the
    download worker puts it back (evaluation and generation read frames with `.asnumpy()` in the same
    process as the flow)."""
    decord.bridge.set_bridge("torch")  # what importing video2dataset.dataloader does
    make_worker(str(tmp_path / "shards"), ["url", "row_id"], clip_size=32, samples_per_shard=4, threads=1,
                timeout_s=1.0, max_bytes=1000, proxy_url="http://127.0.0.1:9", tmp_dir=str(tmp_path))
    batch = decord.VideoReader(str(shared_data / "test_video.mp4")).get_batch([0])
    assert hasattr(batch, "asnumpy")


class _FlakyVideo(SimpleHTTPRequestHandler):
    """A 503 on the first request for each path, the file on later ones."""

    def do_GET(self) -> None:
        seen = self.server.seen  # type: ignore[attr-defined]
        if self.path not in seen and not self.path.startswith("/missing"):
            seen.add(self.path)
            self.send_error(503)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


def test_retry_failed_fetches_only_the_failed_downloads_again(world, tmp_path):
    root, _ = world
    files = tmp_path / "files"
    files.mkdir()
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas()
    good = truth[(truth.source == "webvid") & (truth.expected == "ok")].url_path.iloc[0]
    shutil.copy(root / good.lstrip("/"), files / "a.mp4")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_FlakyVideo, directory=str(files)))
    server.seen = set()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        meta = tmp_path / "webvid.parquet"  # WebVid as parquet, as most copies circulate
        pq.write_table(pa.table({"videoid": [1, 2], "contentUrl": [f"{base}/a.mp4", f"{base}/missing.mp4"],
                                 "duration": ["PT00H00M04S"] * 2}), meta)
        out = tmp_path / "out"
        first = build_video_dataset([("webvid", str(meta))], str(out), CFG, LOOPBACK, distributor="local")
        assert first["counts"] == {"failed:http_404": 1, "failed:http_error": 1}
        again = build_video_dataset([("webvid", str(meta))], str(out), CFG, LOOPBACK, distributor="local",
                                    retry_failed=True)
        assert again["counts"] == {"failed:http_404": 1, "written": 1}
        assert again["egress"]["retried"] == 2
        keys = [s["__key__"] for s in _samples(out, again)]
        assert len(keys) == len(set(keys)) == 1
    finally:
        server.shutdown()
        server.server_close()


class _Limited(SimpleHTTPRequestHandler):
    """429 (Retry-After: 0) for the first `limits[name]` requests of a file, then the file; every
    request counted by path."""

    def do_GET(self) -> None:
        hits = self.server.hits  # type: ignore[attr-defined]
        hits[self.path] = hits.get(self.path, 0) + 1
        if hits[self.path] <= self.server.limits.get(self.path, 0):  # type: ignore[attr-defined]
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


def test_rate_limited_rows_are_fetched_again_in_later_rounds_never_dropped(world, tmp_path):
    """A host answering 429: the row is deferred and fetched in a later round; a row still refused
    after the last round ends `failed: rate_limited`. Every row one outcome, one sample per written row."""
    root, _ = world
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas()
    good = truth[(truth.source == "webvid") & (truth.expected == "ok")].url_path.iloc[0]
    files = tmp_path / "files"
    files.mkdir()
    for name in ("once", "twice", "always", "never"):
        shutil.copy(root / good.lstrip("/"), files / f"{name}.mp4")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Limited, directory=str(files)))
    server.hits, server.limits = {}, {"/once.mp4": 1, "/twice.mp4": 2, "/always.mp4": 99}  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        csv_path = tmp_path / "webvid.csv"
        csv_path.write_text("videoid,contentUrl\n" + "".join(
            f"{i},{base}/{name}.mp4\n" for i, name in enumerate(("once", "twice", "always", "never"))))
        out = tmp_path / "out"
        policy = LOOPBACK.model_copy(update={"backoff_s": 0.0})
        manifest = build_video_dataset([("webvid", str(csv_path))], str(out), CFG, policy, distributor="local")
        got = [(o["row_id"], o["status"], o["reason"]) for o in _outcomes(out)]
        assert got == [(0, "written", None), (1, "written", None), (2, "failed", "rate_limited"), (3, "written", None)]
        hits = server.hits  # type: ignore[attr-defined]
        assert hits == {"/once.mp4": 2, "/twice.mp4": 3, "/always.mp4": 1 + RATE_LIMIT_ROUNDS, "/never.mp4": 1}
        assert manifest["counts"] == {"failed:rate_limited": 1, "written": 3}
        assert manifest["egress"]["deferred_again"] == 3 + 2 + 1  # rows asked for again over the 3 rounds
        keys = [s["__key__"] for s in _samples(out, manifest)]
        assert len(keys) == len(set(keys)) == 3
    finally:
        server.shutdown()
        server.server_close()
