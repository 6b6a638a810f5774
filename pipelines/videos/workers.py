"""The parts of video2dataset's download worker that this project replaces (see pipelines/videos/download.py):
a downloader that goes through its process's egress gate and fails with a reason, a refusal of yt-dlp, exact
span cutting + resizing in one ffmpeg pass, and a writer that keeps failed rows out of the tars.
"""
from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import requests  # video2dataset's HTTP client
from requests.exceptions import ChunkedEncodingError

from pipelines.gates import local_gate_url
from pipelines.videos.readers import check_span


class DownloadError(Exception):
    """A failed fetch; the message starts with one of REASONS, then ': ' and the detail."""


# --- the worker's replaced parts (picklable: they travel to spawned processes and Ray tasks) ------


@dataclass
class CheckedDownloader:
    """video2dataset's web-file downloader slot: fetch through the egress gate of the process it runs in
    (`local_gate_url`: started from the run's gate spec when the environment names one, else
    `proxy_url`), fail with a reason."""

    proxy_url: str
    timeout_s: float
    max_bytes: int
    tmp_dir: str

    def __call__(self, url: str) -> tuple[dict[str, str], None]:
        proxy = local_gate_url(self.proxy_url)
        with requests.Session() as session:
            session.trust_env = False  # the proxy below, never an environment's no_proxy exceptions
            session.proxies = {"http": proxy, "https": proxy}
            try:
                with session.get(url, stream=True, timeout=self.timeout_s) as resp:
                    _check_response(resp)
                    body = _read_capped(resp, self.max_bytes)
            except requests.Timeout as err:
                raise DownloadError(f"timeout: {err}") from None
            except requests.TooManyRedirects as err:
                raise DownloadError(f"too_many_redirects: {err}") from None
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as err:
                raise DownloadError(f"truncated: {err}") from None
            except requests.RequestException as err:
                raise DownloadError(f"download_error: {err}") from None
        if re.match(rb"\s*<(!doctype html|html)", body[:256], re.IGNORECASE):
            raise DownloadError("html: an HTML page, not a video")
        path = os.path.join(self.tmp_dir, f"{uuid.uuid4()}.mp4")
        with open(path, "wb") as fh:
            fh.write(body)
        return {"video": path}, None


def _check_response(resp: Any) -> None:
    if resp.status_code == 403 and "egress proxy" in (resp.reason or "").lower():
        raise DownloadError(f"refused: {resp.text.strip()[:200]}")
    if resp.status_code == 404:
        raise DownloadError(f"http_404: {resp.url}")
    if resp.status_code == 429 or (resp.status_code == 503 and resp.headers.get("Retry-After")):
        raise DownloadError(f"rate_limited: HTTP {resp.status_code} {resp.reason}")
    if resp.status_code in (502, 504) and "egress proxy cut" in resp.text:
        raise DownloadError(f"{'too_big' if 'max_bytes' in resp.text else 'timeout'}: {resp.text.strip()[:200]}")
    if resp.status_code == 504:
        raise DownloadError(f"timeout: {resp.text.strip()[:200]}")
    if resp.status_code != 200:
        raise DownloadError(f"http_error: HTTP {resp.status_code} {resp.reason}")
    if resp.headers.get("Content-Type", "").lower().startswith("text/html"):
        raise DownloadError("html: served as text/html")


def _read_capped(resp: Any, max_bytes: int) -> bytes:
    """The body, up to max_bytes. A body cut short raises in urllib3 ("truncated"), unless the proxy
    cut it at max_bytes ("too_big")."""
    body = io.BytesIO()
    try:
        for chunk in resp.iter_content(64 * 1024):
            body.write(chunk)
            if body.tell() > max_bytes:
                raise DownloadError(f"too_big: over {max_bytes} bytes")
    except ChunkedEncodingError:
        if body.tell() >= max_bytes:
            raise DownloadError(f"too_big: cut at {max_bytes} bytes") from None
        raise
    return body.getvalue()


class NoYtDlp:
    """video2dataset's yt-dlp slot: refused, since yt-dlp would connect on its own terms."""

    def __call__(self, url: str) -> tuple[dict, None, str]:
        return {}, None, "unsupported_url: not a direct video file URL"


