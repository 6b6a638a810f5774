"""The real-video side of the paper's zero-shot protocols, read from the datasets' own layouts.

- UCF-101: `<root>/<ClassName>/v_<ClassName>_gXX_cYY.avi` (the layout of UCF101.rar); the class names come
  from the folders and become prompts by splitting CamelCase ("ApplyEyeMakeup" -> "apply eye makeup")
  into configurable templates.
- MSR-VTT: the test split's captions from the dataset's annotation file - `test_videodatainfo.json` or
  `MSRVTT_data.json` ({"videos": [{"video_id", "split"?}], "sentences": [{"video_id", "caption"}]}), or
  the 1k-A split's `MSRVTT_JSFUSION_test.csv` (video_id, sentence) - and the videos from `TestVideo/`,
  `videos/all/` or `videos/`.

Clips are decoded with decord and brought to what the generated videos are: `frames` frames, square
(centre crop), `side` pixels, uint8 (F, H, W, 3). A missing dataset is one FileNotFoundError line naming
what is missing and where it looked.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import decord
import numpy as np

from pipelines.config import ConfigError

UCF_CLIP = re.compile(r"^v_(?P<cls>[A-Za-z0-9]+)_g(?P<group>\d+)_c(?P<clip>\d+)\.avi$")
MSRVTT_ANNOTATIONS = ("test_videodatainfo.json", "MSRVTT_data.json", "annotation/MSR_VTT.json",
                      "MSRVTT_JSFUSION_test.csv")
MSRVTT_VIDEO_DIRS = ("TestVideo", "videos/all", "videos", ".")
DEFAULT_TEMPLATES = ("{}",)


def class_text(name: str) -> str:
    """A UCF-101 class folder name as words: "ApplyEyeMakeup" -> "apply eye makeup", "YoYo" -> "yo yo"."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name).lower()


def class_prompts(classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict[str, list[str]]:
    """{class: [template.format(class_text(class)) for each template]}; a template holds one `{}`."""
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"each prompt template needs exactly one '{{}}' for the class name, got {list(templates)}")
    return {c: [t.format(class_text(c)) for t in templates] for c in classes}


def ucf101_classes(root: str | Path) -> list[str]:
    """Sorted class names: the folders under `root` holding at least one v_<Class>_gXX_cYY.avi clip."""
    base = Path(root)
    found = sorted(d.name for d in base.iterdir() if d.is_dir() and any(_ucf_clips(d))) if base.is_dir() else []
    if not found:
        raise FileNotFoundError(f"UCF-101 not found: no <ClassName>/v_<ClassName>_gXX_cYY.avi clips under {base}")
    return found


def _ucf_clips(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.iterdir()) if UCF_CLIP.match(p.name) and UCF_CLIP.match(p.name)["cls"]
            == folder.name)


def ucf101_reference(root: str | Path, classes: Sequence[str], count: int) -> list[tuple[str, Path]]:
    """`count` (class, clip) pairs spread evenly over the classes (round robin over each class's clips in
    name order), so a reference of any size covers every class: the real side of FVD."""
    per_class = {c: list(_ucf_clips(Path(root) / c)) for c in classes}
    out: list[tuple[str, Path]] = []
    depth = 0
    while len(out) < count and any(depth < len(v) for v in per_class.values()):
        out += [(c, clips[depth]) for c, clips in per_class.items() if depth < len(clips)]
        depth += 1
    return out[:count]


def read_clip(path: str | Path, frames: int, side: int, stride: int = 1) -> np.ndarray:
    """`frames` frames `stride` apart from the clip's middle, centre-cropped square and resized to `side`:
    (frames, side, side, 3) uint8. A clip shorter than that repeats its last frame. A clip that does not
    decode is a ConfigError naming the file (one line at the CLI): a reference set is not scored without it."""
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        n = len(reader)
        span = (frames - 1) * stride + 1
        start = max(0, (n - span) // 2)
        index = [min(start + i * stride, n - 1) for i in range(frames)]
        video = reader.get_batch(index).asnumpy()  # (F, H, W, 3)
    except (decord.DECORDError, RuntimeError, IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"reference video {path} does not decode: {reason[:200]}") from None
    return square(video, side)


def square(video: np.ndarray, side: int) -> np.ndarray:
    """(F, H, W, 3) -> (F, side, side, 3): centre crop to a square, then area/bilinear resize."""
    h, w = video.shape[1:3]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = video[:, top:top + s, left:left + s]
    interp = cv2.INTER_AREA if s > side else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (side, side), interpolation=interp) for f in crop])


def find_msrvtt_annotations(root: str | Path) -> Path:
    """The annotation file under `root` (or `root` itself), first of `MSRVTT_ANNOTATIONS`."""
    base = Path(root)
    if base.is_file():
        return base
    for name in MSRVTT_ANNOTATIONS:
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"MSR-VTT annotations not found: none of {', '.join(MSRVTT_ANNOTATIONS)} in {base}")


def msrvtt_captions(annotations: str | Path) -> list[tuple[str, str]]:
    """(video_id, caption) of the test split in file order. A JSON with a "split" per video keeps the
    "test" ones; a file without splits (test_videodatainfo.json, the 1k-A csv) is all test."""
    path = Path(annotations)
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return [(row["video_id"], row["sentence"].strip()) for row in csv.DictReader(fh)]
    data = json.loads(path.read_text())
    if "sentences" not in data:
        raise ValueError(f"{path}: an MSR-VTT annotation file needs a 'sentences' list")
    videos = data.get("videos", [])
    test = {v["video_id"] for v in videos if v.get("split", "test") == "test"} if videos else None
    return [(s["video_id"], s["caption"].strip()) for s in data["sentences"]
            if test is None or s["video_id"] in test]


def msrvtt_video(root: str | Path, video_id: str) -> Path:
    """The file of one MSR-VTT video (mp4) in the dataset's folders."""
    base = Path(root) if Path(root).is_dir() else Path(root).parent
    for folder in MSRVTT_VIDEO_DIRS:
        path = base / folder / f"{video_id}.mp4"
        if path.is_file():
            return path
    looked = ", ".join(str(base / f / f"{video_id}.mp4") for f in MSRVTT_VIDEO_DIRS)
    raise FileNotFoundError(f"MSR-VTT video {video_id} not found; looked at {looked}")
