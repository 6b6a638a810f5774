"""Generate the toy world into a folder, in the real datasets' formats.

Layout of `out_dir` (everything under `files/` is what the server serves):

    world.json              the config, base_url, rows per file and counts per source and category
    laion.parquet           LAION metadata: URL TEXT WIDTH HEIGHT similarity hash punsafe pwatermark
    webvid.csv              WebVid-10M: videoid,name,page_idx,page_dir,duration,contentUrl
    hdvila.jsonl            HD-VILA-100M: {"video_id", "url", "clip": [{"clip_id", "span"}]}
    ground_truth.parquet    one row per LAION row, WebVid row and HD-VILA clip: what the world put
                            there and the outcome a pipeline must reach (`config.CATEGORIES`)
    files/images/<id>.jpg   captioned shapes
    files/videos/<id>.mp4   unlabeled moving shapes, H.264 with a short GOP
    truth/<id>.json         per-frame centre, size and camera offset of every rendered video

The same config (seed included) gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.world.config import (HDVILA_BAD, LAION_BAD, POSITIONS, SPAN_DEFECTS, TOXIC_SAMPLE, WEBVID_BAD,
                                    WorldConfig, bad_count)
from pipelines.world.defects import apply_video_defect, plan_image_defects, plan_video_defects
from pipelines.world.formats import (write_ground_truth, write_hdvila, write_laion, write_webvid,
                                     write_world_json)
from pipelines.world.shapes import HALF_EXTENT, render
from pipelines.world.videos import caption_directions, encode_mp4, render_video, sample_motion, trajectory

OUTPUTS = ("world.json", "laion.parquet", "webvid.csv", "hdvila.jsonl", "ground_truth.parquet", "files", "truth")
WHERE = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
         "left": "on the left", "center": "in the center", "right": "on the right",
         "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right"}
# Like real alt-text, some captions leave out the size or the position: then two images that differ only
# in their shape have captions that differ only in the shape word, which is what makes a contrastive
# model learn shape (full captions are told apart by colour, background, size and position alone).
IMAGE_TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "a photo of a {size} {colour} {shape} {where}, {background} background",
    "{size} {colour} {shape} {where} against a {background} background",
    "a {colour} {shape}, {size}, {where} on {background}",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} on {background}",
    "a photo of a {colour} {shape} {where}, {background} background",
)
VIDEO_TEMPLATES = {
    "drift": "a {size} {colour} {shape} drifting {direction} on a {background} background",
    "bounce": "a {size} {colour} {shape} bouncing around on a {background} background",
    "grow": "a {colour} {shape} growing {where} on a {background} background",
    "pan": "a {size} {colour} {shape} on a {background} background, the camera pans {direction}",
}
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Video unavailable</title></head>"
             b"<body><p>This video is no longer available.</p></body></html>\n")


@dataclass
class WorldSummary:
    """What `generate_world` wrote: rows per metadata file, ground-truth counts per category."""

    root: Path
    rows: dict[str, int]
    counts: dict[str, dict[str, int]]  # source -> expected category -> ground-truth rows
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"toy world in {self.root} ({self.seconds:.1f} s)"]
        for name, path in self.files.items():
            rows = f"{self.rows[name]:>7} rows" if name in self.rows else " " * 12
            lines.append(f"  {name:<13}{rows}  {path}")
        categories = sorted({c for counts in self.counts.values() for c in counts})
        lines.append("  expected outcome per ground-truth row:")
        lines.append("    " + f"{'':<11}" + "".join(f"{s:>8}" for s in self.counts))
        for c in categories:
            lines.append("    " + f"{c:<11}" + "".join(f"{self.counts[s].get(c, 0):>8}" for s in self.counts))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def fix_articles(caption: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)


def _pick(rng: np.random.Generator, names) -> str:
    names = list(names)
    return names[int(rng.integers(len(names)))]


def _plan(rng: np.random.Generator, config: WorldConfig, n: int, bad: tuple[str, ...],
          redirects: int) -> list[tuple[str, str]]:
    """(expected category, detail) of each of `n` rows, bad rows scattered among the ok ones."""
    rows = [(c, "") for c in bad for _ in range(bad_count(config, n, bad, c))]
    rows += [("ok", "redirect")] * redirects
    rows += [("ok", "")] * (n - len(rows))
    return [rows[i] for i in rng.permutation(n)]


def backgrounds_for(config: WorldConfig, colour: str) -> list[str]:
    """The backgrounds a shape of `colour` is drawn on: those that differ enough from the colour."""
    rgb = np.asarray(config.colours[colour])
    return [b for b, v in config.backgrounds.items()
            if b != colour and np.abs(rgb - np.asarray(v)).sum() >= 120] or list(config.backgrounds)


def renderable_triples(config: WorldConfig) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) triple the world can draw, sorted."""
    return sorted((s, c, b) for s in config.shapes for c in config.colours for b in backgrounds_for(config, c))


