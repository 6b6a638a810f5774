"""The defects of web video the curation stages must find, put into the toy world with their truth.

Each is opt-in (`WorldConfig.overlay_share`, `still_share`, `cut_share`, `duplicate_share`; all 0 in the
tiny, toy and paper presets) and drawn from a random stream of its own, so a world without them is the
same, byte for byte, as before they existed. Only valid ("ok") rows get one, at most one each:

    overlay     a WebVid video under a fixed, semi-transparent text logo, as stock-footage previews carry
    still       a WebVid video whose first frame is held for its whole length (its caption still says
                the shape moves)
    cut         a WebVid video that cuts, at a known time, to a second scene on another background
    duplicate   a WebVid video or LAION image that re-renders an earlier defect-free row shifted by a pixel
                or two and re-encoded at another quality; its truth names the row it duplicates. LAION
                rows the world happens to draw alike (`CHANCE_PX`) are named the same way.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.world.config import WorldConfig
from pipelines.world.videos import render_video, trajectory

OVERLAY_TEXT = "toyworld"
OVERLAY_ALPHA = 0.5          # opacity of the logo: the picture shows through, as in stock previews
OVERLAY_FONT_FRACTION = 1 / 6  # font size as a fraction of the frame side
CUT_RANGE = (0.35, 0.65)     # where in its video a cut falls, fractions of the length
CHANCE_PX = 3               # rows drawn this close by chance are near-duplicates as well
DUPLICATE_CRF_STEP = 6       # a duplicate video is encoded this much coarser than the world's crf


def _count(share: float, n: int) -> int:
    return 0 if share <= 0 else max(1, round(share * n))


def _candidates(rows: list[dict]) -> list[int]:
    return [i for i, r in enumerate(rows) if r["expected"] == "ok"]


def plan_video_defects(rng: np.random.Generator, config: WorldConfig, videos: list[dict], new_scene) -> None:
    """Mark WebVid rows with their defect (in place: `v["defect"]`); `new_scene(rng, avoid_background)`
    draws the scene, motion and params a cut switches to."""
    ok = _candidates(videos)
    counts = {name: _count(share, len(ok)) for name, share in (
        ("overlay", config.overlay_share), ("still", config.still_share), ("cut", config.cut_share),
        ("duplicate", config.duplicate_share))}
    order = _order(rng, ok)
    if sum(counts.values()) + counts["duplicate"] > len(ok):
        raise ValueError(f"webvid: {len(ok)} valid rows cannot hold the defects asked for ({counts})")
    picked, at = {}, 0
    for name in ("overlay", "still", "cut", "duplicate"):
        picked[name] = sorted(order[at:at + counts[name]])
        at += counts[name]
    clean = sorted(order[at:])
    for i in picked["overlay"]:
        videos[i]["defect"] = {"kind": "overlay", "box": _overlay_box(rng, config.video_size)}
    for i in picked["still"]:
        videos[i]["defect"] = {"kind": "still"}
    for i in picked["cut"]:
        v = videos[i]
        n_frames = v["seconds"] * config.video_fps
        cut = int(round(rng.uniform(*CUT_RANGE) * n_frames))
        v["defect"] = {"kind": "cut", "frame": cut, "at": cut / config.video_fps,
                       "scene": new_scene(rng, v["background"])}
    for i in picked["duplicate"]:
        earlier = [j for j in clean if j < i]
        j = earlier[int(rng.integers(len(earlier)))]
        _copy_scene(videos[i], videos[j], ("shape", "colour", "size", "background", "position", "motion",
                                           "params", "seconds", "caption"))
        videos[i]["defect"] = {"kind": "duplicate", "of": j, "shift": _shift(rng)}


def plan_image_defects(rng: np.random.Generator, config: WorldConfig, images: list[dict]) -> None:
    """Mark LAION duplicates: a valid row re-drawn as an earlier valid row, moved by a pixel or two."""
    ok = [i for i in _candidates(images) if images[i]["detail"] == ""]
    n = _count(config.duplicate_share, len(ok))
    if 2 * n > len(ok):
        raise ValueError(f"laion: {len(ok)} valid rows cannot hold {n} duplicates and their originals")
    order = _order(rng, ok)
    dupes, clean = sorted(order[:n]), sorted(order[n:])
    for i in dupes:
        earlier = [j for j in clean if j < i]
        j = earlier[int(rng.integers(len(earlier)))]
        dx, dy = _shift(rng)
        _copy_scene(images[i], images[j], ("shape", "colour", "size", "background", "position", "r",
                                           "caption", "text"))
        images[i]["cx"] = images[j]["cx"] + dx / config.image_size
        images[i]["cy"] = images[j]["cy"] + dy / config.image_size
        images[i]["defect"] = {"kind": "duplicate", "of": j}
    _mark_chance_duplicates(config, images)


def _mark_chance_duplicates(config: WorldConfig, images: list[dict]) -> None:
    """Valid rows the world drew alike by chance (same shape, colour, size and background, centres and
    sizes within `CHANCE_PX` px) are near-duplicates too: the truth names the earlier row's original."""
    by_scene: dict[tuple, list[int]] = {}
    for i, row in enumerate(images):
        if row["expected"] != "ok":
            continue
        scene = tuple(row[k] for k in ("shape", "colour", "size", "background"))
        for j in by_scene.get(scene, []):
            other = images[j]
            close = [abs(row[k] - other[k]) * config.image_size <= CHANCE_PX for k in ("cx", "cy", "r")]
            if all(close) and not row.get("defect"):
                row["same_as"] = (other.get("defect") or {}).get("of", other.get("same_as", j))
                break
        by_scene.setdefault(scene, []).append(i)


