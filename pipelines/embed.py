"""CLIP embeddings of an image dataset, computed once per shard (image flow, step 3).

    root/manifest.json -> Ray Data: read_webdataset over the shards -> decode (CPU tasks)
    -> ClipEmbedder (actor pool: one CLIP per actor, one GPU each when the Ray cluster has GPUs)
    -> root/embeddings/NNNNN.parquet (one per shard) + root/embeddings/embeddings.json

Each parquet holds one row per sample of its shard: `key`, `image_emb` and `text_emb` (L2-normalised
fixed_size_list<float32>[D]) and, with pixel filters configured, `nsfw_score`, `watermark_score`
(float32, null for a head that is off) and `pixel_keep`. The prior and the decoder read these instead
of running CLIP in their training loops. A sample without a caption gets the embedding of "".

The model runs in `model.precision.default_precision` (fp32 on CPU, bf16 autocast on CUDA); the two
agree to within rounding, so a resumed run may mix them. Ray fuses decoding into the actors when both
run on CPUs; with GPUs, decoding stays on CPU tasks and the actors only run CLIP.

Resume: embeddings.json records what the embeddings depend on (the CLIP model and its weights' sha256,
the pixel-filter heads) and the row count of each finished shard. A shard is skipped when its parquet
exists and its entry was written under the same dependencies; anything else is recomputed. Shards are
added to the index as they finish, so a killed run keeps its finished shards.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from typing import Any, Iterator, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from model.clip import build_clip, encode_images, encode_text
from model.config import ClipConfig
from model.precision import autocast_context, default_precision
from pipelines.manifest import ManifestError
from pipelines.pixel_filters import HEADS, PixelFilterConfig, filter_identity, keep_mask, load_heads, score
from training.storage import EMBEDDINGS, IMAGE_EXTENSIONS, embeddings_path, join, read_manifest, sha256_file

INDEX = "embeddings.json"
FROM_SCRATCH_SEED = 0  # a CLIP without weights is initialised from this seed, the same in every actor


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


def decode_samples(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Webdataset rows (raw bytes) -> pixels (B, 3, S, S) float in [0, 1] and captions.

    Each image is resized on its own, exactly as `model.clip.prepare_images` does (bicubic, antialiased,
    no crop), so shards with mixed sizes batch and the result equals `encode_images` on that image."""
    keys = batch["__key__"]
    pixels = np.empty((len(keys), 3, image_size, image_size), np.float32)
    for i, key in enumerate(keys):
        data = next((batch[s][i] for s in IMAGE_EXTENSIONS if s in batch and isinstance(batch[s][i], bytes)), None)
        if data is None:
            raise ValueError(f"{batch['__url__'][i]}: sample {key!r} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
        try:
            with Image.open(io.BytesIO(data)) as img:
                x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W)
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"{batch['__url__'][i]}: sample {key!r}: image does not decode ({err})") from err
        x = x.float() / 255.0
        if tuple(x.shape[-2:]) != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        pixels[i] = x[0].numpy()
    texts = batch["txt"] if "txt" in batch else [None] * len(keys)
    captions = np.array([t.decode("utf-8") if isinstance(t, bytes) else "" for t in texts], dtype=object)
    return {"shard": batch["__url__"], "key": keys, "pixels": pixels, "caption": captions}


class ClipEmbedder:
    """Ray Data actor: builds CLIP and the pixel-filter heads once, then embeds batch after batch."""

    def __init__(self, clip: ClipConfig, filters: PixelFilterConfig | None, device: str):
        self.device = device
        self.precision = default_precision(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FROM_SCRATCH_SEED)  # only matters without weights: same model in every actor
            model, _, self.tokenizer = build_clip(clip, device="cpu")
        self.model = model.to(device)
        self.filters = filters
        self.heads = {name: head.to(device) for name, head in load_heads(filters, clip.embed_dim).items()}

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.from_numpy(batch["pixels"]).to(self.device)
        with autocast_context(self.device, self.precision):
            image = encode_images(self.model, pixels)  # (B, D)
            text = encode_text(self.model, self.tokenizer, [str(c) for c in batch["caption"]])  # (B, D)
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        out = {"shard": batch["shard"], "key": batch["key"], "image_emb": image.cpu().numpy(),
               "text_emb": text.cpu().numpy()}
        if self.heads:
            scores = {name: score(head, image) for name, head in self.heads.items()}
            nan = np.full(len(image), np.nan, np.float32)  # a head that is off scores null
            for name in HEADS:
                out[f"{name}_score"] = scores[name].cpu().numpy() if name in scores else nan
            out["pixel_keep"] = keep_mask(self.filters, scores).cpu().numpy()
        return out


