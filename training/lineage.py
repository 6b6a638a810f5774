"""The paper's premise, checked on what was trained: no sample of a video-trained stage carried text.

For each registered stage that trains on video (temporal, interpolation, sr_low), the MLflow run behind its
current weights names its dataset folder (`config/resolved.json`) and holds the manifest it trained on
(`datasets/training/manifest.json`). Every shard that manifest lists is read again: its sha256 must be the
recorded one (so these are the bytes the stage trained on), its sample count the recorded one, and no sample
may hold a text member (`.txt`, `.caption`, subtitles, ...) or a caption-like field in its `.json` (a URL
whose file name is a caption included). The loader reads only the `.mp4` (training/loaders/clips.py); this
check says the data had nothing else to give.
Anything that cannot be verified (no record, a missing shard, a changed checksum) is a named problem, and
the lineage is then not text-free: an unproven claim does not pass.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlsplit

import fsspec

from training.registry import stage_versions
from training.stages import stage_spec
from training.storage import join

# Member extensions that are text, and .json keys whose non-empty string values would be a caption.
TEXT_EXTENSIONS = frozenset({"txt", "text", "caption", "cap", "vtt", "srt", "ass", "sub", "title"})
TEXT_KEYS = frozenset({"caption", "captions", "text", "txt", "name", "title", "description", "subtitles",
                       "tags", "keywords"})
# .json keys holding a URL: one whose file name is three or more words is a caption too (a real WebVid
# contentUrl ends in its caption, ".../stock-footage-horse-grazing-on-green-screen.mp4").
URL_KEYS = frozenset({"url", "contenturl", "content_url", "video_url", "source_url", "page_url", "original_url"})
SLUG_WORDS = 3
RESOLVED_CONFIG = "config/resolved.json"
TRAINED_MANIFEST = "datasets/training/manifest.json"
MAX_EXAMPLES = 5  # text findings quoted per dataset


class _Hashing:
    """A read-only stream that hashes what passes through it (tarfile reads the shard once)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.fh.read(size)
        self.digest.update(block)
        return block

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def slug_words(url: str) -> list[str]:
    """The words of a URL's file name ("stock-footage-a-cat.mp4" -> stock, footage, cat): runs of two or
    more letters, the extension left out."""
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return re.findall(r"[A-Za-z]{2,}", name.rsplit(".", 1)[0] if "." in name else name)


