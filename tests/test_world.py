"""The toy world: deterministic, in the real formats, and served exactly as its ground truth says."""
from __future__ import annotations

import io
import json
import re
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.world import (WorldConfig, WorldSummary, generate_world, rebase_urls, rebase_world, serve_world,
                             world_preset)
from pipelines.world.config import CATEGORIES, LAION_BAD, TOXIC_SAMPLE, WEBVID_BAD
from pipelines.world.shapes import HALF_EXTENT
from pipelines.world.videos import DIRECTIONS, sample_motion, trajectory

SPAN = re.compile(r"^\d\d:\d\d:\d\d\.\d\d\d$")


def _seconds(span: str) -> float:
    h, m, s = span.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> WorldSummary:
    return generate_world(tmp_path_factory.mktemp("world"), world_preset("tiny"))


@pytest.fixture(scope="module")
def world(summary) -> Path:
    return summary.root


@pytest.fixture(scope="module")
def truth(world) -> pd.DataFrame:
    return pq.read_table(world / "ground_truth.parquet").to_pandas()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_presets_and_validation():
    assert set(world_preset("tiny").model_dump()) == set(WorldConfig.model_fields)
    toy = world_preset("toy")
    assert toy.n_images >= 1000 and toy.n_videos >= 100 and world_preset("paper").n_images > toy.n_images
    with pytest.raises(ValueError, match="unknown world preset"):
        world_preset("huge")
    with pytest.raises(ValueError, match="even"):
        WorldConfig(video_size=65)
    with pytest.raises(ValueError, match="trailing slash"):
        WorldConfig(base_url="http://127.0.0.1:8765/")
    with pytest.raises(ValueError, match="shapes"):
        WorldConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match="cannot hold"):
        WorldConfig(n_images=5)


def test_same_seed_same_bytes(world, tmp_path):
    again = generate_world(tmp_path, world_preset("tiny"))
    assert _files(again.root) == _files(world)  # images, videos and truth included
    with pytest.raises(FileExistsError):
        generate_world(tmp_path, world_preset("tiny"))
    (tmp_path / "notes.txt").write_text("kept")
    generate_world(tmp_path, world_preset("tiny").model_copy(update={"seed": 1}), overwrite=True)
    other = _files(tmp_path)
    assert other.pop("notes.txt") == b"kept"
    assert other["laion.parquet"] != _files(world)["laion.parquet"]
    # No file of the first world survives the overwrite: a 404 row must stay a 404.
    truth = pq.read_table(tmp_path / "ground_truth.parquet").to_pandas()
    missing = truth.url_path[truth.expected == "http_404"]
    assert not any((tmp_path / p.lstrip("/")).exists() for p in missing)


def test_laion_schema(world):
    table = pq.read_table(world / "laion.parquet")
    assert table.schema.names == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "hash", "punsafe", "pwatermark"]
    assert [f.type for f in table.schema] == [pa.string(), pa.string(), pa.int64(), pa.int64(), pa.float64(),
                                               pa.int64(), pa.float32(), pa.float32()]
    assert table.column("punsafe").null_count > 0 and table.column("pwatermark").null_count > 0
    df = table.to_pandas()
    assert df.URL.str.startswith("http://127.0.0.1:8765/").all() and df.URL.is_unique
    assert ((df.similarity > 0.28) & (df.similarity < 0.5)).all() and df.hash.is_unique


def test_webvid_and_hdvila_schema(world):
    webvid = pd.read_csv(world / "webvid.csv")
    assert list(webvid.columns) == ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]
    assert webvid.videoid.dtype == np.int64 and webvid.page_idx.dtype == np.int64
    assert webvid.duration.str.fullmatch(r"PT\d\dH\d\dM\d\dS").all()
    assert webvid.contentUrl.str.startswith("http://127.0.0.1:8765/").all()
    assert webvid.name.str.len().gt(0).all()
    rows = [json.loads(line) for line in (world / "hdvila.jsonl").read_text().splitlines()]
    assert len(rows) == world_preset("tiny").n_hdvila_videos
    spans = []
    for row in rows:
        assert set(row) == {"video_id", "url", "clip"} and isinstance(row["video_id"], str)
        for k, clip in enumerate(row["clip"]):
            assert set(clip) == {"clip_id", "span"} and clip["clip_id"] == f"{row['video_id']}.{k}.mp4"
            assert len(clip["span"]) == 2 and all(SPAN.match(s) for s in clip["span"])
            spans.append([_seconds(s) for s in clip["span"]])
    assert any(end < start for start, end in spans)


