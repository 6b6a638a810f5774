"""CLIP embeddings of an image dataset, computed once per shard (image flow, step 3).

    root/manifest.json -> a pool of ShardEmbedder actors (one CLIP each: one actor per GPU of the Ray
    cluster, else one per two CPUs), one call per shard: read the tar, decode its images to uint8 (a few
    threads, ahead of the model), convert and resize them on the device that runs CLIP, embed
    -> root/embeddings/NNNNN.parquet, then root/embeddings/NNNNN.done.json, both written by that actor

Each parquet holds one row per sample of its shard: `key`, `image_emb` and `text_emb` (L2-normalised
fixed_size_list<float32>[D]) and, with pixel filters configured, `nsfw_score`, `watermark_score`
(float32, null for a head that is off) and `pixel_keep`. The prior and the decoder read these instead
of running CLIP in their training loops. A sample without a caption gets the embedding of "".

The model runs in `model.precision.default_precision` (fp32 on CPU, bf16 autocast on CUDA); the two
agree to within rounding, so a resumed run may mix them.

Resume: embeddings/embeddings.json records what the embeddings depend on (the CLIP model and its
weights' sha256, the pixel-filter heads); it is written when that changes, not per shard. Each shard's
marker holds the hash of that identity, the row count and the samples the pixel filters kept. A shard is
skipped when its parquet and a marker of the same identity and the manifest's sample count exist;
anything else is recomputed, its old marker removed first, so a task killed mid-shard leaves a parquet
without a marker. Each call returns a summary of a few numbers: no embedding passes through the driver,
which reads the markers in batches and keeps only the pending shards' entries.
"""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from model.clip import build_clip, encode_images, encode_text
from model.config import ClipConfig
from model.precision import autocast_context, default_precision
from pipelines.manifest import ManifestError
from pipelines.pixel_filters import HEADS, PixelFilterConfig, filter_identity, keep_mask, load_heads, score
from training.loaders.stream import iter_shard
from training.storage import (EMBEDDINGS, EMBEDDINGS_INDEX, IMAGE_EXTENSIONS, embeddings_marker_path,
                              embeddings_markers, embeddings_path, hash_settings, join, read_embeddings_identity,
                              read_manifest, sha256_file)

FROM_SCRATCH_SEED = 0  # a CLIP without weights is initialised from this seed, the same in every actor
FAILURES_NAMED = 5  # failed shards named in the error; the rest are counted


def clip_identity(clip: ClipConfig) -> dict[str, Any]:
    """What the embeddings depend on: the architecture and the weights' sha256 (or the from-scratch seed).
    Raises FileNotFoundError naming the weights file when it is absent."""
    if clip.weights_path is None:
        weights = f"from-scratch:{clip.model_name}:seed{FROM_SCRATCH_SEED}"
    else:
        try:
            weights = sha256_file(clip.weights_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"CLIP weights not found: {clip.weights_path}") from None
    return {"model_name": clip.model_name, "weights": weights, "image_size": clip.image_size,
            "context_length": clip.context_length}


def write_identity(root: str, identity: dict[str, Any]) -> None:
    """Record what the embeddings of `root` depend on (embeddings/embeddings.json), unless it already says
    so: once per run at most, never per shard."""
    if read_embeddings_identity(root) != identity:
        fs, path = fsspec.core.url_to_fs(join(root, EMBEDDINGS))
        fs.makedirs(path, exist_ok=True)
        with fs.open(join(path, EMBEDDINGS_INDEX), "w") as fh:
            json.dump(identity, fh, indent=2, sort_keys=True)


def write_shard(root: str, name: str, table: pa.Table, identity: dict[str, Any], **extra: Any) -> None:
    """A shard's parquet, then its marker (the identity and its hash, the row count, `extra`): in that
    order, for resume."""
    with fsspec.open(embeddings_path(root, name), "wb") as fh:
        pq.write_table(table, fh)
    marker = {"shard": name, "rows": len(table), "identity": identity, "identity_sha256": hash_settings(identity)}
    with fsspec.open(embeddings_marker_path(root, name), "w") as fh:
        json.dump({**marker, **extra}, fh, sort_keys=True)


def drop_marker(root: str, name: str) -> None:
    """Remove a shard's marker before its parquet is rewritten: until the new one exists it is unfinished."""
    fs, path = fsspec.core.url_to_fs(embeddings_marker_path(root, name))
    if fs.exists(path):
        fs.rm(path)


