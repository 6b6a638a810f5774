"""The curation scorers on clips with known answers, and the toy world's defects where its truth says."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.curation import (CurationConfig, Part, cut_times, decode_span, find_duplicates, has_overlay, is_still,
                                motion_score, overlay_score, split_at_cuts, thumbnail_embedding)
from pipelines.world import WorldConfig, generate_world
from pipelines.world.defects import draw_overlay, shift_frames
from pipelines.world.shapes import render
from pipelines.world.videos import encode_mp4

FPS, SIDE, N = 24, 64, 48
CONFIG = CurationConfig()


def _scene(n: int, background, colour, x0: float, dx: float, shape: str = "square") -> np.ndarray:
    """`n` frames of a shape moving `dx` px per frame from `x0`."""
    return np.stack([render(SIDE, background, shape, colour, x0 + dx * i, SIDE * 0.4, SIDE * 0.12)
                     for i in range(n)])


def _mp4(tmp_path: Path, name: str, frames: np.ndarray, crf: int = 20) -> Path:
    path = tmp_path / f"{name}.mp4"
    encode_mp4(frames, path, FPS, 12, crf)
    return path


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("clips")
    moving = _scene(N, (245, 245, 245), (220, 40, 40), 12, 0.8)
    cut = np.concatenate([moving[:30], _scene(N - 30, (40, 80, 220), (240, 210, 40), 40, -0.5, "circle")])
    overlaid = moving.copy()
    draw_overlay(overlaid, [8, 40, 56, 52])
    return {"moving": _mp4(tmp, "moving", moving), "still": _mp4(tmp, "still", np.repeat(moving[:1], N, 0)),
            "cut": _mp4(tmp, "cut", cut), "overlay": _mp4(tmp, "overlay", overlaid),
            "shifted": _mp4(tmp, "shifted", shift_frames(moving, 2, -1), crf=28),
            "other": _mp4(tmp, "other", _scene(N, (245, 245, 245), (40, 170, 60), 50, -0.8, "triangle"))}


def test_decode_span(clips):
    frames, fps, first = decode_span(clips["moving"], 0.5, 1.0)
    assert fps == FPS and first == 0.5 and frames.shape == (12, SIDE, SIDE, 3)
    whole, _, _ = decode_span(clips["moving"].read_bytes())
    assert whole.shape[0] == N
    with pytest.raises(ValueError, match="holds no frame"):
        decode_span(clips["moving"], 5.0, 6.0)


def test_still_and_moving(clips):
    still = motion_score(decode_span(clips["still"])[0], FPS)
    moving = motion_score(*decode_span(clips["moving"])[:2])
    assert is_still(still, CONFIG) and not is_still(moving, CONFIG)
    # 0.8 px per frame of a 64 px frame is 0.3 of the side per second, over the shape's share of the frame
    assert 0 <= still < 1e-3 < moving < 0.3


def test_cut_at_its_frame_and_parts_keep_their_source(clips):
    frames, fps, _ = decode_span(clips["cut"])
    cuts = cut_times(frames, fps)
    assert len(cuts) == 1 and cuts[0] == pytest.approx(30 / FPS, abs=0.5 / FPS)
    assert cut_times(*decode_span(clips["moving"])[:2]) == []
    parts = split_at_cuts(10.0, 12.0, cuts, min_part_s=0.25)
    at = round(10 + cuts[0], 6)
    assert parts == [Part(0, 10.0, at, 10.0, 12.0), Part(1, at, 12.0, 10.0, 12.0)]
    # a cut too close to an end leaves the clip whole
    assert split_at_cuts(10.0, 12.0, [1.9], min_part_s=0.25) == [Part(0, 10.0, 12.0, 10.0, 12.0)]


def test_overlay_found_where_it_is(clips):
    result = overlay_score(decode_span(clips["overlay"])[0])
    assert has_overlay(result, CONFIG)
    assert _iou(result.box, [8 / SIDE, 40 / SIDE, 56 / SIDE, 52 / SIDE]) > 0.6
    assert not has_overlay(overlay_score(decode_span(clips["moving"])[0]), CONFIG)
    assert overlay_score(decode_span(clips["still"])[0]).score == 0.0  # nothing moves: no evidence


def test_duplicates_one_kept_per_group(clips):
    rows = [(name, thumbnail_embedding(decode_span(clips[name])[0])) for name in ("moving", "other", "shifted")]
    verdicts = list(find_duplicates(rows))
    assert [(v.key, v.duplicate_of) for v in verdicts] == [("moving", None), ("other", None), ("shifted", "moving")]
    # blockwise: the same verdicts one row at a time, and for CLIP-style single vectors
    one_by_one = list(find_duplicates(rows, CONFIG.model_copy(update={"duplicate_block": 1})))
    assert [v.duplicate_of for v in one_by_one] == [v.duplicate_of for v in verdicts]
    assert [v.similarity for v in one_by_one] == pytest.approx([v.similarity for v in verdicts], abs=1e-5)
    flat = [(k, np.outer(*e).reshape(-1)) for k, e in rows]
    assert [v.duplicate_of for v in find_duplicates(flat)] == [None, None, "moving"]


@pytest.fixture(scope="module")
def defects_world(tmp_path_factory) -> Path:
    # 96 px as the defects preset: a duplicate's 2 px shift is a third of a thumbnail cell (see duplicates.py)
    config = WorldConfig(n_videos=12, n_hdvila_videos=3, video_size=96, video_seconds=(3, 3), overlay_share=0.15,
                         still_share=0.15, cut_share=0.15, duplicate_share=0.1)
    return generate_world(tmp_path_factory.mktemp("defects"), config).root


def test_world_defects_are_where_the_truth_says(defects_world):
    truth = pq.read_table(defects_world / "ground_truth.parquet").to_pylist()
    videos = {r["key"]: r for r in truth if r["source"] == "webvid"}
    kinds = {k: [r for r in videos.values() if r[k] not in (None, False)] for k in
             ("overlay", "still", "cut_at", "duplicate_of")}
    assert all(len(rows) == 1 for rows in kinds.values())
    assert sum(r["duplicate_of"] is not None for r in truth if r["source"] == "laion") >= 1

    def frames(row):
        return decode_span(defects_world / row["url_path"].split("to=")[-1].lstrip("/"))

    overlay = kinds["overlay"][0]
    result = overlay_score(frames(overlay)[0])
    assert has_overlay(result, CONFIG) and _iou(result.box, overlay["overlay_box"]) > 0.5
    assert is_still(motion_score(*frames(kinds["still"][0])[:2]), CONFIG)
    cut = kinds["cut_at"][0]
    assert cut_times(*frames(cut)[:2]) == [pytest.approx(cut["cut_at"], abs=0.5 / 24)]
    dupe = kinds["duplicate_of"][0]
    original = videos[dupe["duplicate_of"]]
    assert original["row"] < dupe["row"] and original["caption"] == dupe["caption"]
    verdicts = list(find_duplicates([(r["key"], thumbnail_embedding(frames(r)[0])) for r in (original, dupe)]))
    assert verdicts[1].duplicate_of == original["key"]
    for row in videos.values():  # each valid video has at most one defect, bad rows none
        marks = sum(row[k] not in (None, False) for k in ("overlay", "still", "cut_at", "duplicate_of"))
        assert marks <= (row["expected"] == "ok")
