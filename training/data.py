"""Batches for the stages, read from dataset folders (the files are the contract with `pipelines/`).

Image folder: manifest.json (kind "images"), shards/NNNNN.tar with KEY.jpg/.txt/.json (img2dataset's
webdataset output), embeddings/NNNNN.parquet (key, image_emb, text_emb) beside them.
Video folder: manifest.json (kind "videos"), shards/NNNNN.tar with KEY.mp4, and optionally
embeddings/NNNNN.parquet (key, frame_emb, frame_time) from the embed step (`pipelines.embed_videos`).

How samples reach Ray workers (`split`, see `choose_split`):
- "shards" (what "auto" picks when there are at least as many shards as workers): worker r reads shards
  r, r+world, ... only, in its own seeded order; across the workers every sample is read once per epoch.
  The global batch then depends on the worker count.
- "samples" (what "auto" picks otherwise): every worker walks the same seeded stream of all shards and
  keeps every world-th sample, so the workers' batches together are exactly the global batch one worker
  would see (N workers train exactly as one does). Each worker reads every shard's bytes.
Each sample carries a seed from (seed, stream, position): its random crop, fps and diffusion draws
follow it, whichever worker decodes it. The stream order is a function of (seed, position) alone
(training/loaders/stream.py), so a resumed run starts at step * batch directly, without re-reading.

Decoding runs in `loader_workers` DataLoader processes per Ray worker: loader worker w of W decodes this
worker's chunks (a batch's worth of samples) w, w+W, ... and the DataLoader hands them back in order, so
the batches do not depend on W. Batches are collated into pinned memory when the device is CUDA.
"""
from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from training.loaders.clips import FpsSchedule, decode_sample
from training.loaders.stream import sample_seed, sample_stream
from training.stages import ImageView, VideoView
from training.storage import IMAGE_EXTENSIONS, embeddings_path, join, read_manifest, unfinished_embeddings

log = logging.getLogger(__name__)
EMBEDDING_TABLES_KEPT = 8  # shards a shuffle buffer spans at once, with room to spare
PREFETCH_BATCHES = 2  # batches each rank's loader keeps decoded ahead of the step
Split = Literal["auto", "samples", "shards"]


def shard_urls(root: str, manifest: dict[str, Any]) -> list[str]:
    """The manifest's shards that hold samples, as paths under `root`."""
    names = [s["name"] for s in manifest.get("shards", []) if s.get("samples", 1) > 0]
    if not names:
        raise ValueError(f"{root}: the manifest lists no shard with samples")
    return [join(root, name) for name in names]


def shard_sizes(root: str, manifest: dict[str, Any]) -> list[int]:
    """Samples per shard of `shard_urls`, from the manifest (which every dataset of `pipelines/` records)."""
    shards = [s for s in manifest.get("shards", []) if s.get("samples", 1) > 0]
    if any("samples" not in s for s in shards):
        raise ValueError(f"{root}: the manifest does not record each shard's samples")
    return [int(s["samples"]) for s in shards]