def test_ground_truth_matches_metadata_and_counts(world, truth):
    summary_counts = json.loads((world / "world.json").read_text())["counts"]
    for source, counts in summary_counts.items():
        assert truth[truth.source == source].expected.value_counts().to_dict() == counts
    assert set(truth.expected) <= set(CATEGORIES)
    laion = pq.read_table(world / "laion.parquet").to_pandas()
    lt = truth[truth.source == "laion"].set_index("key").loc[laion.URL]
    assert set(LAION_BAD) <= set(lt.expected) and (lt.detail == "redirect").any()
    assert (laion.punsafe[lt.expected.values == "nsfw"] >= 0.9).all()
    assert (laion.punsafe[lt.expected.values == "ok"].dropna() < 0.1).all()
    assert (laion.pwatermark[lt.expected.values == "watermark"] > 0.5).all()
    assert (laion.pwatermark[lt.expected.values == "ok"].dropna() <= 0.3).all()
    toxic = laion.TEXT.map(lambda t: bool(set(t.split()) & set(TOXIC_SAMPLE)))
    assert (toxic.values == (lt.expected.values == "toxic")).all()
    assert (laion.WIDTH[lt.expected.values == "too_small"] < 8).all()
    webvid = pd.read_csv(world / "webvid.csv")
    wt = truth[truth.source == "webvid"].set_index("key").loc[webvid.contentUrl]
    assert set(WEBVID_BAD) <= set(wt.expected)
    ht = truth[truth.source == "hdvila"]
    assert set(ht.detail[ht.expected == "bad_span"]) == {"end_before_start", "past_end"}
    past = ht[ht.detail == "past_end"]
    assert (past.span_start > past.duration).all()


