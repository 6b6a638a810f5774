"""Writers of the toy world's metadata in the real datasets' formats, and of its ground truth."""
from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.world.config import CATEGORIES, CATEGORY_STAGE, WORLD_VERSION, WorldConfig
from pipelines.world.defects import truth_columns

LAION_SCHEMA = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
    ("similarity", pa.float64()), ("hash", pa.int64()),
    ("punsafe", pa.float32()), ("pwatermark", pa.float32()),
])
WEBVID_COLUMNS = ("videoid", "name", "page_idx", "page_dir", "duration", "contentUrl")
GROUND_TRUTH_SCHEMA = pa.schema([
    ("source", pa.string()),       # laion | webvid | hdvila
    ("key", pa.string()),          # the row's URL (laion, webvid) or clip_id (hdvila)
    ("url", pa.string()),
    ("url_path", pa.string()),     # the URL without base_url: survives rebasing
    ("row", pa.int64()),           # line of the row in its metadata file, from 0
    ("sample_id", pa.string()),
    ("expected", pa.string()),     # one of CATEGORIES
    ("stage", pa.string()),        # filter | download | clip | "" (ok)
    ("detail", pa.string()),       # redirect | end_before_start | past_end | ""
    ("shape", pa.string()), ("colour", pa.string()), ("size", pa.string()),
    ("position", pa.string()), ("background", pa.string()),
    ("motion", pa.string()),       # videos only
    ("caption", pa.string()),      # the clean caption of the scene
    ("text", pa.string()),         # what the metadata says (LAION TEXT, WebVid name)
    ("cx", pa.float64()), ("cy", pa.float64()), ("r", pa.float64()),  # first frame: centre, size (of the side)
    ("width", pa.int64()), ("height", pa.int64()),
    ("duration", pa.float64()),    # videos, seconds
    ("span_start", pa.float64()), ("span_end", pa.float64()),  # hdvila clips, seconds
    ("truth", pa.string()),        # per-frame truth of a rendered video, relative to the world root
    # Curation defects (pipelines/world/defects.py); False / null in a world without them.
    ("overlay", pa.bool_()),       # a static semi-transparent logo over the whole video
    ("overlay_box", pa.list_(pa.float64())),  # its [x0, y0, x1, y1], fractions of the side
    ("still", pa.bool_()),         # the first frame held throughout
    ("cut_at", pa.float64()),      # seconds into the video where it cuts to a second scene
    ("duplicate_of", pa.string()),  # key of the earlier row this one near-duplicates
])