def decode_image(sample: dict[str, Any]) -> np.ndarray:
    """A webdataset sample's image -> (H, W, 3) uint8 RGB; ValueError naming the sample when it has none or
    it does not decode."""
    data = next((sample[s] for s in IMAGE_EXTENSIONS if isinstance(sample.get(s), bytes)), None)
    where = f"{sample['__url__']}: sample {sample['__key__']!r}"
    if data is None:
        raise ValueError(f"{where} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB")).copy()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where}: image does not decode ({err})") from err


def decode_batch(samples: list[dict[str, Any]]) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Keys, uint8 images and captions ("" where a sample has none) of a run of samples."""
    captions = [s["txt"].decode("utf-8") if isinstance(s.get("txt"), bytes) else "" for s in samples]
    return [s["__key__"] for s in samples], [decode_image(s) for s in samples], captions


def device_pixels(images: list[np.ndarray], size: int, device: str) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, S, S) float in [0, 1] on `device`: the pixels cross to the device as
    uint8 and become float there. Each image is resized on its own, exactly as `model.clip.prepare_images`
    does (bicubic, antialiased, no crop), so mixed sizes batch and each equals `encode_images` on it alone."""
    if all(im.shape[:2] == (size, size) for im in images):
        return torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    out = []
    for im in images:
        x = torch.from_numpy(im).to(device).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        out.append(x)
    return torch.cat(out)


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prefetched(fn: Callable[[Any], Any], items: Iterable[Any], pool: ThreadPoolExecutor, depth: int) -> Iterator[Any]:
    """fn(item) for each item in order, computed in `pool` at most `depth` items ahead of the consumer."""
    ahead: deque = deque()
    for item in items:
        ahead.append(pool.submit(fn, item))
        if len(ahead) >= depth:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


def embedding_schema(dim: int, filters: bool) -> pa.Schema:
    fields = [("key", pa.string()), ("image_emb", pa.list_(pa.float32(), dim)),
              ("text_emb", pa.list_(pa.float32(), dim))]
    if filters:
        fields += [(f"{name}_score", pa.float32()) for name in HEADS] + [("pixel_keep", pa.bool_())]
    return pa.schema(fields)


def shard_table(parts: list[dict[str, np.ndarray]], dim: int, filters: bool) -> pa.Table:
    """One shard's rows, ordered by key (img2dataset's keys follow the tar's order)."""
    schema = embedding_schema(dim, filters)
    if not parts:
        return schema.empty_table()
    cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.argsort(cols["key"].astype(str), kind="stable")
    data: dict[str, Any] = {"key": [str(k) for k in cols["key"][order]]}
    for name in ("image_emb", "text_emb"):
        flat = pa.array(cols[name][order].reshape(-1), pa.float32())
        data[name] = pa.FixedSizeListArray.from_arrays(flat, dim)
    if filters:
        for name in HEADS:
            data[f"{name}_score"] = pa.array(cols[f"{name}_score"][order], pa.float32(), from_pandas=True)
        data["pixel_keep"] = pa.array(cols["pixel_keep"][order], pa.bool_())
    return pa.table(data, schema=schema)