def held_out_triples(config: WorldConfig) -> set[tuple[str, str, str]]:
    """The (shape, colour, background) triples no LAION row shows (`config.held_out`, drawn from the
    world's seed): a text-to-video model can only draw them by composing what it saw apart. Videos,
    which carry no text, may still show them."""
    triples = renderable_triples(config)
    if config.held_out >= len(triples):
        raise ValueError(f"world.held_out={config.held_out} must leave some of the {len(triples)} triples seen")
    rng = np.random.default_rng([config.seed, 7])
    return {triples[i] for i in rng.choice(len(triples), size=config.held_out, replace=False)}


def _scene(rng: np.random.Generator, config: WorldConfig, avoid: set[tuple[str, str, str]] = frozenset()) -> dict:
    """Shape, colour, size class and a background that differs from the colour; never a triple of `avoid`."""
    while True:
        colour = _pick(rng, config.colours)
        scene = {"shape": _pick(rng, config.shapes), "colour": colour, "size": _pick(rng, config.sizes),
                 "background": _pick(rng, backgrounds_for(config, colour))}
        if (scene["shape"], colour, scene["background"]) not in avoid:
            return scene


def _nearest_position(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def _url_path(path: str, detail: str, category: str) -> str:
    if category == "slow":
        return "/slow" + path
    if detail == "redirect":
        return "/redirect?to=" + path
    return path


def _image_caption(rng: np.random.Generator, config: WorldConfig) -> str:
    """An image caption template; `motion_caption_share` of them a video caption's, its direction filled in
    (the still shows no motion). No draw is made when the share is 0, so such worlds stay as they were."""
    if config.motion_caption_share <= 0 or rng.random() >= config.motion_caption_share:
        return _pick(rng, IMAGE_TEMPLATES)
    motion = _pick(rng, config.motions)
    return VIDEO_TEMPLATES[motion].replace("{direction}", _pick(rng, caption_directions(motion)))


def plan_images(rng: np.random.Generator, config: WorldConfig) -> list[dict]:
    rows, avoid = [], held_out_triples(config)
    for i, (category, detail) in enumerate(_plan(rng, config, config.n_images, LAION_BAD, config.redirect_rows)):
        scene = _scene(rng, config, avoid)
        scene["position"] = _pick(rng, POSITIONS)
        r = config.sizes[scene["size"]] * rng.uniform(0.9, 1.1)
        edge = HALF_EXTENT[scene["shape"]] * r
        cx, cy = (float(np.clip(p + rng.uniform(-0.03, 0.03), edge, 1 - edge)) for p in POSITIONS[scene["position"]])
        caption = fix_articles(_image_caption(rng, config).format(where=WHERE[scene["position"]], **scene))
        text = caption
        if category == "toxic":
            word = _pick(rng, TOXIC_SAMPLE)
            text = f"{word} {caption}" if rng.random() < 0.5 else f"{caption} {word}"
        side = config.too_small_size if category == "too_small" else config.image_size
        null = rng.random(2) < config.null_share
        punsafe = rng.uniform(0.9, 0.999) if category == "nsfw" else (None if null[0] else rng.uniform(0, 0.1))
        pwatermark = rng.uniform(0.8, 0.99) if category == "watermark" else (None if null[1] else rng.uniform(0, 0.3))
        sample_id = f"img{i:06d}"
        path = f"/files/images/{sample_id}.jpg"
        rows.append({"sample_id": sample_id, "row": i, "expected": category, "detail": detail, **scene,
                     "cx": cx, "cy": cy, "r": float(r), "caption": caption, "text": text,
                     "width": side, "height": side, "path": path, "url_path": _url_path(path, detail, category),
                     "similarity": float(rng.uniform(0.30, 0.42)), "punsafe": punsafe, "pwatermark": pwatermark})
    _ensure_nulls(rows, config)
    return rows


def _ensure_nulls(rows: list[dict], config: WorldConfig) -> None:
    """Readers must meet null punsafe/pwatermark: with null_share > 0 at least one ok row has each."""
    if config.null_share <= 0:
        return
    ok = [r for r in rows if r["expected"] == "ok"]
    for column in ("punsafe", "pwatermark"):
        if ok and all(r[column] is not None for r in rows):
            ok[0][column] = None


def plan_videos(rng: np.random.Generator, config: WorldConfig, n: int, bad: tuple[str, ...],
                redirects: int, id_of) -> list[dict]:
    small, large = min(config.sizes.values()), max(config.sizes.values()) * config.grow_to
    videos = []
    for i, (category, detail) in enumerate(_plan(rng, config, n, bad, redirects)):
        scene = _scene(rng, config)
        motion = _pick(rng, config.motions)
        if motion == "grow":
            scene["size"] = min(config.sizes, key=config.sizes.get)
        params = sample_motion(rng, motion, scene["shape"], config.sizes[scene["size"]], large, small,
                               config.travel)
        scene["position"] = _nearest_position(*params["start"])
        seconds = int(rng.integers(config.video_seconds[0], config.video_seconds[1] + 1))
        words = {**scene, "where": WHERE[scene["position"]], "direction": params.get("direction", "")}
        sample_id = id_of(i)
        path = f"/files/videos/{sample_id}.mp4"
        videos.append({"sample_id": sample_id, "row": i, "expected": category, "detail": detail, **scene,
                       "motion": motion, "params": params, "seconds": seconds,
                       "caption": fix_articles(VIDEO_TEMPLATES[motion].format(**words)), "path": path,
                       "url_path": _url_path(path, detail, category)})
    return videos


def _cut_scene(rng: np.random.Generator, config: WorldConfig, background: str) -> dict:
    """The scene a cut switches to: a new shape and motion on a background other than `background`."""
    scene = _scene(rng, config)
    while scene["background"] == background:
        scene = _scene(rng, config)
    scene["motion"] = _pick(rng, config.motions)
    small, large = min(config.sizes.values()), max(config.sizes.values()) * config.grow_to
    if scene["motion"] == "grow":
        scene["size"] = min(config.sizes, key=config.sizes.get)
    scene["params"] = sample_motion(rng, scene["motion"], scene["shape"], config.sizes[scene["size"]], large,
                                    small, config.travel)
    return scene


def _fmt_span(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def _add_clips(rng: np.random.Generator, config: WorldConfig, videos: list[dict]) -> None:
    """HD-VILA clips: `clips_per_video` spans in order; a few made bad (ends before start, past the end)."""
    for v in videos:
        seg = v["seconds"] / config.clips_per_video
        v["clips"] = []
        for k in range(config.clips_per_video):
            start = round(k * seg + rng.uniform(0, 0.25 * seg), 3)
            end = round((k + 1) * seg - rng.uniform(0, 0.25 * seg), 3)
            v["clips"].append({"clip_id": f"{v['sample_id']}.{k}.mp4", "start": start, "end": end,
                               "expected": v["expected"], "detail": v["detail"]})
    candidates = [c for v in videos if v["expected"] == "ok" for c in v["clips"]]
    per_defect = max(1, round(config.bad_share * len(candidates) / len(SPAN_DEFECTS)))
    chosen = rng.permutation(len(candidates))[: per_defect * len(SPAN_DEFECTS)]
    by_clip = {c["clip_id"]: v for v in videos for c in v["clips"]}
    for j, idx in enumerate(sorted(int(i) for i in chosen)):
        clip = candidates[idx]
        defect = SPAN_DEFECTS[j % len(SPAN_DEFECTS)]
        if defect == "end_before_start":
            clip["start"], clip["end"] = clip["end"], clip["start"]
        else:
            duration = by_clip[clip["clip_id"]]["seconds"]
            clip["start"], clip["end"] = duration + 1.0, duration + 3.0
        clip["expected"], clip["detail"] = "bad_span", defect
    for v in videos:
        for c in v["clips"]:
            c["span"] = [_fmt_span(c["start"]), _fmt_span(c["end"])]


def _write_image(root: Path, config: WorldConfig, row: dict) -> None:
    if row["expected"] == "http_404":
        return
    side = row["width"]
    rgb = config.colours[row["colour"]], config.backgrounds[row["background"]]
    pixels = render(side, rgb[1], row["shape"], rgb[0], row["cx"] * side, row["cy"] * side, row["r"] * side)
    buf = BytesIO()
    quality = config.jpeg_quality - 15 * (row.get("defect") is not None)  # a duplicate is a re-encode
    Image.fromarray(pixels).save(buf, format="JPEG", quality=max(1, quality))
    data = buf.getvalue()
    if row["expected"] == "corrupt":
        data = data[: data.index(b"\xff\xda")]  # headers only: the scan never starts
    (root / row["path"].lstrip("/")).write_bytes(data)


def _write_video(root: Path, config: WorldConfig, video: dict) -> None:
    target = root / video["path"].lstrip("/")
    if video["expected"] == "http_404":
        return
    if video["expected"] == "html":
        target.write_bytes(HTML_PAGE)
        return
    n_frames = video["seconds"] * config.video_fps
    track = trajectory(video["motion"], video["params"], n_frames, config.video_fps)
    frames = render_video(config.video_size, config.backgrounds[video["background"]], video["shape"],
                          config.colours[video["colour"]], video["motion"], track)
    frames, track, crf = apply_video_defect(config, video, frames, track)
    encode_mp4(frames, target, config.video_fps, config.keyframe_interval, crf)
    if video["expected"] == "corrupt":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])  # ffmpeg writes moov last: cut before it
    truth = {"sample_id": video["sample_id"], "units": "fractions of the frame side, (0, 0) top left",
             "shape": video["shape"], "colour": video["colour"], "background": video["background"],
             "motion": video["motion"], "params": video["params"], "fps": config.video_fps,
             "n_frames": n_frames, "size_px": config.video_size,
             "frames": {k: [round(float(x), 5) for x in v] for k, v in track.items()}}
    if video.get("defect"):
        truth["defect"] = video["defect"]
    (root / "truth" / f"{video['sample_id']}.json").write_text(json.dumps(truth, sort_keys=True) + "\n")


