"""Batches for the stages, read from dataset folders (the files are the contract with `pipelines/`).

Image folder: manifest.json (kind "images"), shards/NNNNN.tar with KEY.jpg/.txt/.json (img2dataset's
webdataset output), embeddings/NNNNN.parquet (key, image_emb, text_emb) beside them.
Video folder: manifest.json (kind "videos"), shards/NNNNN.tar with KEY.mp4.

How samples reach Ray workers (`split`):
- "samples" (default): every worker walks the same seeded stream of all shards (a new shard order
  each epoch) and keeps every world-th sample, so the workers' batches together are exactly the global
  batch one worker would see. Each worker reads every shard's bytes but decodes only its own samples.
- "shards": worker r reads shards r, r+world, ... only (less reading for many shards and workers;
  the global batch then depends on the worker count).
Each sample carries a seed from (seed, stream, position): its random crop, fps and diffusion draws
follow it, whichever worker decodes it. A resumed run skips the samples of the steps already done.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Callable, Iterator, Literal

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from training.loaders.clips import FpsSchedule, decode_sample
from training.stages import ImageView, VideoView
from training.storage import IMAGE_EXTENSIONS, embeddings_path, join, read_manifest

log = logging.getLogger(__name__)
EMBEDDING_TABLES_KEPT = 8  # shards a shuffle buffer spans at once, with room to spare
Split = Literal["samples", "shards"]


def shard_urls(root: str, manifest: dict[str, Any]) -> list[str]:
    """The manifest's shards that hold samples, as paths under `root`."""
    names = [s["name"] for s in manifest.get("shards", []) if s.get("samples", 1) > 0]
    if not names:
        raise ValueError(f"{root}: the manifest lists no shard with samples")
    return [join(root, name) for name in names]


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


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one webdataset tar (any fsspec URL), as {"__key__", "__url__", ext: bytes}."""
    with fsspec.open(url, "rb") as fh:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": fh}]))


def sample_stream(urls: list[str], seed: int, shuffle_buffer: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, sample) forever: epoch e visits the shards in an order seeded by (seed, e), and with
    `shuffle_buffer` > 0 draws each next sample at random from a buffer of that many (webdataset's
    shuffle, seeded the same way; flushed at the end of each epoch, so an epoch still holds every sample
    once). Without it, consecutive samples of a shard always share a batch: a contrastive loss then sees
    the same negatives every epoch."""
    position, epoch = 0, 0
    while True:
        start = position
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(urls))
        for sample in _shuffled((s for i in order for s in iter_shard(urls[i])), shuffle_buffer, rng):
            yield position, sample
            position += 1
        if position == start:
            raise ValueError(f"the shards hold no samples: {urls[:3]}")
        epoch += 1


def _shuffled(samples: Iterator[dict[str, Any]], size: int, rng: np.random.Generator
              ) -> Iterator[dict[str, Any]]:
    """`samples` through a buffer of `size` (0 or 1: unchanged): once it is full, each new sample takes
    the place of a random one, which is yielded; the rest leave in random order at the end."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = sample
    rng.shuffle(buffer)
    yield from buffer


def sample_seed(seed: int, stream: int, position: int) -> int:
    """A 63-bit seed per sample, independent of which worker holds it."""
    return int(np.random.SeedSequence([seed, stream, position]).generate_state(1, np.uint64)[0] >> np.uint64(1))


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


class ImageDecoder:
    """One image sample -> {"image", "image_emb", "text_emb", "caption"} as its view asks."""

    def __init__(self, root: str, view: ImageView) -> None:
        self.root, self.view = root, view
        self._tables: dict[str, dict[str, tuple[np.ndarray, np.ndarray] | None]] = {}

    def _embeddings(self, url: str) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        """The shard's embeddings table. The shuffle buffer mixes samples of the shards it spans, so the
        last few shards' tables are kept (least recently used dropped), not only the current one."""
        table = self._tables.pop(url, None)
        if table is None:
            name = url[len(self.root.rstrip("/")) + 1:]
            table = load_embeddings(embeddings_path(self.root, name))
            while len(self._tables) >= EMBEDDING_TABLES_KEPT:
                self._tables.pop(next(iter(self._tables)))
        self._tables[url] = table  # now the most recently used
        return table

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
            table = self._embeddings(sample["__url__"])
            if key not in table:
                raise ValueError(f"{sample['__url__']}: sample {key} has no row in its embeddings parquet")
            if table[key] is None:
                return None  # rejected by the pixel filters (NSFW / watermark heads)
            image_emb, text_emb = table[key]
            out["image_emb"], out["text_emb"] = torch.tensor(image_emb), torch.tensor(text_emb)
        if self.view.tokens:
            out["caption"] = bytes(sample.get("txt", b"")).decode("utf-8", errors="replace")
        return out


class VideoDecoder:
    """One video sample -> {"video" (C, F, H, W), "fps"} at an fps drawn from the schedule at `progress`."""

    def __init__(self, view: VideoView, schedule: FpsSchedule = FpsSchedule()) -> None:
        self.view, self.schedule = view, schedule

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, progress: float) -> dict | None:
        clip = decode_sample(sample, self.view.frames, self.view.size, rng, None, self.schedule, progress)
        return None if clip is None else {"video": clip[0], "fps": clip[1]}


def collate(items: list[dict[str, Any]], tokenizer: Callable | None) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors; captions become token ids (B, L)."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "caption"}
    if "caption" in items[0]:
        if tokenizer is None:
            raise ValueError("captions need a tokenizer")
        batch["tokens"] = tokenizer([it["caption"] for it in items])
    return batch


def stage_batches(root: str, view: ImageView | VideoView, *, global_batch: int, rank: int, world: int,
                  seed: int, total_steps: int, start_step: int = 0, split: Split = "samples",
                  tokenizer: Callable | None = None, shuffle_buffer: int = 0,
                  fps: FpsSchedule = FpsSchedule()) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of global_batch / world samples, from step `start_step` on, forever.
    Each batch also holds "seed" (B,) int64, the per-sample seeds for the loss's random draws.
    Video clips are drawn at fps from `fps` at the step's progress through `total_steps`."""
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} does not split over {world} workers")
    kind = "images" if isinstance(view, ImageView) else "videos"
    urls = shard_urls(root, read_manifest(root, kind))
    decode = ImageDecoder(root, view) if kind == "images" else VideoDecoder(view, fps)
    local = global_batch // world
    if split == "shards":
        if len(urls) < world:
            raise ValueError(f"split='shards' needs at least {world} shards, {root} has {len(urls)}")
        urls, stream, stride, offset, per_step = urls[rank::world], rank + 1, 1, 0, local
    else:
        stream, stride, offset, per_step = 0, world, rank, global_batch
    items: list[dict[str, Any]] = []
    for position, sample in sample_stream(urls, seed + stream, shuffle_buffer):
        if position < start_step * per_step or position % stride != offset:
            continue
        item_seed = sample_seed(seed, stream, position)
        progress = (position // per_step) / max(total_steps - 1, 1)
        item = decode(sample, np.random.default_rng(item_seed), progress)
        if item is None:
            continue
        items.append({**item, "seed": torch.tensor(item_seed, dtype=torch.int64)})
        if len(items) == local:
            yield collate(items, tokenizer)
            items = []