def embedding_schema(dim: int, filters: bool) -> pa.Schema:
    fields = [("key", pa.string()), ("image_emb", pa.list_(pa.float32(), dim)),
              ("text_emb", pa.list_(pa.float32(), dim))]
    if filters:
        fields += [(f"{name}_score", pa.float32()) for name in HEADS] + [("pixel_keep", pa.bool_())]
    return pa.schema(fields)


def _shard_table(parts: list[dict[str, np.ndarray]], dim: int, filters: bool) -> pa.Table:
    """One shard's rows, ordered by key (img2dataset's keys follow the tar's order)."""
    cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if name != "shard"}
    order = np.argsort(cols["key"].astype(str), kind="stable")
    data: dict[str, Any] = {"key": [str(k) for k in cols["key"][order]]}
    for name in ("image_emb", "text_emb"):
        flat = pa.array(cols[name][order].reshape(-1), pa.float32())
        data[name] = pa.FixedSizeListArray.from_arrays(flat, dim)
    if filters:
        for name in HEADS:
            data[f"{name}_score"] = pa.array(cols[f"{name}_score"][order], pa.float32(), from_pandas=True)
        data["pixel_keep"] = pa.array(cols["pixel_keep"][order], pa.bool_())
    return pa.table(data, schema=embedding_schema(dim, filters))


def _read_index(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)


def _write_index(fs: fsspec.AbstractFileSystem, path: str, index: dict) -> None:
    with fs.open(path, "w") as fh:
        json.dump(index, fh, indent=2, sort_keys=True)


def _fresh_index(old: dict | None, identity: dict) -> dict:
    """The old index when it was written under the same dependencies, else an empty one."""
    if old is not None and all(old.get(k) == v for k, v in identity.items()):
        return old
    return {**identity, "shards": {}, **({"pixel_kept": {}} if identity["pixel_filters"] else {})}


def _pending(fs: fsspec.AbstractFileSystem, root: str, shards: list[dict], index: dict) -> list[dict]:
    """Shards whose parquet is absent or whose index entry is missing or counts other samples; their
    entries leave the index, so a run killed before rewriting them never counts them as done."""
    pending = [s for s in shards if index["shards"].get(s["name"]) != s["samples"]
               or not fs.exists(embeddings_path(root, s["name"]))]
    for shard in pending:
        index["shards"].pop(shard["name"], None)
        index.get("pixel_kept", {}).pop(shard["name"], None)
    return pending


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


def _dataset(ray: Any, fs: fsspec.AbstractFileSystem, paths: list[str], clip: ClipConfig,
             filters: PixelFilterConfig | None, *, batch_size: int, gpu: bool, concurrency: int | None) -> Any:
    """The Ray Data pipeline: read tars -> decode on CPU tasks -> embed in an actor pool."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = concurrency or (int(ray.cluster_resources()["GPU"]) if gpu else max(1, cpus // 2))
    ds = ray.data.read_webdataset(paths, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), decoder=None,
                                  suffixes=[*IMAGE_EXTENSIONS, "txt"])
    ds = ds.map_batches(decode_samples, fn_kwargs={"image_size": clip.image_size}, batch_size=batch_size,
                        batch_format="numpy")
    return ds.map_batches(ClipEmbedder, fn_constructor_kwargs={"clip": clip, "filters": filters,
                                                               "device": "cuda" if gpu else "cpu"},
                          batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpu else 0)


def _write_shard(fs: fsspec.AbstractFileSystem, root: str, shard: dict, parts: list[dict], index: dict,
                 index_path: str) -> None:
    """Write one finished shard's parquet, then record it in the index (in that order, for resume)."""
    table = _shard_table(parts, index["dim"], bool(index["pixel_filters"]))
    if len(set(table["key"].to_pylist())) != len(table):
        raise ManifestError(f"{shard['name']}: sample keys repeat in the tar")
    with fs.open(embeddings_path(root, shard["name"]), "wb") as fh:
        pq.write_table(table, fh)
    index["shards"][shard["name"]] = len(table)
    if index["pixel_filters"]:
        index["pixel_kept"][shard["name"]] = int(np.sum(table["pixel_keep"].to_numpy(zero_copy_only=False)))
    _write_index(fs, index_path, index)