def _order(rng: np.random.Generator, ok: list[int]) -> list[int]:
    """The valid rows in the order defects are dealt, the first valid row last: it stays clean, so every
    duplicate has a clean row before it to copy."""
    return [ok[1 + int(i)] for i in rng.permutation(len(ok) - 1)] + ok[:1]


def _copy_scene(row: dict, source: dict, names: tuple[str, ...]) -> None:
    for name in names:
        row[name] = source[name]


def _shift(rng: np.random.Generator) -> tuple[int, int]:
    """A shift of one or two pixels, never none."""
    while True:
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        if dx or dy:
            return dx, dy


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, round(size * OVERLAY_FONT_FRACTION)))


def _overlay_box(rng: np.random.Generator, size: int) -> list[int]:
    """[x0, y0, x1, y1] in pixels of where the logo goes: anywhere it fits whole."""
    left, top, right, bottom = _font(size).getbbox(OVERLAY_TEXT, stroke_width=1)
    w, h = right - left, bottom - top
    x0 = int(rng.integers(1, max(2, size - w - 1)))
    y0 = int(rng.integers(1, max(2, size - h - 1)))
    return [x0, y0, x0 + w, y0 + h]


def draw_overlay(frames: np.ndarray, box: list[int]) -> None:
    """In place: the logo (light text, dark outline) blended at `OVERLAY_ALPHA` into every frame."""
    size = frames.shape[1]
    font = _font(size)
    left, top, _, _ = font.getbbox(OVERLAY_TEXT, stroke_width=1)
    colour = Image.new("RGB", (size, size), (0, 0, 0))
    mask = Image.new("L", (size, size), 0)
    origin = (box[0] - left, box[1] - top)
    ImageDraw.Draw(colour).text(origin, OVERLAY_TEXT, font=font, fill=(250, 250, 250), stroke_width=1,
                                stroke_fill=(20, 20, 20))
    ImageDraw.Draw(mask).text(origin, OVERLAY_TEXT, font=font, fill=255, stroke_width=1, stroke_fill=255)
    alpha = np.asarray(mask, np.float32)[..., None] / 255 * OVERLAY_ALPHA
    logo = np.asarray(colour, np.float32)
    frames[:] = np.rint(frames * (1 - alpha) + logo * alpha).astype(np.uint8)


def shift_frames(frames: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The frames moved by (dx, dy) pixels, the uncovered edge repeating its neighbours."""
    n, h, w, _ = frames.shape
    padded = np.pad(frames, ((0, 0), (abs(dy),) * 2, (abs(dx),) * 2, (0, 0)), mode="edge")
    return np.ascontiguousarray(padded[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w])


def truth_columns(row: dict, key_of, side: int) -> dict:
    """The ground truth's defect columns of one row; `key_of(index)` gives another row's key, `side` is
    the frame side the overlay box is given in (the column holds fractions of it)."""
    defect = row.get("defect") or {}
    kind = defect.get("kind")
    box = [v / side for v in defect["box"]] if kind == "overlay" else None
    return {"overlay": kind == "overlay", "overlay_box": box, "still": kind == "still",
            "cut_at": defect.get("at") if kind == "cut" else None,
            "duplicate_of": key_of(defect["of"]) if kind == "duplicate" else
            key_of(row["same_as"]) if "same_as" in row else None}


def apply_video_defect(config: WorldConfig, video: dict, frames: np.ndarray,
                       track: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """The frames, per-frame truth and x264 crf of a WebVid row once its defect is put in."""
    defect = video.get("defect") or {}
    kind = defect.get("kind")
    if kind == "overlay":
        draw_overlay(frames, defect["box"])
    elif kind == "still":
        frames[:] = frames[0]
        track = {k: np.full_like(v, v[0]) for k, v in track.items()}
    elif kind == "cut":
        scene, cut = defect["scene"], defect["frame"]
        second = trajectory(scene["motion"], scene["params"], len(frames) - cut, config.video_fps)
        frames[cut:] = render_video(config.video_size, config.backgrounds[scene["background"]], scene["shape"],
                                    config.colours[scene["colour"]], scene["motion"], second)
        track = {k: np.concatenate([v[:cut], second[k]]) for k, v in track.items()}
    elif kind == "duplicate":
        dx, dy = defect["shift"]
        frames = shift_frames(frames, dx, dy)
        track = {**track, "cx": track["cx"] + dx / config.video_size, "cy": track["cy"] + dy / config.video_size}
        return frames, track, min(51, config.crf + DUPLICATE_CRF_STEP)
    return frames, track, config.crf
