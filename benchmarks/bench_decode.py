"""Decode throughput for training clips: decord (what the loader uses) vs PyAV seek + decode.

Both decoders read the same file and the same frame indices: 16-frame clips at a few fps, with
random starts drawn once from a seeded rng, scaled at decode time to the training size. PyAV seeks
to the keyframe before the clip, decodes forward and keeps the frames whose index is wanted
(index = round(pts * time_base * fps)); its decoder runs with frame threading, as decord's does.
The frames the two return are compared, so the ratio is between decoders doing the same work.

    PYTHONPATH=. python benchmarks/bench_decode.py [--video PATH] [--clips 3] [--size 36x64]

Writes benchmarks/results/decode.json and prints a table; about 30 s on two CPU cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "test_video.mp4"
RESULTS = ROOT / "benchmarks" / "results" / "decode.json"
FPS = (1, 5, 10, 30)
N_FRAMES = 16


def clip_starts(n_video: int, stride: int, n_clips: int, seed: int) -> list[int]:
    """Random clip starts, the same for both decoders."""
    span = (N_FRAMES - 1) * stride + 1
    return [int(s) for s in np.random.default_rng(seed).integers(0, n_video - span + 1, n_clips)]


def decode_decord(path: str, indices: list[int], height: int, width: int) -> np.ndarray:
    reader = decord.VideoReader(path, width=width, height=height)
    return reader.get_batch(indices).asnumpy()  # (F, H, W, C)


def decode_pyav(path: str, indices: list[int], height: int, width: int) -> np.ndarray:
    """Seek to the keyframe at or before the first index, decode forward, keep the wanted frames."""
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate, base = Fraction(stream.average_rate), stream.time_base
        container.seek(int(Fraction(indices[0]) / rate / base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            index = round(frame.pts * base * rate)
            if index in wanted:
                frames[index] = frame.to_ndarray(format="rgb24", width=width, height=height)
            if index >= indices[-1]:
                break
    missing = wanted - frames.keys()
    if missing:
        raise RuntimeError(f"PyAV did not return frames {sorted(missing)[:4]}")
    return np.stack([frames[i] for i in indices])  # (F, H, W, C)


def bench(path: str, n_clips: int, height: int, width: int) -> list[dict]:
    probe = decord.VideoReader(path)
    n_video, native_fps = len(probe), probe.get_avg_fps()
    del probe
    rows = []
    for fps in FPS:
        stride = max(1, round(native_fps / fps))
        clips = [[s + i * stride for i in range(N_FRAMES)] for s in clip_starts(n_video, stride, n_clips, fps)]
        row = {"fps": fps, "stride": stride, "clips": n_clips, "frames": n_clips * N_FRAMES}
        outputs = {}
        for name, decode in (("decord", decode_decord), ("pyav", decode_pyav)):
            start = time.perf_counter()
            outputs[name] = [decode(path, idx, height, width) for idx in clips]
            seconds = time.perf_counter() - start
            row[f"{name}_s"] = round(seconds, 4)
            row[f"{name}_frames_per_s"] = round(row["frames"] / seconds, 1)
        diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()
                 for a, b in zip(outputs["decord"], outputs["pyav"])]
        row["mean_abs_pixel_diff"] = round(float(np.mean(diffs)), 3)
        row["decord_over_pyav"] = round(row["decord_frames_per_s"] / row["pyav_frames_per_s"], 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", default=str(DEFAULT_VIDEO))
    parser.add_argument("--clips", type=int, default=3, help="clips per fps")
    parser.add_argument("--size", default="36x64", help="HxW the frames are scaled to while decoding")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not Path(args.video).exists():
        raise SystemExit(f"video not found: {args.video}")
    height, width = (int(v) for v in args.size.lower().split("x"))
    rows = bench(args.video, args.clips, height, width)
    result = {
        "video": Path(args.video).name, "frames_per_clip": N_FRAMES, "size_hw": [height, width],
        "decord": decord.__version__, "pyav": av.__version__, "machine": platform.machine(),
        "python": platform.python_version(), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'fps':>4} {'stride':>6} {'decord f/s':>11} {'pyav f/s':>9} {'ratio':>6} {'pixel diff':>10}")
    for r in rows:
        print(f"{r['fps']:>4} {r['stride']:>6} {r['decord_frames_per_s']:>11} {r['pyav_frames_per_s']:>9} "
              f"{r['decord_over_pyav']:>6} {r['mean_abs_pixel_diff']:>10}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
