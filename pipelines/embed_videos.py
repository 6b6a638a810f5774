"""CLIP embeddings of a video dataset's frames, computed once per shard (the video stages' condition).

    root/manifest.json -> one VideoShardEmbedder call per shard: a frame every `every_s` seconds,
    centre-cropped as the training clips are, through CLIP's image tower
    -> root/embeddings/NNNNN.parquet (key, frame_time list<float32> (n,), frame_emb list<float32> (n*D,))
    + root/embeddings/embeddings.json (what they depend on, and each finished shard's clip count)

temporal, interpolation and sr_low condition on the mean CLIP image embedding of a clip's frames; the
loader (`training.data.VideoDecoder`) averages the stored frames within each clip's time span instead of
running CLIP on every frame at every step. A shard is skipped when its parquet exists and the index
records it under the same CLIP and spacing. Each call writes its own parquet and returns its outcome;
the driver only records the outcomes in the index.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.clip import build_clip, encode_images
from model.config import ClipConfig
from model.precision import autocast_context, default_precision
from pipelines.embed import FROM_SCRATCH_SEED, clip_identity
from training.data import EMBEDDINGS_INDEX
from training.loaders.clips import decode_frames_every
from training.loaders.stream import iter_shard
from training.storage import EMBEDDINGS, embeddings_path, join, read_manifest

log = logging.getLogger(__name__)
EVERY_S = 0.5  # stored frame spacing: a 16-frame clip at the lowest fps the stages draw spans several
FRAMES_PER_BATCH = 64  # frames through CLIP at once


class VideoShardEmbedder:
    """Picklable per-shard worker: builds CLIP on its first call, then embeds one shard per call and writes
    its parquet. Returns {"name", "clips", "skipped"}; a clip that does not decode is skipped (logged), as
    the training loader skips it too."""

    def __init__(self, clip: ClipConfig, every_s: float = EVERY_S, device: str = "cpu") -> None:
        self.clip, self.every_s, self.device = clip, every_s, device
        self.model: torch.nn.Module | None = None

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(FROM_SCRATCH_SEED)  # only matters without weights: the image flow's model
                self.model = build_clip(self.clip, device=self.device)[0].eval()
        return self.model

    @torch.no_grad()
    def embed(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames (N, H, W, C) -> L2-normalised CLIP image embeddings (N, D) float32."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (N, C, H, W)
        out = []
        for part in x.split(FRAMES_PER_BATCH):
            with autocast_context(self.device, default_precision(self.device)):
                out.append(encode_images(self._model(), part.to(self.device)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()

    def __call__(self, root: str, shard: dict[str, Any]) -> dict[str, Any]:
        keys, times, embs, skipped = [], [], [], 0
        for sample in iter_shard(join(root, shard["name"])):
            data = next((sample[e] for e in ("mp4", "webm", "mkv", "avi", "mov") if e in sample), None)
            try:
                frames, at = decode_frames_every(bytes(data), self.every_s, self.clip.image_size)
            except (TypeError, RuntimeError, ValueError) as err:  # decord's errors are RuntimeErrors
                log.warning("%s: clip %s skipped: %s", shard["name"], sample["__key__"], err)
                skipped += 1
                continue
            keys.append(sample["__key__"])
            times.append(at)
            embs.append(self.embed(frames).reshape(-1))
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "frame_time": pa.array([t.tolist() for t in times], pa.list_(pa.float32())),
                          "frame_emb": pa.array([e.tolist() for e in embs], pa.list_(pa.float32()))})
        with fsspec.open(embeddings_path(root, shard["name"]), "wb") as fh:
            pq.write_table(table, fh)
        return {"name": shard["name"], "clips": len(keys), "skipped": skipped}


def embed_video_dataset(root: str, clip: ClipConfig, weights: str | None = None, *, every_s: float = EVERY_S,
                        device: str = "cpu", run: Callable | None = None) -> dict[str, Any]:
    """Frame embeddings for every shard of the video folder `root` not yet embedded under this CLIP and
    spacing. `weights` (a local file) overrides clip.weights_path. `run(embedder, root, shards)` maps the
    embedder over the pending shards and returns their outcomes (default: here, one after another; a Ray
    pool). Outcomes are recorded as they arrive. Returns the index plus `computed` and `skipped` shard names."""
    if weights is not None:
        clip = clip.model_copy(update={"weights_path": weights})
    identity = {"clip": clip_identity(clip), "dim": clip.embed_dim, "every_s": every_s}
    shards = [s for s in read_manifest(root, "videos").get("shards", []) if s.get("samples", 1) > 0]
    fs, _ = fsspec.core.url_to_fs(root)
    index_path = join(root, EMBEDDINGS, EMBEDDINGS_INDEX)
    fs.makedirs(join(root, EMBEDDINGS), exist_ok=True)
    old = json.loads(fs.cat(index_path)) if fs.exists(index_path) else None
    index = old if old is not None and all(old.get(k) == v for k, v in identity.items()) else {**identity, "shards": {}}
    pending = [s for s in shards if s["name"] not in index["shards"]
               or not fs.exists(embeddings_path(root, s["name"]))]
    embedder = VideoShardEmbedder(clip, every_s, device)
    for outcome in (run or (lambda e, r, todo: (e(r, s) for s in todo)))(embedder, root, pending):
        index["shards"][outcome["name"]] = {"clips": outcome["clips"], "skipped": outcome["skipped"]}
        with fs.open(index_path, "w") as fh:  # after each shard: a killed run keeps what it finished
            json.dump(index, fh, indent=2, sort_keys=True)
    done = {s["name"] for s in pending}
    return {**index, "computed": sorted(done), "skipped": sorted({s["name"] for s in shards} - done)}