def text_fields(obj: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of the non-empty strings (or lists of them) held under caption-like keys of a JSON
    value, at any depth, and of URLs whose file name is a caption (`SLUG_WORDS` words or more)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{path}.{key}" if path else str(key)
            if str(key).lower() in TEXT_KEYS and _has_text(value):
                yield here
            elif str(key).lower() in URL_KEYS and isinstance(value, str) and len(slug_words(value)) >= SLUG_WORDS:
                yield here
            else:
                yield from text_fields(value, here)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from text_fields(value, f"{path}[{i}]")


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return any(_has_text(v) for v in value)
    return False


def scan_shard(url: str) -> dict[str, Any]:
    """{"sha256", "samples", "members": {ext: count}, "text": ["KEY.ext" or "KEY.json:field", ...]} for one
    webdataset tar (a sample is the members sharing the name before the first dot)."""
    keys: set[str] = set()
    members: dict[str, int] = {}
    text: list[str] = []
    with fsspec.open(url, "rb") as raw:
        stream = _Hashing(raw)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                keys.add(member.name[: len(member.name) - len(base)] + key)
                ext = ext.lower()
                members[ext] = members.get(ext, 0) + 1
                if ext in TEXT_EXTENSIONS or ext.rsplit(".", 1)[-1] in TEXT_EXTENSIONS:
                    text.append(base)
                elif ext == "json":
                    try:
                        meta = json.loads(tar.extractfile(member).read())
                    except ValueError:
                        text.append(f"{base}: not JSON")  # unreadable metadata cannot be shown text-free
                        continue
                    text += [f"{base}:{field}" for field in text_fields(meta)]
        digest = stream.drain()
    return {"sha256": digest, "samples": len(keys), "members": dict(sorted(members.items())), "text": text}


def check_dataset(root: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Every shard of `manifest` under `root`, scanned and compared with what the manifest recorded."""
    problems: list[str] = []
    if (manifest.get("sample") or {}).get("text") is not None:
        problems.append(f"the manifest declares a text member ({manifest['sample']['text']!r})")
    samples = text_samples = 0
    members: dict[str, int] = {}
    examples: list[str] = []
    for shard in manifest.get("shards", []):
        url = join(root, shard["name"])
        try:
            found = scan_shard(url)
        except FileNotFoundError:
            problems.append(f"{shard['name']}: missing")
            continue
        except tarfile.TarError as err:
            problems.append(f"{shard['name']}: not a readable tar ({err})")
            continue
        if shard.get("sha256") is None:
            problems.append(f"{shard['name']}: no checksum recorded, so not shown to be the shard trained on")
        elif found["sha256"] != shard["sha256"]:
            problems.append(f"{shard['name']}: changed since training (sha256 {found['sha256'][:12]}, "
                            f"recorded {shard['sha256'][:12]})")
        if found["samples"] != shard.get("samples"):
            problems.append(f"{shard['name']}: {found['samples']} samples, the manifest records {shard.get('samples')}")
        samples += found["samples"]
        keys_with_text = {t.split(".", 1)[0] for t in found["text"]}
        text_samples += len(keys_with_text)
        examples += [f"{shard['name']}:{t}" for t in found["text"][:MAX_EXAMPLES - len(examples)]]
        for ext, n in found["members"].items():
            members[ext] = members.get(ext, 0) + n
    if not manifest.get("shards"):
        problems.append("the manifest lists no shard")
    return {"dataset": root, "inputs_hash": manifest.get("inputs_hash"), "shards": len(manifest.get("shards", [])),
            "samples": samples, "members": dict(sorted(members.items())), "text_samples": text_samples,
            "text_examples": examples, "problems": problems}


def _run_record(tracking_uri: str, run_id: str, path: str) -> dict[str, Any]:
    """A JSON artifact of a run, read through the store's own artifact repository."""
    import mlflow.artifacts  # seconds to import: only when a lineage is checked

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        return json.loads(Path(local).read_text())


def video_lineage(tracking_uri: str, alias: str = "current") -> dict[str, Any]:
    """Per registered video stage: the version `alias` points at, its run, and `check_dataset` on the manifest
    that run trained on (a dataset shared by several stages is scanned once). {"stages": {...}, "datasets":
    {root: check}, "video_samples", "text_samples", "problems", "text_free"}; text_free needs at least one
    video stage, every dataset verified and no text found."""
    stages: dict[str, dict] = {}
    datasets: dict[str, dict] = {}
    problems: list[str] = []
    for stage, version in stage_versions(tracking_uri, alias).items():
        if stage_spec(stage).data != "videos":
            continue
        entry = {"version": version["version"], "run_id": version["run_id"]}
        stages[stage] = entry
        try:
            root = _run_record(tracking_uri, version["run_id"], RESOLVED_CONFIG)["data"]
            manifest = _run_record(tracking_uri, version["run_id"], TRAINED_MANIFEST)
        except Exception as err:  # a run without the records (weights registered by hand)
            problems.append(f"{stage} v{version['version']}: no training record of its data ({type(err).__name__})")
            continue
        entry["dataset"] = root
        key = f"{root}#{manifest.get('inputs_hash')}"
        if key not in datasets:
            datasets[key] = check_dataset(root, manifest)
        problems += [f"{stage}: {p}" for p in datasets[key]["problems"]]
    if not stages:
        problems.append("no registered stage trained on video")
    text = sum(d["text_samples"] for d in datasets.values())
    return {"stages": stages, "datasets": list(datasets.values()),
            "video_samples": sum(d["samples"] for d in datasets.values()), "text_samples": text,
            "problems": problems, "text_free": not problems and text == 0}


def describe(lineage: dict[str, Any]) -> str:
    """One line for a summary: what the video stages trained on and whether any of it carried text."""
    names = ", ".join(f"{s} v{e['version']}" for s, e in lineage["stages"].items()) or "none"
    line = (f"video stages ({names}) trained on {lineage['video_samples']} clips in "
            f"{sum(d['shards'] for d in lineage['datasets'])} shards; {lineage['text_samples']} carried text")
    if lineage["problems"]:
        line += f"; not verified: {lineage['problems'][0]}" + (
            f" (+{len(lineage['problems']) - 1} more)" if len(lineage["problems"]) > 1 else "")
    return line
