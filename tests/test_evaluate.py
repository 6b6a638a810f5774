"""The toy-world evaluator: the world's own videos pass the quality bar, corrupted ones fail it."""
from __future__ import annotations

import cv2
import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.evaluation.prompts import Prompt, parse_prompt
from pipelines.evaluation.run import viewing_size
from pipelines.evaluation.scorer import (EvalConfig, as_frames, background_shift, detect_object, evaluate_video,
                                         evaluate_videos, read_back)
from pipelines.outputs import write_outputs
from pipelines.watermark import WatermarkConfig, watermark_mask
from pipelines.world import generate_world, world_preset
from pipelines.world.config import BACKGROUNDS, COLOURS
from pipelines.world.shapes import render


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(ground truth table, {sample_id: (frames (F, H, W, 3) uint8, caption)}) of every decodable video."""
    root = tmp_path_factory.mktemp("world")
    generate_world(root, world_preset("tiny"))
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas()
    rows = truth[(truth.source != "laion") & truth.truth.notna() & ~truth.expected.isin(["corrupt", "html"])]
    videos = {}
    for row in rows.drop_duplicates("sample_id").itertuples():
        reader = decord.VideoReader(str(root / "files" / "videos" / f"{row.sample_id}.mp4"))
        videos[row.sample_id] = (reader.get_batch(list(range(len(reader)))).asnumpy(), row.caption)
    return root, truth, videos


def test_the_parser_reads_every_caption_of_the_world(world):
    _, truth, _ = world
    for row in truth.itertuples():
        p = parse_prompt(row.caption)
        assert (p.shape, p.colour, p.background, p.motion) == (row.shape, row.colour, row.background, row.motion)
        # A caption that names the position or the size is read right; some image captions leave them out,
        # 'growing' captions always leave out the size and always name the position.
        if row.motion is None:
            assert p.position in (row.position, None) and p.size in (row.size, None), row.caption
        elif row.motion == "grow":
            assert p.position == row.position and p.size is None, row.caption
        else:  # the other video captions name the size, not the position
            assert p.size == row.size, row.caption
    image_rows = truth[truth.motion.isna()]
    read = [parse_prompt(c) for c in image_rows.caption]
    assert sum(p.position is not None for p in read) > len(read) / 2  # most captions name them, not all
    assert sum(p.size is not None for p in read) > len(read) / 2


def test_the_parser_handles_free_phrasings():
    assert parse_prompt("A red circle on a blue background.") == Prompt(shape="circle", colour="red", background="blue")
    p = parse_prompt("Two large green squares against a grey background, in the centre")
    assert (p.shape, p.colour, p.background, p.size, p.position) == ("square", "green", "gray", "large", "center")
    p = parse_prompt("a blue triangle drifting down and to the left on green")
    assert (p.colour, p.background, p.motion, p.direction) == ("blue", "green", "drift", "down and to the left")
    assert parse_prompt("the camera pans up over a yellow diamond on black").direction == "up"
    assert parse_prompt("a landscape at dawn") == Prompt()


def test_world_images_are_recognised(world):
    root, truth, _ = world
    rows = truth[(truth.source == "laion") & (truth.expected == "ok")]
    results = [evaluate_video(np.asarray(Image.open(root / "files" / "images" / f"{r.sample_id}.jpg"))[None], r.caption)
               for r in rows.itertuples()]
    assert np.mean([r["prompt_faithfulness"] for r in results]) >= 0.95
    assert all(r["motion_match"] is None for r in results)


def test_world_videos_score_near_perfect(world):
    _, _, videos = world
    report = evaluate_videos([v for v, _ in videos.values()], [c for _, c in videos.values()])
    assert len(report["videos"]) == len(videos) >= 5
    for r in report["videos"]:
        assert r["prompt_faithfulness"] >= 0.95, r["prompt"]
        assert r["temporal_consistency"] >= 0.95, r["prompt"]
        assert r["moving"] and r["motion_ok"] and r["motion_match"], r["prompt"]
        assert r["background_accuracy"] == 1.0 and r["background_error"] < 0.03
        assert r["frame_quality"] > 0.5, r["prompt"]
    assert report["mean"]["prompt_faithfulness"] >= 0.95 and report["mean"]["motion_ok"] == 1.0
    assert set(report["mean"]) >= {"prompt_faithfulness", "temporal_consistency", "motion_smoothness", "frame_quality"}


def _recolour(frames: np.ndarray, old: str, new: str, background: np.ndarray) -> np.ndarray:
    """Swap the object's colour, anti-aliased rim included: each pixel's coverage is its projection
    onto the background -> old colour axis."""
    x = frames.astype(np.float32)
    axis = np.asarray(COLOURS[old], np.float32) - background
    coverage = np.clip((x - background) @ axis / (axis @ axis), 0, 1)[..., None]
    return np.clip(x + coverage * (np.asarray(COLOURS[new], np.float32) - COLOURS[old]), 0, 255).astype(np.uint8)


def test_corrupted_videos_score_low(world):
    _, truth, videos = world
    rng = np.random.default_rng(0)
    ids = sorted(videos)[:3]
    for sample_id in ids:
        frames, caption = videos[sample_id]
        frames = frames[::2]  # 12 fps still moves smoothly; halves the time
        row = truth[truth.sample_id == sample_id].iloc[0]

        shuffled = evaluate_video(frames[rng.permutation(len(frames))], caption)
        assert shuffled["motion_smoothness"] < 0.8 and not shuffled["motion_ok"], caption

        frozen = evaluate_video(np.repeat(frames[:1], len(frames), axis=0), caption)
        assert not frozen["moving"] and not frozen["motion_ok"] and frozen["prompt_faithfulness"] >= 0.95

        other = next(c for c in COLOURS if c != row.colour and c != row.background)
        background = np.asarray(detect_object(frames[0]).background_rgb, np.float32)
        recoloured = evaluate_video(_recolour(frames, row.colour, other, background), caption)
        assert recoloured["prompt_faithfulness"] <= 0.05 and recoloured["colour_accuracy"] <= 0.05, caption
        assert recoloured["temporal_consistency"] >= 0.95 and recoloured["motion_ok"]  # only the colour is wrong

        noise = evaluate_video(rng.integers(0, 256, frames.shape, dtype=np.uint8), caption)
        assert noise["prompt_faithfulness"] <= 0.05 and noise["frame_quality"] <= 0.1 and not noise["motion_ok"]

        blurred = evaluate_video(np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in frames]), caption)
        assert blurred["frame_quality"] < 0.5 * evaluate_video(frames, caption)["frame_quality"]


def test_a_mismatched_prompt_scores_low(world):
    _, truth, videos = world
    items = sorted(videos.items())
    checked = 0
    for sid_a, (frames, caption_a) in items:
        a = parse_prompt(caption_a)
        for sid_b, (_, caption_b) in items:
            b = parse_prompt(caption_b)
            if a.shape != b.shape and a.colour != b.colour:
                r = evaluate_video(frames[::4], caption_b)
                assert r["prompt_faithfulness"] <= 0.05, (caption_a, caption_b)
                assert r["temporal_consistency"] >= 0.95  # the video itself is fine
                checked += 1
                break
    assert checked >= 3


def test_a_delivered_video_is_read_back_as_a_viewer_gets_it(world, tmp_path):
    """`read_back` (the demo's check that its video shows the prompt) decodes the watermarked mp4 that
    generation writes: a world clip shows its caption in (nearly) every frame, and not another prompt."""
    _, _, videos = world
    frames, caption = videos[sorted(videos)[0]]
    mine = parse_prompt(caption)
    other = next(c for _, c in videos.values()
                 if parse_prompt(c).shape != mine.shape and parse_prompt(c).colour != mine.colour)
    big = viewing_size(frames[::2], 128)  # the demo delivers 128 px
    paths = write_outputs(big, tmp_path, "clip", 12.0, WatermarkConfig(), {})
    seen = read_back(str(paths["mp4"]), caption)
    assert seen["frames"] == len(big)
    assert seen["faithful_frames"] >= 0.9 * seen["frames"] and seen["temporal_consistency"] >= 0.9, seen
    assert seen["shape_frames"] >= seen["faithful_frames"] and seen["colour_frames"] >= seen["faithful_frames"]
    assert read_back(str(paths["mp4"]), other)["faithful_frames"] <= 0.05 * seen["frames"]


def test_an_object_under_the_watermark_label_is_read_from_what_shows(tmp_path):
    """A large red circle low on the right runs under the watermark's dark label at 128 px (as in a demo
    video): read with the label, the box joins the circle and the whole reads as another shape; told
    which mark the file carries, `read_back` leaves the label's pixels out and reads a circle in every frame."""
    side, background = 128, BACKGROUNDS["blue"]
    frames = np.stack([render(side, background, "circle", COLOURS["red"], 0.70 * side + 0.3 * i, 0.76 * side, 28)
                       for i in range(16)])
    mark = WatermarkConfig()
    assert (watermark_mask((side, side), mark) & (np.abs(frames[0].astype(int) - background).sum(-1) > 60)).any()
    paths = write_outputs(frames, tmp_path, "low", 8.0, mark, {})
    prompt = "a large red circle on a blue background"
    blind = read_back(str(paths["mp4"]), prompt)
    seen = read_back(str(paths["mp4"]), prompt, watermark=mark)
    assert blind["shape_frames"] <= 0.5 * blind["frames"], blind  # what the label does to an unaware read
    assert seen["faithful_frames"] == seen["frames"] == 16 and seen["temporal_consistency"] == 1.0, seen
    # Off-prompt stays off-prompt, and a disabled mark leaves nothing out.
    assert read_back(str(paths["mp4"]), "a large green square on a blue background", watermark=mark)[
        "faithful_frames"] == 0
    assert read_back(str(paths["mp4"]), prompt, watermark=WatermarkConfig(enabled=False)) == blind


