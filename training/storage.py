"""Files in dataset and run folders, on a local disk or behind any fsspec URL (s3://, gs://, file://).

The dataset folder is the contract between `pipelines/` (which writes it) and training (which reads
only files): `manifest.json` names its kind, its shards with their sample counts and checksums. Both
layers read and hash it through this module, so they agree on paths, digests and what a manifest is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the members of a sample that hold its image
EMBEDDINGS = "embeddings"  # beside shards/: one parquet of CLIP embeddings per image shard


def join(root: str, *parts: str) -> str:
    """`root`/parts for a local path or any fsspec URL."""
    return "/".join([root.rstrip("/"), *parts])


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem that holds `url` (a local path or any fsspec URL)."""
    return fsspec.core.url_to_fs(url)[0]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes (a local path or any fsspec URL)."""
    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_settings(settings: Any) -> str:
    """The sha256 of a JSON-able tree with sorted keys: two configs are the same when their hashes are."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def embeddings_path(root: str, shard_name: str) -> str:
    """shards/00007.tar -> `root`/embeddings/00007.parquet (written by the pipelines' embed flow)."""
    return join(root, EMBEDDINGS, PurePosixPath(shard_name).stem + ".parquet")


def read_manifest(root: str, kind: str | None = None) -> dict[str, Any]:
    """The dataset folder's manifest; with `kind`, it must hold that kind of dataset."""
    path = join(root, MANIFEST)
    try:
        with fsspec.open(path, "r") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"no dataset manifest at {path}") from None
    if kind is not None and manifest.get("kind") != kind:
        raise ValueError(f"{root} holds a {manifest.get('kind')!r} dataset; this stage reads {kind}")
    return manifest