def _prepare(root: Path, overwrite: bool) -> None:
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True to replace a world there")
        for name in OUTPUTS:
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for sub in ("files/images", "files/videos", "truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)


def generate_world(out_dir: str | os.PathLike, config: WorldConfig | None = None, *,
                   overwrite: bool = False) -> WorldSummary:
    """Write the world described by `config` (default: the tiny preset) into `out_dir`."""
    config = config or WorldConfig()
    root = Path(out_dir)
    started = time.perf_counter()
    _prepare(root, overwrite)
    # One random stream per source: changing the video counts leaves the images as they were.
    images = plan_images(np.random.default_rng([config.seed, 0]), config)
    webvid = plan_videos(np.random.default_rng([config.seed, 1]), config, config.n_videos, WEBVID_BAD,
                         config.redirect_rows, lambda i: str(1_000_000 + i))
    hd_rng = np.random.default_rng([config.seed, 2])
    hdvila = plan_videos(hd_rng, config, config.n_hdvila_videos, HDVILA_BAD, 0, lambda i: f"hdv{i:05d}")
    _add_clips(hd_rng, config, hdvila)
    if config.has_defects:  # a stream of their own: a world without defects draws exactly as before
        defect_rng = np.random.default_rng([config.seed, 3])
        plan_image_defects(defect_rng, config, images)
        plan_video_defects(defect_rng, config, webvid, lambda rng, bg: _cut_scene(rng, config, bg))

    # Threads suffice: ffmpeg encodes in its own processes and numpy drawing releases the GIL.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(config.workers or cores) as pool:
        jobs = [pool.submit(_write_video, root, config, v) for v in webvid + hdvila]
        jobs += [pool.submit(_write_image, root, config, r) for r in images]
        for job in jobs:
            job.result()

    files = {"laion": write_laion(root, config, images), "webvid": write_webvid(root, config, webvid),
             "hdvila": write_hdvila(root, config, hdvila)}
    files["ground_truth"], counts = write_ground_truth(root, config, images, webvid, hdvila)
    rows = {"laion": len(images), "webvid": len(webvid), "hdvila": len(hdvila), "ground_truth": sum(
        sum(c.values()) for c in counts.values())}
    files["world"] = write_world_json(root, config, rows, counts)
    files["images"], files["videos"], files["truth"] = root / "files/images", root / "files/videos", root / "truth"
    return WorldSummary(root=root, rows=rows, counts=counts, files=files, seconds=time.perf_counter() - started)