def _fetch(url: str, timeout: float = 10.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read()


def _check_image(data: bytes, row, gt) -> None:
    image = Image.open(io.BytesIO(data))
    if gt.expected == "corrupt":
        with pytest.raises(OSError):
            image.load()
        return
    assert image.size == (row.WIDTH, row.HEIGHT) == (gt.width, gt.height)
    if row.WIDTH < 8:
        return
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    config = world_preset("tiny")
    centre = pixels[int(gt.cy * gt.height), int(gt.cx * gt.width)]
    assert np.abs(centre - config.colours[gt.colour]).mean() < 30
    corner = pixels[0 if gt.cy > 0.5 else -1, 0 if gt.cx > 0.5 else -1]
    assert np.abs(corner - config.backgrounds[gt.background]).mean() < 30


def _shape_centroid(frame: np.ndarray, rgb) -> tuple[float, float]:
    mask = np.abs(frame.astype(np.float64) - np.asarray(rgb)).sum(-1) < 90
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5


def _check_video(data: bytes, world: Path, tmp_path: Path, expected: str, gt) -> None:
    decord = pytest.importorskip("decord")
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    if expected == "corrupt":
        with pytest.raises(Exception):
            decord.VideoReader(str(path))
        return
    config = world_preset("tiny")
    reader = decord.VideoReader(str(path))
    assert len(reader) == int(gt.duration) * config.video_fps
    track = json.loads((world / gt.truth).read_text())
    for i in (0, len(reader) // 2, len(reader) - 1):
        frame = reader[i].asnumpy()
        assert frame.shape == (config.video_size, config.video_size, 3)
        cx, cy = _shape_centroid(frame, config.colours[gt.colour])
        size = config.video_size
        assert abs(cx - track["frames"]["cx"][i] * size) < 1.5 and abs(cy - track["frames"]["cy"][i] * size) < 1.5


def test_every_url_is_served_as_the_ground_truth_says(world, tmp_path):
    root = tmp_path / "served"
    shutil.copytree(world, root)
    config = world_preset("tiny")
    with serve_world(root, port=0, slow_seconds=0.2) as server:
        assert rebase_world(root, server.url) == config.base_url
        truth = pq.read_table(root / "ground_truth.parquet").to_pandas()
        assert truth.url.str.startswith(server.url).all()
        for row in pq.read_table(root / "laion.parquet").to_pandas().itertuples():
            gt = truth[(truth.source == "laion") & (truth.key == row.URL)].iloc[0]
            status, kind, data = _fetch(row.URL)
            if gt.expected == "http_404":
                assert status == 404
                continue
            assert (status, kind) == (200, "image/jpeg"), gt.expected
            _check_image(data, row, gt)
        videos = [(r.contentUrl, "webvid") for r in pd.read_csv(root / "webvid.csv").itertuples()]
        videos += [(json.loads(line)["url"], "hdvila") for line in (root / "hdvila.jsonl").read_text().splitlines()]
        for url, source in videos:
            gts = truth[(truth.source == source) & (truth.url == url)]
            expected = "http_404" if (gts.expected == "http_404").all() else gts.expected.iloc[0]
            expected = "ok" if expected == "bad_span" else expected
            status, kind, data = _fetch(url)
            if expected == "http_404":
                assert status == 404
            elif expected == "html":
                assert (status, kind) == (200, "text/html") and data.lstrip().lower().startswith(b"<!doctype html")
            else:
                assert (status, kind) == (200, "video/mp4"), expected
                _check_video(data, root, tmp_path, expected, gts.iloc[0])
    assert any(p.startswith("/redirect?to=/files/") for p in server.request_log)
    assert any(p.startswith("/slow/files/") for p in server.request_log)


def test_slow_redirect_and_refusals(world):
    with serve_world(world, port=0, slow_seconds=2.0) as server:
        path = next(p.name for p in (world / "files/images").iterdir())
        with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
            urllib.request.urlopen(f"{server.url}/slow/files/images/{path}", timeout=0.5).read()
        status, kind, data = _fetch(f"{server.url}/redirect?to=/files/images/{path}")
        assert (status, kind) == (200, "image/jpeg") and data == (world / "files/images" / path).read_bytes()
        assert server.request_log[-2:] == [f"/redirect?to=/files/images/{path}", f"/files/images/{path}"]
        head = urllib.request.urlopen(urllib.request.Request(f"{server.url}/files/images/{path}", method="HEAD"))
        assert int(head.headers["Content-Length"]) == (world / "files/images" / path).stat().st_size
        assert head.read() == b""
        assert _fetch(f"{server.url}/redirect?to=http://example.com/x.jpg")[0] == 400
        assert _fetch(f"{server.url}/files/../world.json")[0] == 404
        assert _fetch(f"{server.url}/truth/{next((world / 'truth').iterdir()).name}")[0] == 404
    with pytest.raises(ValueError, match="127.0.0.0/8"):
        with serve_world(world, host="0.0.0.0", port=0):
            pass


def test_rebase_urls_kinds():
    old, new = "http://127.0.0.1:8765", "http://127.0.0.1:9"
    df = pd.DataFrame({"URL": [f"{old}/files/a.jpg", "elsewhere"], "n": [1, 2]})
    assert rebase_urls(df, old, new).URL.tolist() == [f"{new}/files/a.jpg", "elsewhere"]
    table = pa.table({"url": [f"{old}/x", None], "n": [1, 2]})
    assert rebase_urls(table, old, new).column("url").to_pylist() == [f"{new}/x", None]
    rows = [{"video_id": "v", "url": f"{old}/v.mp4", "clip": [{"clip_id": "v.0.mp4", "span": ["a", "b"]}]}]
    assert rebase_urls(rows, old, new)[0]["url"] == f"{new}/v.mp4"


def test_summary_lists_files_and_counts(summary, world):
    text = str(summary)
    assert str(world / "laion.parquet") in text and str(world / "files/videos") in text
    for source, counts in summary.counts.items():
        assert source in text and all(category in text for category in counts)
    assert summary.rows["laion"] == 40 and sum(summary.counts["laion"].values()) == 40


@pytest.mark.parametrize("motion", ["drift", "bounce", "grow", "pan"])
def test_motions_stay_in_frame_and_match_their_words(motion):
    rng = np.random.default_rng(0)
    for shape in HALF_EXTENT:
        for _ in range(20):
            params = sample_motion(rng, motion, shape, size_frac=0.19, large_frac=0.19, small_frac=0.09)
            track = trajectory(motion, params, n_frames=120, fps=24)
            reach = HALF_EXTENT[shape] * track["r"]
            for axis in ("cx", "cy"):
                assert (track[axis] - reach >= -1e-9).all() and (track[axis] + reach <= 1 + 1e-9).all()
            moved = np.array([track["cx"][-1] - track["cx"][0], track["cy"][-1] - track["cy"][0]])
            if motion in ("drift", "pan"):
                direction = np.array(DIRECTIONS[params["direction"]])
                camera = np.array([track["camera_x"][-1], track["camera_y"][-1]])
                # drift: the shape moves that way; pan: the camera does, and the shape moves against it.
                assert moved @ direction == pytest.approx(params["travel"] * (1 if motion == "drift" else -1))
                assert camera @ direction == pytest.approx(params["travel"] if motion == "pan" else 0.0)
            elif motion == "grow":
                assert (np.diff(track["r"]) > 0).all() and not moved.any()
            else:
                steps = np.hypot(np.diff(track["cx"]), np.diff(track["cy"]))
                assert steps.max() <= np.hypot(*params["velocity"]) / 24 + 1e-9 and steps.min() > 0


def test_some_image_captions_name_a_motion_the_still_cannot_show():
    """world.motion_caption_share of the LAION captions are phrased as the world's video captions (a motion,
    a direction), so a text encoder trained on images meets the words of the evaluation's video prompts; every
    caption still names its image's shape, colour and background. The toy world uses a quarter."""
    from pipelines.evaluation.prompts import parse_prompt
    from pipelines.world.generate import plan_images

    base = world_preset("tiny").model_copy(update={"n_images": 400})
    for share in (0.0, 0.25, 1.0):
        config = base.model_copy(update={"motion_caption_share": share})
        rows = plan_images(np.random.default_rng([config.seed, 0]), config)
        parsed = [parse_prompt(r["caption"]) for r in rows]
        assert all((p.shape, p.colour, p.background) == (r["shape"], r["colour"], r["background"])
                   for p, r in zip(parsed, rows))
        named = [p.motion for p in parsed if p.motion is not None]
        assert len(named) == pytest.approx(share * len(rows), abs=0.06 * len(rows))
        if share:
            assert set(named) == set(config.motions)
            assert any(" pans " in r["caption"] for r in rows) and any(" drifting " in r["caption"] for r in rows)
    assert world_preset("toy").motion_caption_share == 0.25 and world_preset("tiny").motion_caption_share == 0.0
    with pytest.raises(ValueError):
        type(base).model_validate({**base.model_dump(), "motion_caption_share": 1.5})


def test_held_out_triples_never_reach_a_caption(tmp_path):
    """world.held_out keeps that many drawable (shape, colour, background) triples out of every LAION row,
    the same ones for the same seed; some captions leave out the size or the position."""
    from pipelines.world.generate import held_out_triples, plan_images, renderable_triples

    config = world_preset("tiny").model_copy(update={"n_images": 400, "held_out": 20})
    held = held_out_triples(config)
    assert len(held) == 20 and held <= set(renderable_triples(config))
    assert held == held_out_triples(config) != held_out_triples(config.model_copy(update={"seed": 1}))
    rows = plan_images(np.random.default_rng([config.seed, 0]), config)
    shown = {(r["shape"], r["colour"], r["background"]) for r in rows}
    assert not shown & held and len(shown) > 60
    captions = [r["caption"] for r in rows]
    with_size = [any(w in config.sizes for w in c.split()) for c in captions]
    assert any(with_size) and not all(with_size)
    with pytest.raises(ValueError, match="held_out"):
        held_out_triples(config.model_copy(update={"held_out": len(renderable_triples(config))}))


def test_toy_world_videos_move_within_the_second_dt_samples():
    """Dt samples 8 frames at 8 fps (the demo's rate; 22 frames at 24 fps once F has filled them in), so the
    toy world's motions must show within such a window, or a Dt faithful to its training videos would fail
    the motion bar (>= 0.8 of clips moving by the evaluator's 0.05). The world's default dynamics (6-10 s,
    drifts of 0.2-0.45 of the side over the whole video) do not; the toy preset's do, and its windows still
    read as one consistent, faithful object."""
    from pipelines.evaluation.scorer import evaluate_video
    from pipelines.world.config import world_preset
    from pipelines.world.generate import plan_videos
    from pipelines.world.videos import render_video

    def windows(config, n=48):
        rng = np.random.default_rng(0)
        plans = plan_videos(np.random.default_rng(1), config, n, (), 0, lambda i: f"v{i}")
        out = []
        for plan in plans:
            n_frames = plan["seconds"] * 24
            track = trajectory(plan["motion"], plan["params"], n_frames, 24)
            start = int(rng.integers(0, n_frames - 22 + 1))
            window = {k: v[start:start + 22] for k, v in track.items()}
            frames = render_video(32, config.backgrounds[plan["background"]], plan["shape"],
                                  config.colours[plan["colour"]], plan["motion"], window)
            out.append(evaluate_video(frames, plan["caption"]))
        return out

    toy = world_preset("toy")
    old = toy.model_copy(update={"video_seconds": (6, 10), "travel": (0.2, 0.45), "grow_to": 1.0})
    before, after = windows(old), windows(toy)
    share = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    assert share(before, "moving") < 0.8 <= share(after, "moving")
    assert share(after, "moving") >= 0.95
    assert share(after, "temporal_consistency") >= 0.95 and share(after, "prompt_faithfulness") >= 0.95


def test_presets_have_no_curation_defects(truth):
    # Defects are opt-in (pipelines/world/defects.py): the tiny world's truth marks none; the defects preset has each.
    assert not truth["overlay"].any() and not truth["still"].any()
    assert truth["cut_at"].isna().all() and truth["duplicate_of"].isna().all() and truth["overlay_box"].isna().all()
    assert not any(world_preset(name).has_defects for name in ("tiny", "toy", "paper"))
    defects = world_preset("defects")
    assert min(defects.overlay_share, defects.still_share, defects.cut_share, defects.duplicate_share) > 0
