"""Files in dataset and run folders, on a local disk or behind any fsspec URL (s3://, gs://, file://).

The dataset folder is the contract between `pipelines/` (which writes it) and training (which reads
only files): `manifest.json` names its kind, its shards with their sample counts and checksums. Both
layers read and hash it through this module, so they agree on paths, digests and what a manifest is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import fsspec

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the members of a sample that hold its image
EMBEDDINGS = "embeddings"  # beside shards/: one parquet of CLIP embeddings per image shard
EMBEDDINGS_INDEX = "embeddings.json"  # in embeddings/: what every shard's embeddings depend on
EMBEDDINGS_MARKER = ".done.json"  # NNNNN.done.json: that shard's parquet is complete (see embeddings_marker_path)
MARKERS_READ_AT_ONCE = 1000


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


def embeddings_marker_path(root: str, shard_name: str) -> str:
    """shards/00007.tar -> `root`/embeddings/00007.done.json: written after the shard's parquet by the task
    that wrote it, with what the embeddings depend on (as in embeddings.json, and its `hash_settings`
    as "identity_sha256") and the row count."""
    return join(root, EMBEDDINGS, PurePosixPath(shard_name).stem + EMBEDDINGS_MARKER)


def read_embeddings_identity(root: str) -> dict[str, Any] | None:
    """What the dataset's embeddings depend on (`root`/embeddings/embeddings.json), None when absent."""
    fs, path = fsspec.core.url_to_fs(join(root, EMBEDDINGS, EMBEDDINGS_INDEX))
    return json.loads(fs.cat(path)) if fs.exists(path) else None


def embeddings_markers(root: str, names: list[str]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(shard name, its marker) for each of `names`; the marker is None when it or the parquet is absent
    or it does not parse. One listing of the folder, then the markers `MARKERS_READ_AT_ONCE` at a time
    (fsspec fetches each batch concurrently on object stores)."""
    fs, base = fsspec.core.url_to_fs(join(root, EMBEDDINGS))
    listed = {PurePosixPath(p).name for p in fs.ls(base, detail=False)} if fs.isdir(base) else set()
    for start in range(0, len(names), MARKERS_READ_AT_ONCE):
        paths = {}
        for name in names[start:start + MARKERS_READ_AT_ONCE]:
            stem = PurePosixPath(name).stem
            if stem + ".parquet" in listed and stem + EMBEDDINGS_MARKER in listed:
                paths[name] = join(base, stem + EMBEDDINGS_MARKER)
        got = fs.cat(list(paths.values()), on_error="omit") if paths else {}
        for name in names[start:start + MARKERS_READ_AT_ONCE]:
            data = got.get(paths.get(name, ""))
            try:
                yield name, json.loads(data) if data is not None else None
            except ValueError:
                yield name, None


def unfinished_embeddings(root: str, names: list[str]) -> list[str]:
    """The shards among `names` whose embeddings are not finished under what embeddings.json records: no
    parquet, no marker (a task killed before writing it), or a marker of other CLIP weights or settings."""
    identity = read_embeddings_identity(root)
    if identity is None:
        return list(names)
    want = hash_settings(identity)
    return [name for name, marker in embeddings_markers(root, names)
            if marker is None or marker.get("identity_sha256") != want]


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
