"""Resumable generation of a protocol's samples, spread over Ray actors.

The samples are numbered; batch k holds samples [k * batch_size, (k + 1) * batch_size) and is one
`text_to_video` call with seed `seed + k`, so a video depends only on its number and the settings. Each
video is written as `<out>/videos/<index>.npy` ((F, H, W, 3) uint8) as soon as its batch is made; a rerun
skips the batches whose files all exist. Every sample ends in one line of `<out>/outcomes.jsonl`: made,
skipped (already there) or failed with the reason.

Actors: one per GPU where Ray sees GPUs, else `actors` CPU actors (0: no Ray, in this process). Each actor
loads the cascade once. The driver keeps at most two batches in flight per actor and only counts outcomes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipelines.defaults import DEFAULT_FPS


def video_path(out: str | Path, index: int) -> Path:
    return Path(out) / "videos" / f"{index:06d}.npy"


def read_video(out: str | Path, index: int) -> np.ndarray:
    return np.load(video_path(out, index), allow_pickle=False)


class SampleMaker:
    """Holds one loaded cascade and turns batches of (index, prompt) into saved videos."""

    def __init__(self, cfg_tree: dict, weights: str, tracking_uri: str | None, alias: str,
                 stop_at: str | None, fps: float = DEFAULT_FPS, device: str | None = None) -> None:
        from pipelines.config import PipelineConfig
        from pipelines.generate import load_cascade

        cfg = PipelineConfig.model_validate(cfg_tree)
        self.cascade = load_cascade(cfg, weights, tracking_uri, stop_at=stop_at, device=device, alias=alias)
        self.stop_at, self.fps = stop_at, fps

    def sources(self) -> dict:
        return self.cascade.sources

    def make(self, out: str, seed: int, batch: Sequence[tuple[int, str]]) -> list[dict]:
        """Generate one batch with `seed`, save each video (atomically), return one outcome per sample."""
        from model.cascade import to_uint8
        from model.cascade_uses import text_to_video

        try:
            result = text_to_video(self.cascade, [p for _, p in batch], self.fps, seed, self.stop_at, progress=False)
        except Exception as err:  # one failed batch is recorded per sample; the others go on
            return [{"index": i, "outcome": "failed", "reason": f"{type(err).__name__}: {err}"} for i, _ in batch]
        videos = to_uint8(result[result.last_stage]).numpy()
        for (index, _), video in zip(batch, videos):
            path = video_path(out, index)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, video)
            os.replace(tmp, path)
        return [{"index": i, "outcome": "made"} for i, _ in batch]


def _batches(prompts: Callable[[int], str], total: int, batch_size: int, out: Path
             ) -> Iterator[tuple[int, list[tuple[int, str]] | None, range]]:
    """(k, the batch's (index, prompt) pairs or None when every video is already there, its indices)."""
    for k, start in enumerate(range(0, total, batch_size)):
        indices = range(start, min(start + batch_size, total))
        done = all(video_path(out, i).is_file() for i in indices)
        yield k, None if done else [(i, prompts(i)) for i in indices], indices


def _actor_count(actors: int | None) -> tuple[int, dict]:
    """(how many actors, their resources): one per GPU Ray sees, else `actors` (default 1) on one CPU each."""
    import ray

    if not ray.is_initialized():
        ray.init()  # a local cluster, or the one RAY_ADDRESS names
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    return max(1, actors or 1), {"num_cpus": 1}


def generate_all(cfg_tree: dict, out: str | Path, prompts: Callable[[int], str], total: int, *,
                 weights: str = "mlflow", tracking_uri: str | None = None, alias: str = "current",
                 stop_at: str | None = None, fps: float = DEFAULT_FPS, seed: int = 0, batch_size: int = 4,
                 actors: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Make the `total` samples (`prompts(i)` is sample i's text) that are not in `out` yet; returns the
    counts of made/skipped/failed and the weights the cascade loaded (`cascade.sources`)."""
    out = Path(out).resolve()  # actors may run in another working directory
    (out / "videos").mkdir(parents=True, exist_ok=True)
    if weights != "mlflow" and "://" not in weights:
        weights = str(Path(weights).expanduser().resolve())
    args = (cfg_tree, weights, tracking_uri, alias, stop_at, fps)
    counts = {"made": 0, "skipped": 0, "failed": 0}
    with open(out / "outcomes.jsonl", "a") as log:
        def record(rows: list[dict]) -> None:
            for row in rows:
                counts[row["outcome"]] += 1
                log.write(json.dumps(row) + "\n")

        todo = _batches(prompts, total, batch_size, out)
        if actors == 0:
            maker = SampleMaker(*args, device=device)
            for k, batch, indices in todo:
                record(maker.make(str(out), seed + k, batch) if batch else _skipped(indices))
            return {"counts": counts, "sources": maker.sources()}
        sources = _generate_on_ray(args, str(out), todo, seed, actors, record)
    return {"counts": counts, "sources": sources}


def _skipped(indices: range) -> list[dict]:
    return [{"index": i, "outcome": "skipped"} for i in indices]


def _outcomes(ref: Any, batch: list[tuple[int, str]]) -> list[dict]:
    """A batch's outcomes; an actor that died on it (e.g. out of memory) fails each of its samples."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return [{"index": i, "outcome": "failed", "reason": reason} for i, _ in batch]


def _generate_on_ray(args: tuple, out: str, todo: Iterator, seed: int, actors: int | None,
                     record: Callable[[list[dict]], None]) -> dict:
    import ray

    n, resources = _actor_count(actors)
    maker_cls = ray.remote(**resources)(SampleMaker)
    pool = [maker_cls.remote(*args, device="cuda" if "num_gpus" in resources else "cpu") for _ in range(n)]
    pending: dict = {}
    turn = 0
    for k, batch, indices in todo:
        if batch is None:
            record(_skipped(indices))
            continue
        while len(pending) >= 2 * n:  # bounded: at most two batches queued per actor
            ready, _ = ray.wait(list(pending), num_returns=1)
            record(_outcomes(ready[0], pending.pop(ready[0])))
        pending[pool[turn % n].make.remote(out, seed + k, batch)] = batch
        turn += 1
    for ref in list(pending):
        record(_outcomes(ref, pending[ref]))
    sources = ray.get(pool[0].sources.remote())
    for actor in pool:
        ray.kill(actor)
    return sources
