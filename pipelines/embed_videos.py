"""CLIP embeddings of a video dataset's frames, computed once per shard (the video stages' condition).

    root/manifest.json -> one VideoShardEmbedder call per shard: a frame every `every_s` seconds,
    centre-cropped as the training clips are, through CLIP's image tower
    -> root/embeddings/NNNNN.parquet (key, frame_time list<float32> (n,), frame_emb list<float32> (n*D,)),
    then root/embeddings/NNNNN.done.json (what they depend on, the clips embedded and skipped), both
    written by the call that computed them; root/embeddings/embeddings.json records what they depend on

temporal, interpolation and sr_low condition on the mean CLIP image embedding of a clip's frames; the
loader (`training.data.VideoDecoder`) averages the stored frames within each clip's time span instead of
running CLIP on every frame at every step. A shard is skipped when its parquet and a marker of the same
CLIP and spacing exist; a recomputed shard's old marker is removed first, so a call killed mid-shard
leaves a parquet without one. Frames cross to the device as uint8 and become float there. Each call
returns a summary of a few numbers; the driver keeps no per-shard ledger.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from model.clip import build_clip, encode_images
from model.config import ClipConfig
from model.precision import autocast_context, default_precision
from pipelines.embed import FROM_SCRATCH_SEED, clip_identity, drop_marker, pending_shards, write_identity, write_shard
from training.loaders.clips import decode_frames_every
from training.loaders.stream import iter_shard
from training.storage import join, read_manifest

log = logging.getLogger(__name__)
EVERY_S = 0.5  # stored frame spacing: a 16-frame clip at the lowest fps the stages draw spans several
FRAMES_PER_BATCH = 64  # frames through CLIP at once


class VideoShardEmbedder:
    """Picklable per-shard worker: builds CLIP on its first call, then embeds one shard per call and writes
    its parquet and marker. Returns {"name", "clips", "skipped"}; a clip that does not decode is skipped
    (logged), as the training loader skips it too."""

    def __init__(self, clip: ClipConfig, every_s: float = EVERY_S, device: str = "cpu",
                 identity: dict[str, Any] | None = None) -> None:
        self.clip, self.every_s, self.device = clip, every_s, device
        self.identity = identity or video_identity(clip, every_s)
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
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (N, C, H, W) uint8: float on the device
        out = []
        for part in x.split(FRAMES_PER_BATCH):
            with autocast_context(self.device, default_precision(self.device)):
                out.append(encode_images(self._model(), part.to(self.device)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()

    def __call__(self, root: str, shard: dict[str, Any]) -> dict[str, Any]:
        drop_marker(root, shard["name"])
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
        write_shard(root, shard["name"], table, self.identity, skipped_clips=skipped)
        return {"name": shard["name"], "clips": len(keys), "skipped": skipped}


def video_identity(clip: ClipConfig, every_s: float) -> dict[str, Any]:
    """What a video dataset's frame embeddings depend on: the CLIP (see `clip_identity`) and the spacing."""
    return {"clip": clip_identity(clip), "dim": clip.embed_dim, "every_s": every_s}


def embed_video_dataset(root: str, clip: ClipConfig, weights: str | None = None, *, every_s: float = EVERY_S,
                        device: str = "cpu", run: Callable | None = None) -> dict[str, Any]:
    """Frame embeddings for every shard of the video folder `root` not yet embedded under this CLIP and
    spacing. `weights` (a local file) overrides clip.weights_path. `run(embedder, root, shards)` maps the
    embedder over the pending shards and returns their summaries (default: here, one after another; a Ray
    pool). Returns the identity (embeddings.json), `computed` and `skipped` shard names, and the `clips`
    embedded and `failed` (clips that did not decode) in the computed shards."""
    if weights is not None:
        clip = clip.model_copy(update={"weights_path": weights})
    identity = video_identity(clip, every_s)
    shards = [s for s in read_manifest(root, "videos").get("shards", []) if s.get("samples", 1) > 0]
    write_identity(root, identity)
    pending = pending_shards(root, shards, identity, rows=False)  # a clip that does not decode has no row
    embedder = VideoShardEmbedder(clip, every_s, device, identity)
    totals = {"clips": 0, "failed": 0}
    for out in (run or (lambda e, r, todo: (e(r, s) for s in todo)))(embedder, root, pending):
        totals = {"clips": totals["clips"] + out["clips"], "failed": totals["failed"] + out["skipped"]}
    done = {s["name"] for s in pending}
    return {**identity, **totals, "computed": [s["name"] for s in shards if s["name"] in done],
            "skipped": [s["name"] for s in shards if s["name"] not in done]}