def laion_hash(url_path: str, text: str) -> int:
    """A stable signed 64-bit hash of a row, like LAION's `hash` column."""
    digest = hashlib.blake2b(f"{url_path}\t{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def iso_duration(seconds: int) -> str:
    return f"PT{seconds // 3600:02d}H{seconds // 60 % 60:02d}M{seconds % 60:02d}S"


def write_laion(root: Path, config: WorldConfig, images: list[dict]) -> Path:
    columns = {
        "URL": [config.base_url + r["url_path"] for r in images],
        "TEXT": [r["text"] for r in images],
        "WIDTH": [r["width"] for r in images],
        "HEIGHT": [r["height"] for r in images],
        "similarity": [r["similarity"] for r in images],
        "hash": [laion_hash(r["url_path"], r["text"]) for r in images],
        "punsafe": [r["punsafe"] for r in images],
        "pwatermark": [r["pwatermark"] for r in images],
    }
    path = root / "laion.parquet"
    pq.write_table(pa.table(columns, schema=LAION_SCHEMA), path)
    return path


def write_webvid(root: Path, config: WorldConfig, videos: list[dict]) -> Path:
    path = root / "webvid.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(WEBVID_COLUMNS)
        for v in videos:
            page = v["row"] // 50
            writer.writerow([int(v["sample_id"]), v["caption"], page + 1, f"{page * 50 + 1:06d}_{page * 50 + 50:06d}",
                             iso_duration(v["seconds"]), config.base_url + v["url_path"]])
    return path


def write_hdvila(root: Path, config: WorldConfig, videos: list[dict]) -> Path:
    path = root / "hdvila.jsonl"
    with path.open("w") as f:
        for v in videos:
            clips = [{"clip_id": c["clip_id"], "span": c["span"]} for c in v["clips"]]
            f.write(json.dumps({"video_id": v["sample_id"], "url": config.base_url + v["url_path"],
                                "clip": clips}) + "\n")
    return path


def _truth_path(root: Path, v: dict) -> str | None:
    path = f"truth/{v['sample_id']}.json"
    return path if (root / path).exists() else None


def _scene_columns(x: dict) -> dict:
    columns = {k: x[k] for k in ("sample_id", "shape", "colour", "size", "position", "background", "caption")}
    if "params" in x:  # a video: where its shape starts
        params = x["params"]
        r = params["r_start"] if "r_start" in params else params["r"]
        return {**columns, "cx": params["start"][0], "cy": params["start"][1], "r": r}
    return {**columns, "cx": x["cx"], "cy": x["cy"], "r": x["r"]}


def write_ground_truth(root: Path, config: WorldConfig, images: list[dict], webvid: list[dict],
                       hdvila: list[dict]) -> tuple[Path, dict[str, dict[str, int]]]:
    """One row per LAION row, WebVid row and HD-VILA clip; returns the path and counts per category."""
    rows = []
    for r in images:
        url = config.base_url + r["url_path"]
        defects = truth_columns(r, lambda j: config.base_url + images[j]["url_path"], config.image_size)
        rows.append({**defects, "source": "laion", "key": url, "url": url, "url_path": r["url_path"], "row": r["row"],
                     "expected": r["expected"], "detail": r["detail"], **_scene_columns(r), "motion": None,
                     "text": r["text"], "width": r["width"], "height": r["height"]})
    for v in webvid:
        url = config.base_url + v["url_path"]
        defects = truth_columns(v, lambda j: config.base_url + webvid[j]["url_path"], config.video_size)
        rows.append({**defects, "source": "webvid", "key": url, "url": url, "url_path": v["url_path"], "row": v["row"],
                     "expected": v["expected"], "detail": v["detail"], **_scene_columns(v),
                     "motion": v["motion"], "text": v["caption"], "width": config.video_size,
                     "height": config.video_size, "duration": float(v["seconds"]), "truth": _truth_path(root, v)})
    for v in hdvila:
        url = config.base_url + v["url_path"]
        for c in v["clips"]:
            rows.append({**truth_columns(v, str, config.video_size), "source": "hdvila", "key": c["clip_id"],
                         "url": url, "url_path": v["url_path"],
                         "row": v["row"], "expected": c["expected"], "detail": c["detail"], **_scene_columns(v),
                         "motion": v["motion"], "text": None, "width": config.video_size,
                         "height": config.video_size, "duration": float(v["seconds"]),
                         "span_start": c["start"], "span_end": c["end"], "truth": _truth_path(root, v)})
    for row in rows:
        row["stage"] = CATEGORY_STAGE[row["expected"]]
    columns = {name: [row.get(name) for row in rows] for name in GROUND_TRUTH_SCHEMA.names}
    path = root / "ground_truth.parquet"
    pq.write_table(pa.table(columns, schema=GROUND_TRUTH_SCHEMA), path)
    counts: dict[str, dict[str, int]] = {}
    for source in ("laion", "webvid", "hdvila"):
        tally = Counter(row["expected"] for row in rows if row["source"] == source)
        counts[source] = dict(sorted(tally.items()))
    return path, counts


def write_world_json(root: Path, config: WorldConfig, rows: dict[str, int],
                     counts: dict[str, dict[str, int]]) -> Path:
    path = root / "world.json"
    world = {"version": WORLD_VERSION, "base_url": config.base_url, "slow_seconds": config.slow_seconds,
             "files": {"laion": "laion.parquet", "webvid": "webvid.csv", "hdvila": "hdvila.jsonl",
                       "ground_truth": "ground_truth.parquet", "served": "files", "truth": "truth"},
             "rows": rows, "counts": counts, "categories": CATEGORIES, "config": config.model_dump(mode="json")}
    path.write_text(json.dumps(world, indent=2, sort_keys=True) + "\n")
    return path