def test_an_ignore_mask_of_another_size_is_refused():
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="ignore mask"):
        evaluate_video(frames, "a red circle", ignore=np.zeros((16, 16), bool))


def test_every_pixel_layout_gives_the_same_scores(world):
    _, _, videos = world
    frames, caption = next(iter(videos.values()))
    frames = frames[::8]
    base = evaluate_video(frames, caption)
    unit = frames.astype(np.float32) / 255
    as_tensor = torch.from_numpy(unit)
    for variant in (unit, unit * 2 - 1, as_tensor.permute(0, 3, 1, 2), as_tensor.permute(3, 0, 1, 2)):
        r = evaluate_video(variant, caption)
        assert {k: r[k] for k in ("prompt_faithfulness", "temporal_consistency", "moving")} == \
            {k: base[k] for k in ("prompt_faithfulness", "temporal_consistency", "moving")}
        assert r["motion_amount"] == pytest.approx(base["motion_amount"], abs=1e-3)
    assert as_frames(frames).dtype == np.float32
    with pytest.raises(ValueError, match="a video must be"):
        as_frames(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        evaluate_videos([frames, frames], [caption])


def test_background_shift_measures_a_sub_pixel_pan():
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (64, 64, 3)).astype(np.float32), (0, 0), 2.0)
    moved = cv2.warpAffine(texture, np.float32([[1, 0, 0.3], [0, 1, -0.2]]), (64, 64), borderMode=cv2.BORDER_REFLECT)
    exclude = np.zeros((64, 64), bool)
    dx, dy = background_shift(texture, moved, exclude, EvalConfig())
    assert dx == pytest.approx(0.3, abs=0.05) and dy == pytest.approx(-0.2, abs=0.05)
    flat = np.full((64, 64, 3), 128, np.float32)
    assert background_shift(flat, flat + 1, exclude, EvalConfig()) == (0.0, 0.0)