@dataclass
class ClipAndResize:
    """video2dataset's clipping slot (it also gets whole videos): exact spans, scaled and centre-cropped
    to `size`, H.264 with a short GOP, no audio, subtitles or container metadata (no text at all)."""

    size: int
    tmp_dir: str
    gop: int = 8
    crf: int = 20

    def __call__(self, streams: dict, metadata: dict) -> tuple[dict, list[dict], str | None]:
        spans = [tuple(s) for s in metadata["clips"]] or [None]
        dropped: list[tuple[int, str]] = []
        out: list[tuple[int, Any, bytes, int]] = []
        with tempfile.TemporaryDirectory(dir=self.tmp_dir) as tmp:
            src = os.path.join(tmp, "input.mp4")
            with open(src, "wb") as fh:
                fh.write(streams["video"][0])
            info, error = probe(src)
            if error is not None:
                return {}, [], f"corrupt: {error}"
            for k, (span, row_id) in enumerate(zip(spans, metadata["row_ids"])):
                reason = check_span(span[0], span[1], info.get("duration")) if span else None
                if reason is None:
                    data, frames, reason = self._encode(src, span, os.path.join(tmp, f"clip{k}.mp4"))
                if reason is None:
                    out.append((k, span, data, frames))
                else:
                    dropped.append((row_id, reason))
        metadata["dropped_row_ids"] = [r for r, _ in dropped]
        metadata["dropped_reasons"] = [why for _, why in dropped]
        if not out:
            return {}, [], f"{dropped[0][1]}: no clip could be cut"
        metas = []
        for k, span, _, frames in out:
            meta = copy.deepcopy(metadata)
            meta.update(row_id=metadata["row_ids"][k], clips=[list(span)] if span else [], frames=frames,
                        fps=info.get("fps"), width=self.size, height=self.size, source=info)
            if span:
                meta["key"] = f"{metadata['key']}_{k:05d}"
            metas.append(meta)
        return {"video": [data for _, _, data, _ in out]}, metas, None

    def _encode(self, src: str, span: tuple | None, dst: str) -> tuple[bytes, int, str | None]:
        side = self.size
        cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y"]
        cmd += ["-ss", f"{span[0]:.3f}"] if span else []
        cmd += ["-i", src] + (["-t", f"{span[1] - span[0]:.3f}"] if span else [])
        cmd += ["-map", "0:v:0", "-an", "-sn", "-dn", "-map_metadata", "-1",
                "-vf", f"scale={side}:{side}:force_original_aspect_ratio=increase,crop={side}:{side},setsar=1",
                "-c:v", "libx264", "-preset", "veryfast", "-crf", str(self.crf), "-pix_fmt", "yuv420p",
                "-g", str(self.gop), "-movflags", "+faststart", "-progress", "pipe:1", dst]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            return b"", 0, "clip_failed"
        frames = [int(n) for n in re.findall(r"^frame=(\d+)", run.stdout, re.MULTILINE)]
        if not frames or frames[-1] == 0:
            return b"", 0, "empty_clip"
        with open(dst, "rb") as fh:
            return fh.read(), frames[-1], None


def probe(path: str) -> tuple[dict, str | None]:
    """(duration, fps, width, height) of the first video stream, or an error for files that are not videos."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
           "format=duration:stream=width,height,avg_frame_rate,duration", "-of", "json", path]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        return {}, (run.stderr.strip().splitlines() or ["ffprobe failed"])[-1][:200]
    found = json.loads(run.stdout or "{}")
    if not found.get("streams"):
        return {}, "no video stream"
    stream, fmt = found["streams"][0], found.get("format", {})
    num, _, den = stream.get("avg_frame_rate", "0/1").partition("/")
    fps = float(num) / float(den) if den and float(den) else None
    duration = fmt.get("duration") or stream.get("duration")
    return {"duration": float(duration) if duration else None, "fps": fps,
            "width": stream.get("width"), "height": stream.get("height")}, None


TAR_OMITS = frozenset({"url"})  # row fields kept out of a sample's .json (provenance stays in the parquet)


class ClipsOnlyWriter:
    """video2dataset's webdataset writer, except that a failed row goes to the shard's parquet only - its tar
    holds nothing but trainable samples (.mp4 + .json) - and that no text reaches the tar: no caption member
    (whatever `save_caption` says) and no source URL in the .json, since a real WebVid contentUrl ends in its
    caption's words (".../stock-footage-horse-grazing-on-green-screen.mp4"). The shard's parquet and
    outcomes.parquet keep each row's URL, by key."""

    def __init__(self, shard_id: int, output_folder: str, save_caption: bool, oom_shard_count: int,
                 schema: pa.Schema, encode_formats: dict) -> None:
        from video2dataset.data_writer import WebDatasetSampleWriter  # seconds to import (torch): in the writer only

        self.inner = WebDatasetSampleWriter(shard_id, output_folder, save_caption, oom_shard_count, schema,
                                            encode_formats)

    def write(self, streams: dict, key: str, caption: str | None, meta: dict) -> None:
        meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}
        if streams:
            sample = {"__key__": key, **{self.inner.encode_formats.get(m, m): s for m, s in streams.items()}}
            sample["json"] = json.dumps({k: v for k, v in meta.items() if k not in TAR_OMITS}, indent=4)
            self.inner.tarwriter.write(sample)
        self.inner.buffered_parquet_writer.write(meta)

    def close(self) -> None:
        self.inner.close()