def load_embeddings(path: str) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """key -> (image_emb (D,), text_emb (D,)) float32 from one embeddings parquet; None for a sample
    the pixel filters rejected (column `pixel_keep` False), which training skips."""
    try:
        with fsspec.open(path, "rb") as fh:
            table = pq.read_table(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no embeddings at {path}: run the embed flow on this dataset first") from None
    image = np.asarray(table.column("image_emb").combine_chunks().flatten(), dtype=np.float32)
    text = np.asarray(table.column("text_emb").combine_chunks().flatten(), dtype=np.float32)
    dim = image.size // max(len(table), 1)
    keys = table.column("key").to_pylist()
    keep = table.column("pixel_keep").to_pylist() if "pixel_keep" in table.column_names else [True] * len(keys)
    return {k: (image[i * dim:(i + 1) * dim], text[i * dim:(i + 1) * dim]) if keep[i] is not False else None
            for i, k in enumerate(keys)}


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """JPEG/PNG bytes -> (3, size, size) float in [-1, 1]: short side resized, centre square cropped."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    return x.float().div(127.5).sub(1.0)


class EmbeddingTables:
    """Per-shard parquet tables loaded on first use; the last few are kept (least recently used dropped),
    as the shuffle buffer mixes samples of the shards it spans."""

    def __init__(self, root: str, load: Callable[[str], dict]) -> None:
        self.root, self.load = root, load
        self._tables: dict[str, dict] = {}

    def __call__(self, url: str) -> dict:
        table = self._tables.pop(url, None)
        if table is None:
            table = self.load(embeddings_path(self.root, url[len(self.root.rstrip("/")) + 1:]))
            while len(self._tables) >= EMBEDDING_TABLES_KEPT:
                self._tables.pop(next(iter(self._tables)))
        self._tables[url] = table  # now the most recently used
        return table


class ImageDecoder:
    """One image sample -> {"image", "image_emb", "text_emb", "caption"} as its view asks."""

    def __init__(self, root: str, view: ImageView) -> None:
        self.view, self.tables = view, EmbeddingTables(root, load_embeddings)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, progress: float) -> dict | None:
        key, out = sample["__key__"], {}
        if self.view.size is not None:
            data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            try:
                out["image"] = decode_image(data, self.view.size)
            except (OSError, ValueError, TypeError) as err:
                log.warning("sample %s skipped: %s", key, err if data is not None else "no image")
                return None
        if self.view.embeddings:
            table = self.tables(sample["__url__"])
            if key not in table:
                raise ValueError(f"{sample['__url__']}: sample {key} has no row in its embeddings parquet")
            if table[key] is None:
                return None  # rejected by the pixel filters (NSFW / watermark heads)
            image_emb, text_emb = table[key]
            out["image_emb"], out["text_emb"] = torch.tensor(image_emb), torch.tensor(text_emb)
        if self.view.tokens:
            out["caption"] = bytes(sample.get("txt", b"")).decode("utf-8", errors="replace")
        return out


def load_frame_embeddings(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (frame times (n,) in seconds, CLIP image embeddings (n, D)) from a video embeddings parquet."""
    with fsspec.open(path, "rb") as fh:
        table = pq.read_table(fh)
    times, embs = table.column("frame_time").to_pylist(), table.column("frame_emb").to_pylist()
    return {k: (np.asarray(t, np.float32), np.asarray(e, np.float32).reshape(len(t), -1))
            for k, t, e in zip(table.column("key").to_pylist(), times, embs)}


def span_embedding(times: np.ndarray, embs: np.ndarray, start_s: float, end_s: float) -> torch.Tensor:
    """The renormalised mean of the stored frame embeddings within [start_s, end_s] (the nearest frame
    when the span falls between stored frames): (D,)."""
    inside = (times >= start_s - 1e-3) & (times <= end_s + 1e-3)
    if not inside.any():
        inside = np.abs(times - (start_s + end_s) / 2) == np.abs(times - (start_s + end_s) / 2).min()
    mean = torch.from_numpy(embs[inside].mean(0))
    return torch.nn.functional.normalize(mean, dim=-1)


class VideoDecoder:
    """One video sample -> {"video" (C, F, H, W), "fps"} at an fps drawn from the schedule at `progress`,
    and "clip_emb" (D,) where the dataset has stored frame embeddings (the embed step's
    embeddings/*.parquet): the mean CLIP embedding of the frames the clip spans."""

    def __init__(self, root: str, view: VideoView, schedule: FpsSchedule = FpsSchedule(),
                 datasets: tuple[str, ...] | None = None) -> None:
        self.view, self.schedule, self.datasets = view, schedule, datasets
        self.tables = EmbeddingTables(root, load_frame_embeddings) if has_video_embeddings(root) else None

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, progress: float) -> dict | None:
        if self.datasets is not None and clip_dataset(sample) not in self.datasets:
            return None
        clip = decode_sample(sample, self.view.frames, self.view.size, rng, None, self.schedule, progress)
        if clip is None:
            return None
        out = {"video": clip.frames, "fps": clip.fps}
        if self.tables is not None:
            stored = self.tables(sample["__url__"]).get(sample["__key__"])
            if stored is None:
                raise ValueError(f"{sample['__url__']}: sample {sample['__key__']} has no stored frame embeddings")
            out["clip_emb"] = span_embedding(*stored, clip.start_s, clip.end_s)
        return out