def _run(ds: Any, fs: fsspec.AbstractFileSystem, root: str, by_path: dict[str, dict], index: dict,
         index_path: str) -> None:
    """Stream embedded rows to the driver; a shard is written as soon as all its samples have arrived."""
    parts: dict[str, list[dict]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for path in np.unique(batch["shard"].astype(str)):
            shard = by_path.get(path)
            if shard is None:
                raise RuntimeError(f"Ray Data read {path!r}, which is none of the shards asked for")
            rows = batch["shard"].astype(str) == path
            counts[path] += int(rows.sum())
            if counts[path] > shard["samples"]:
                index["shards"].pop(shard["name"], None)
                _write_index(fs, index_path, index)
                raise ManifestError(f"{shard['name']}: the tar holds more samples than the manifest's "
                                    f"{shard['samples']}")
            parts[path].append({k: v[rows] for k, v in batch.items()})
            if counts[path] == shard["samples"]:
                _write_shard(fs, root, shard, parts.pop(path), index, index_path)
    short = [f"{s['name']} {counts.get(p, 0)} vs {s['samples']}" for p, s in by_path.items()
             if counts.get(p, 0) != s["samples"]]
    if short:
        raise ManifestError("shards hold fewer samples than the manifest says (read vs manifest): "
                            + ", ".join(short))


def embed_image_dataset(root: str, clip: ClipConfig, weights: str | None, *, batch_size: int = 64,
                        use_gpu: bool | Literal["auto"] = "auto", filters: PixelFilterConfig | None = None,
                        concurrency: int | None = None) -> dict:
    """CLIP image and text embeddings (and pixel-filter scores) for every sample of every shard in
    `root/manifest.json`, written to `root/embeddings/`. `weights` (a local file) overrides
    `clip.weights_path`; neither set embeds with a seeded from-scratch model (tests only).
    `use_gpu="auto"` puts one actor on each GPU of the Ray cluster when it has any.
    Returns the index (embeddings.json) plus `computed` and `skipped` shard names."""
    if weights is not None:
        clip = clip.model_copy(update={"weights_path": weights})
    identity = {"clip": clip_identity(clip), "dim": clip.embed_dim, "pixel_filters": filter_identity(filters)}
    shards = read_manifest(root)["shards"]
    fs, path = fsspec.core.url_to_fs(root)
    index_path = join(path, EMBEDDINGS, INDEX)
    index = _fresh_index(_read_index(fs, index_path), identity)
    pending = _pending(fs, path, shards, index)
    fs.makedirs(join(path, EMBEDDINGS), exist_ok=True)
    _write_index(fs, index_path, index)
    for shard in pending:
        if not shard["samples"]:  # a shard with no samples still gets its (empty) parquet
            _write_shard(fs, path, shard, [_empty_part(index)], index, index_path)
    by_path = {join(path, s["name"]): s for s in pending if s["samples"]}
    if by_path:
        with _ray_cluster() as ray:
            gpu = _resolve_gpu(ray, use_gpu)
            ds = _dataset(ray, fs, list(by_path), clip, filters if identity["pixel_filters"] else None,
                          batch_size=batch_size, gpu=gpu, concurrency=concurrency)
            _run(ds, fs, path, by_path, index, index_path)
    names = {s["name"] for s in pending}
    return {**index, "computed": [s["name"] for s in shards if s["name"] in names],
            "skipped": [s["name"] for s in shards if s["name"] not in names]}


def _empty_part(index: dict) -> dict[str, np.ndarray]:
    dim = index["dim"]
    part = {"key": np.array([], dtype=object), "image_emb": np.zeros((0, dim), np.float32),
            "text_emb": np.zeros((0, dim), np.float32)}
    if index["pixel_filters"]:
        part.update({f"{name}_score": np.zeros(0, np.float32) for name in HEADS})
        part["pixel_keep"] = np.zeros(0, bool)
    return part