class ShardEmbedder:
    """Ray actor: builds CLIP and the pixel-filter heads once, then embeds and writes shard after shard.
    `threads` decode images ahead of the model."""

    def __init__(self, clip: ClipConfig, filters: PixelFilterConfig | None, device: str, batch_size: int,
                 threads: int = 1):
        self.device, self.size, self.dim, self.batch_size = device, clip.image_size, clip.embed_dim, batch_size
        self.precision = default_precision(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FROM_SCRATCH_SEED)  # only matters without weights: same model in every actor
            model, _, self.tokenizer = build_clip(clip, device="cpu")
        self.model = model.to(device)
        self.filters = filters
        self.heads = {name: head.to(device) for name, head in load_heads(filters, clip.embed_dim).items()}
        self.pool, self.depth = ThreadPoolExecutor(threads), threads + 1

    @torch.no_grad()
    def embed(self, keys: list[str], images: list[np.ndarray], captions: list[str]) -> dict[str, np.ndarray]:
        pixels = device_pixels(images, self.size, self.device)
        with autocast_context(self.device, self.precision):
            image = encode_images(self.model, pixels)  # (B, D)
            text = encode_text(self.model, self.tokenizer, captions)  # (B, D)
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        out = {"key": np.array(keys, dtype=object), "image_emb": image.cpu().numpy(), "text_emb": text.cpu().numpy()}
        if self.heads:
            scores = {name: score(head, image) for name, head in self.heads.items()}
            nan = np.full(len(image), np.nan, np.float32)  # a head that is off scores null
            for name in HEADS:
                out[f"{name}_score"] = scores[name].cpu().numpy() if name in scores else nan
            out["pixel_keep"] = keep_mask(self.filters, scores).cpu().numpy()
        return out

    def read(self, root: str, shard: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]], int]:
        """The embedded batches of one shard and the samples read; ManifestError past the manifest's count."""
        parts, read = [], 0
        samples = chunks(iter_shard(join(root, shard["name"])), self.batch_size)
        for keys, images, captions in prefetched(decode_batch, samples, self.pool, self.depth):
            read += len(keys)
            if read > shard["samples"]:
                raise ManifestError(f"{shard['name']}: the tar holds more samples than the manifest's "
                                    f"{shard['samples']}")
            parts.append(self.embed(keys, images, captions))
        return parts, read

    def run(self, root: str, shard: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
        """Embed one shard, write its parquet and then its marker; returns {"name", "samples" (the manifest's),
        "rows", "pixel_kept", "error"}: no marker is written when the error is set or rows < samples."""
        name = shard["name"]
        summary = {"name": name, "samples": shard["samples"], "rows": 0, "pixel_kept": 0, "error": None}
        drop_marker(root, name)
        try:
            parts, read = self.read(root, shard)
        except ValueError as err:  # ManifestError included; an image that does not decode
            return {**summary, "error": str(err)}
        except tarfile.TarError as err:  # a damaged tar
            return {**summary, "error": f"{name}: the tar does not read ({err.args[0] if err.args else err})"}
        except OSError as err:  # a missing one
            return {**summary, "error": f"{name}: the tar does not read ({err})"}
        if read < shard["samples"]:
            return {**summary, "rows": read}
        table = shard_table(parts, self.dim, bool(self.heads))
        if len(set(table["key"].to_pylist())) != len(table):
            return {**summary, "error": f"{name}: sample keys repeat in the tar"}
        kept = int(np.sum(table["pixel_keep"].to_numpy(zero_copy_only=False))) if self.heads else len(table)
        write_shard(root, name, table, identity, pixel_kept=kept)
        return {**summary, "rows": len(table), "pixel_kept": kept}


@contextlib.contextmanager
def _ray_cluster() -> Iterator[Any]:
    """The running Ray cluster, else a local one started here and shut down afterwards."""
    import ray  # seconds to import: only when a shard needs embedding, not for a run that skips them all

    started = not ray.is_initialized()
    if started:
        ray.init()
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _resolve_gpu(ray: Any, use_gpu: bool | Literal["auto"]) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu == "auto":
        return gpus >= 1
    if use_gpu and gpus < 1:
        raise ValueError("use_gpu=True but the Ray cluster has no GPU")
    return bool(use_gpu)


def embed_shards(ray: Any, root: str, shards: list[dict], identity: dict[str, Any], clip: ClipConfig,
                 filters: PixelFilterConfig | None, *, batch_size: int, gpu: bool,
                 concurrency: int | None = None) -> Iterator[dict[str, Any]]:
    """The summaries of `ShardEmbedder.run` over `shards` as they finish, from a pool of `concurrency` actors
    (default: one per GPU with `gpu`, else one per two CPUs); each decodes with the CPUs it holds."""
    from ray.util import ActorPool

    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = concurrency or (int(ray.cluster_resources()["GPU"]) if gpu else max(1, cpus // 2))
    size = max(1, min(size, len(shards)))
    threads = _actor_cpus(ray, gpu, size)
    actor = ray.remote(ShardEmbedder).options(num_cpus=threads, num_gpus=1 if gpu else 0)
    actors = [actor.remote(clip, filters, "cuda" if gpu else "cpu", batch_size, threads) for _ in range(size)]
    try:
        yield from ActorPool(actors).map_unordered(lambda a, s: a.run.remote(root, s, identity), shards)
    finally:
        for handle in actors:
            ray.kill(handle)


def _actor_cpus(ray: Any, gpu: bool, actors: int) -> int:
    """CPUs each actor holds and decodes with: its share of the cluster, at most what one node of the kind
    it runs on has per actor (a GPU node's CPUs over its GPUs), so every actor can be placed."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if gpu:
        return max(1, min(int(r.get("CPU", 0) // r["GPU"]) for r in nodes if r.get("GPU", 0) >= 1))
    cpus = [int(r.get("CPU", 0)) for r in nodes]
    return max(1, min(sum(cpus) // actors, max(cpus)))


def pending_shards(root: str, shards: list[dict], identity: dict[str, Any], rows: bool = True) -> list[dict]:
    """The shards without a parquet and a marker of this identity (and, with `rows`, the manifest's
    sample count)."""
    digest = hash_settings(identity)
    markers = embeddings_markers(root, [s["name"] for s in shards])
    return [s for s, (_, m) in zip(shards, markers) if m is None or m.get("identity_sha256") != digest
            or (rows and m.get("rows") != s["samples"])]


class Failures:
    """The shards that ended without a marker, counted, with the first few named for the error."""

    def __init__(self) -> None:
        self.short: list[str] = []
        self.errors: list[str] = []
        self.count = 0

    def add(self, out: dict[str, Any]) -> None:
        if out["error"] is None and out["rows"] == out["samples"]:
            return
        self.count += 1
        if len(self.short) + len(self.errors) < FAILURES_NAMED:
            if out["error"]:
                self.errors.append(out["error"])
            else:
                self.short.append(f"{out['name']} {out['rows']} vs {out['samples']}")

    def check(self) -> None:
        """One ManifestError naming the failed shards (the first `FAILURES_NAMED`), if any failed."""
        parts = ["shards hold fewer samples than the manifest says (read vs manifest): " + ", ".join(self.short)
                 ] if self.short else []
        parts += self.errors
        if self.count > len(self.short) + len(self.errors):
            parts.append(f"{self.count} shards in all")
        if parts:
            raise ManifestError("; ".join(parts))


def embed_image_dataset(root: str, clip: ClipConfig, weights: str | None, *, batch_size: int = 64,
                        use_gpu: bool | Literal["auto"] = "auto", filters: PixelFilterConfig | None = None,
                        concurrency: int | None = None) -> dict:
    """CLIP image and text embeddings (and pixel-filter scores) for every sample of every shard in
    `root/manifest.json`, written to `root/embeddings/`. `weights` (a local file) overrides
    `clip.weights_path`; neither set embeds with a seeded from-scratch model (tests only).
    `use_gpu="auto"` puts one actor on each GPU of the Ray cluster when it has any. Returns the identity
    (embeddings.json), `computed` and `skipped` shard names, and the `rows` and `pixel_kept` samples of
    the computed shards. Raises ManifestError when a shard's tar disagrees with the manifest or holds an
    image that does not decode (its marker is not written; the other shards are)."""
    if weights is not None:
        clip = clip.model_copy(update={"weights_path": weights})
    identity = {"clip": clip_identity(clip), "dim": clip.embed_dim, "pixel_filters": filter_identity(filters)}
    shards = read_manifest(root)["shards"]
    write_identity(root, identity)
    pending = pending_shards(root, shards, identity)
    for shard in pending:
        if not shard["samples"]:  # a shard with no samples still gets its (empty) parquet
            drop_marker(root, shard["name"])
            write_shard(root, shard["name"], shard_table([], clip.embed_dim, bool(identity["pixel_filters"])),
                        identity, pixel_kept=0)
    work = [s for s in pending if s["samples"]]
    totals, failures = {"rows": 0, "pixel_kept": 0}, Failures()
    if work:
        with _ray_cluster() as ray:
            for out in embed_shards(ray, root, work, identity, clip, filters if identity["pixel_filters"] else None,
                                    batch_size=batch_size, gpu=_resolve_gpu(ray, use_gpu),
                                    concurrency=concurrency):
                failures.add(out)
                totals = {k: totals[k] + out[k] for k in totals}
    failures.check()
    names = {s["name"] for s in pending}
    return {**identity, **totals, "computed": [s["name"] for s in shards if s["name"] in names],
            "skipped": [s["name"] for s in shards if s["name"] not in names]}