def clip_dataset(sample: dict[str, Any]) -> str | None:
    """The dataset the video flow recorded for a clip (its KEY.json's "dataset"), None when absent."""
    try:
        return json.loads(sample.get("json", b"{}")).get("dataset")
    except (ValueError, AttributeError):
        return None


def has_video_embeddings(root: str) -> bool:
    """Whether the embed step finished frame embeddings for every shard of this video dataset (each has
    its parquet and a marker written under the CLIP and spacing embeddings.json records); a dataset without
    them, or with only some, is conditioned by the frozen CLIP."""
    names = [s["name"] for s in read_manifest(root, "videos").get("shards", []) if s.get("samples", 1) > 0]
    return not unfinished_embeddings(root, names)


def stack(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample records -> one tensor per field (B, ...) and the captions as a list: a loader worker
    hands over a chunk as a few tensors, not one per sample."""
    if not items:
        return {}
    return {k: [it[k] for it in items] if k == "caption" else torch.stack([it[k] for it in items])
            for k in items[0]}


def take(parts: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first n samples of consecutive stacked parts, and what is left of them."""
    merged = parts[0] if len(parts) == 1 else {
        k: sum((p[k] for p in parts), []) if k == "caption" else torch.cat([p[k] for p in parts]) for k in parts[0]}
    rest = {k: v[n:] for k, v in merged.items()}
    return {k: v[:n] for k, v in merged.items()}, [rest] if len(rest["seed"]) else []


def collate(stacked: dict[str, Any], tokenizer: Callable | None, pin: bool = False) -> dict[str, torch.Tensor]:
    """A batch as the step takes it: tensors (in pinned memory with `pin`), captions as token ids (B, L)."""
    batch = {k: (v.pin_memory() if pin else v) for k, v in stacked.items() if k != "caption"}
    if "caption" in stacked:
        if tokenizer is None:
            raise ValueError("captions need a tokenizer")
        batch["tokens"] = tokenizer(stacked["caption"])
    return batch


def choose_split(split: Split, shards: int, world: int) -> Literal["samples", "shards"]:
    """"auto": each worker its own shards when there are enough of them (and more than one worker),
    else the sample split; an explicit "shards" with too few shards is refused."""
    if split == "auto":
        return "shards" if world > 1 and shards >= world else "samples"
    if split == "shards" and shards < world:
        raise ValueError(f"split='shards' needs at least {world} shards, the dataset has {shards}")
    if split not in ("samples", "shards"):
        raise ValueError(f"split must be auto, samples or shards, got {split!r}")
    return split


@dataclass(frozen=True)
class RankStream:
    """One Ray worker's share of the sample stream, from the position a (re)start begins at."""

    urls: list[str]
    sizes: list[int]
    seed: int  # the run's seed; the stream's own seed is seed + stream
    stream: int  # 0: the shared stream of the sample split; rank + 1: a worker's own shards
    stride: int  # this worker keeps positions = offset (mod stride)
    offset: int
    per_step: int  # stream positions one optimiser step consumes
    start: int  # the first position to read
    total_steps: int
    shuffle_buffer: int

    def owned(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(position, sample) of this worker's samples, in stream order."""
        for position, sample in sample_stream(self.urls, self.seed + self.stream, self.shuffle_buffer,
                                               self.sizes, self.start):
            if position % self.stride == self.offset:
                yield position, sample


class SampleSource(torch.utils.data.IterableDataset):
    """A worker's decoded samples in chunks of `chunk` stream positions, stacked (`stack`), each sample
    with its "seed"; samples that could not be used are left out. Loader worker w of W decodes chunks w,
    w+W, ..., so the DataLoader's round-robin hands them back in stream order whatever W is; a chunk per
    message keeps the hand-over cheap next to decoding."""

    def __init__(self, rank_stream: RankStream, decode: Callable, chunk: int = 1) -> None:
        super().__init__()
        self.rank_stream, self.decode, self.chunk = rank_stream, decode, chunk

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rs, records = self.rank_stream, []
        for i, (position, sample) in enumerate(rs.owned()):
            if (i // self.chunk) % workers != worker:
                continue
            item_seed = sample_seed(rs.seed, rs.stream, position)
            progress = (position // rs.per_step) / max(rs.total_steps - 1, 1)
            item = self.decode(sample, np.random.default_rng(item_seed), progress)
            records.append(item and {**item, "seed": torch.tensor(item_seed, dtype=torch.int64)})
            if len(records) == self.chunk:
                yield stack([r for r in records if r])
                records = []


def rank_stream(root: str, kind: str, *, global_batch: int, rank: int, world: int, seed: int, total_steps: int,
                start_step: int, split: Split, shuffle_buffer: int) -> RankStream:
    """Which samples this worker reads, and from where a run at `start_step` starts."""
    manifest = read_manifest(root, kind)
    urls, sizes = shard_urls(root, manifest), shard_sizes(root, manifest)
    chosen = choose_split(split, len(urls), world)
    if rank == 0:  # the process's own stdout, as the loop's progress lines
        print(f"[data] split={chosen} ({split}): {len(urls)} shards over {world} workers",
              file=sys.__stdout__ or sys.stdout, flush=True)
    local = global_batch // world
    if chosen == "shards":
        return RankStream(urls[rank::world], sizes[rank::world], seed, rank + 1, 1, 0, local,
                          start_step * local, total_steps, shuffle_buffer)
    return RankStream(urls, sizes, seed, 0, world, rank, global_batch, start_step * global_batch, total_steps,
                      shuffle_buffer)


def stage_batches(root: str, view: ImageView | VideoView, *, global_batch: int, rank: int, world: int,
                  seed: int, total_steps: int, start_step: int = 0, split: Split = "auto",
                  tokenizer: Callable | None = None, shuffle_buffer: int = 0,
                  fps: FpsSchedule = FpsSchedule(), video_datasets: tuple[str, ...] | None = None,
                  loader_workers: int = 0, pin_memory: bool = False, decode: Callable | None = None
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of global_batch / world samples, from step `start_step` on, forever.
    Each batch also holds "seed" (B,) int64, the per-sample seeds for the loss's random draws.
    Video clips are drawn at fps from `fps` at the step's progress through `total_steps`; with
    `video_datasets`, only clips of those datasets are used. `loader_workers` > 0 decodes in that many
    DataLoader processes, PREFETCH_BATCHES batches ahead. `decode`: a decoder in place of the view's
    (training.routing's crops and frames)."""
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} does not split over {world} workers")
    kind = "images" if isinstance(view, ImageView) else "videos"
    source = rank_stream(root, kind, global_batch=global_batch, rank=rank, world=world, seed=seed,
                         total_steps=total_steps, start_step=start_step, split=split,
                         shuffle_buffer=shuffle_buffer)
    if decode is None:
        decode = ImageDecoder(root, view) if kind == "images" else VideoDecoder(root, view, fps, video_datasets)
    local = global_batch // world
    chunks: Any = SampleSource(source, decode, chunk=local)
    if loader_workers > 0:
        chunks = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=loader_workers,
                                             prefetch_factor=max(2, -(-PREFETCH_BATCHES // loader_workers)))
    parts, count = [], 0
    for part in chunks:
        if not part:
            continue
        parts.append(part)
        count += len(part["seed"])
        while count >= local:
            batch, parts = take(parts, local)
            count -= local
            yield collate(batch, tokenizer, pin_memory)
