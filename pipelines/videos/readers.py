"""Readers for the video metadata: WebVid-10M (CSV or parquet) and HD-VILA-100M JSONL, in bounded batches.

Each reader yields `pa.Table` batches with the schema `VIDEO_ROWS_SCHEMA` (`iter_hdvila` here,
`webvid.iter_webvid`; `read_hdvila`/`read_webvid` join them for small files), so the flow can plan
one batch at a time and hand the ok rows to the downloader:

    key         "webvid:{videoid}" or "hdvila:{video_id}:{k}" (k = the clip's index in its video);
                unique once `mark_duplicates` has seen every batch (a repeat: "@line<n>" added);
                safe as a webdataset sample key (no "/" and no ".")
    video_id    the source's id ([A-Za-z0-9_-]{1,64}); null when missing or unsafe
    clip_id     HD-VILA's clip_id, sanitised; a label only, never used as a path (null for WebVid)
    url         where the video is fetched from
    duration_s  WebVid's ISO-8601 duration in seconds; HD-VILA's optional "duration"; else null
    start_s, end_s  the clip span in seconds (null for WebVid: the whole video)
    line        input line: the JSONL line number, the CSV record's line (header = line 1), or a
                parquet row's position + 2 (as if the parquet were that CSV)
    status      "ok" | "invalid"
    reason      null for ok rows, else one short reason ("bad_duration", "no_url", ...)

Every input record ends in exactly one row (an HD-VILA video in one row per clip), so the flow can
count outcomes. WebVid needs only `videoid` and `contentUrl`; `duration` is checked when present, the
other columns (`name`, `page_idx`, `page_dir`) are never read: the video side carries no text. The
format is taken from the file's first bytes (parquet magic, a JSON object, else CSV), not its name.
A file that cannot be read as its source's format raises `MetadataError`, one line naming the file;
a bad record inside a readable file is an invalid row with its reason. Files are opened through
`fsspec.open` (s3://, gs:// by configuration; ".gz"/".zst" decompressed by suffix).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import posixpath
import re
from typing import Any, Iterator
from urllib.parse import urlsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import ConfigError

VIDEO_ROWS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("video_id", pa.string()),
        ("clip_id", pa.string()),
        ("url", pa.string()),
        ("duration_s", pa.float64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("line", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)
WEBVID_COLUMNS = ("videoid", "name", "page_idx", "page_dir", "duration", "contentUrl")
WEBVID_REQUIRED = ("videoid", "contentUrl")
URL_SCHEMES = ("http", "https")
BATCH_ROWS = 1 << 16  # rows per batch: bounded memory whatever the file's size

_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ISO_DURATION = re.compile(
    r"P(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?"
)
_TIMESTAMP = re.compile(r"(?:(?:(?P<h>\d+):)?(?P<m>\d+):)?(?P<s>\d+(?:\.\d+)?)")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def parse_iso_duration(text: str | None) -> float | None:
    """'PT00H00M17S' -> 17.0; None when unparseable or not positive (a video has some length)."""
    if not text:
        return None
    match = ISO_DURATION.fullmatch(text.strip().upper())
    if match is None or not any(match.groupdict().values()):
        return None
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    seconds = parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    return seconds if seconds > 0 else None


def parse_timestamp(value: Any) -> float | None:
    """An HD-VILA span end: 'HH:MM:SS.mmm', 'MM:SS', '12.5' or a number -> seconds; None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _TIMESTAMP.fullmatch(value.strip())
        if match is None:
            return None
        h, m, s = (match.group(g) for g in ("h", "m", "s"))
        seconds = int(h or 0) * 3600 + int(m or 0) * 60 + float(s)
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def check_span(start_s: float, end_s: float, duration_s: float | None, tolerance_s: float = 0.05) -> str | None:
    """Reason a clip span cannot be cut from a downloaded video, or None when it fits.

    Called by the flow after download, when the real duration is known; the tolerance absorbs the
    rounding of container durations (HD-VILA spans are given to the millisecond).
    """
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s <= start_s:
        return "bad_span"
    if duration_s is None or not math.isfinite(duration_s) or duration_s <= 0:
        return "bad_duration"
    if end_s > duration_s + tolerance_s:
        return "span_past_end"
    return None


def sanitise_label(text: Any, max_len: int = 128) -> str | None:
    """A free-form id as an inert label: only [A-Za-z0-9._-], no "..", no leading dot, bounded length."""
    if text is None:
        return None
    cleaned = re.sub(r"\.{2,}", "_", _UNSAFE_CHARS.sub("_", str(text)))
    cleaned = re.sub(r"_{2,}", "_", cleaned).strip("._")[:max_len]
    return cleaned or None


def url_problem(url: str | None) -> str | None:
    """Reason a URL cannot be downloaded, or None."""
    if url is None or not url.strip():
        return "no_url"
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in URL_SCHEMES:
        return "bad_url_scheme"
    if not parts.hostname:
        return "bad_url"
    return None


class MetadataError(ConfigError):
    """A metadata file that cannot be read as its source's format; the message is one line naming it."""


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _row(key: str, line: int, *, video_id: str | None = None, clip_id: str | None = None,
         url: str | None = None, duration_s: float | None = None, start_s: float | None = None,
         end_s: float | None = None, reason: str | None = None) -> dict[str, Any]:
    return {
        "key": key, "video_id": video_id, "clip_id": clip_id, "url": url, "duration_s": duration_s,
        "start_s": start_s, "end_s": end_s, "line": line,
        "status": "ok" if reason is None else "invalid", "reason": reason,
    }


def _safe_id(value: Any) -> str | None:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return text if _VIDEO_ID.fullmatch(text) else None


# --- duplicate keys across batches ------------------------------------------------------------


class KeySet:
    """The keys seen so far, as sorted runs of 64-bit hashes merged like a binary counter: 8 bytes a
    key, no Python object per key. A hash collision (odds ~n^2/2^65) would mark a key as seen."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def add(self, keys: list[str]) -> np.ndarray:
        """Add `keys`; True where a key was seen before (in an earlier call or earlier in this one)."""
        hashes = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys))
        seen = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            at = np.searchsorted(run, hashes).clip(0, len(run) - 1)
            seen |= run[at] == hashes
        unique, first = np.unique(hashes, return_index=True)
        seen |= ~np.isin(np.arange(len(keys)), first)
        run = unique
        while self.runs and len(self.runs[-1]) <= len(run):
            run = np.union1d(self.runs.pop(), run)
        self.runs.append(run)
        return seen


def mark_duplicates(rows: pa.Table, seen: KeySet) -> pa.Table:
    """A key seen before is made unique ("@line<n>") and its row, if ok, marked "duplicate_key"."""
    dup = pa.array(seen.add(rows.column("key").to_pylist()))
    if not pc.any(dup).as_py():
        return rows
    key = pc.if_else(dup, pc.binary_join_element_wise(rows["key"], pc.cast(rows["line"], pa.string()), "@line"),
                     rows["key"])
    newly = pc.and_(dup, pc.equal(rows["status"], "ok"))
    return (rows.set_column(0, "key", key)
            .set_column(rows.schema.get_field_index("status"), "status", pc.if_else(newly, "invalid", rows["status"]))
            .set_column(rows.schema.get_field_index("reason"), "reason",
                        pc.if_else(newly, "duplicate_key", rows["reason"])))


# --- the file's format ------------------------------------------------------------------------


def sniff_format(path: str, **storage_options: Any) -> str:
    """"parquet", "jsonl", "csv" or "empty", from the first bytes (after decompression by suffix)."""
    try:
        with fsspec.open(path, "rb", compression="infer", **storage_options) as fh:
            head = fh.read(4096)
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except OSError as err:
        raise MetadataError(f"{path}: cannot be opened: {one_line(err)}") from None
    if head[:4] == b"PAR1":
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text:
        return "empty"
    return "jsonl" if text[:1] in (b"{", b"[") else "csv"


# --- HD-VILA-100M -----------------------------------------------------------------------------


def iter_hdvila(path: str, batch_rows: int = BATCH_ROWS, **storage_options: Any) -> Iterator[pa.Table]:
    """HD-VILA-100M JSONL as released (`{video_id, url, clip: [{clip_id, span: [start, end]}]}` a line)
    -> one row per clip, in batches that never split a video's clips.

    The first record decides that the file is JSON lines (else MetadataError). After it, a line that
    is not a JSON object (or not UTF-8) gives one "bad_json" row keyed by its line number; a video
    without a usable id, or without clips, gives one invalid row; a clip whose span is unreadable or
    ends before it starts is invalid with "bad_span". Blank lines are not records.
    """
    kind = sniff_format(path, **storage_options)
    if kind != "jsonl":
        what = {"parquet": "a parquet file", "csv": "CSV or other text", "empty": "an empty file"}[kind]
        raise MetadataError(f"{path}: {what}, not HD-VILA JSON lines (one {{\"video_id\", \"url\", \"clip\"}} a line)")
    rows: list[dict[str, Any]] = []
    first = True
    with fsspec.open(path, "rb", compression="infer", **storage_options) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError:
                text = ""
            if first and not isinstance(_json_object(text), dict):
                raise MetadataError(f"{path}: line {line_no} is not a JSON object; not HD-VILA JSON lines")
            first = False
            rows.extend(_hdvila_rows(text, line_no))
            if len(rows) >= batch_rows:
                yield pa.Table.from_pylist(rows, schema=VIDEO_ROWS_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=VIDEO_ROWS_SCHEMA)


def _json_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_hdvila(path: str, **storage_options: Any) -> pa.Table:
    """A whole HD-VILA file as one table, duplicate keys marked (small files: tests, tools)."""
    seen = KeySet()
    batches = [mark_duplicates(b, seen) for b in iter_hdvila(path, **storage_options)]
    return pa.concat_tables(batches) if batches else VIDEO_ROWS_SCHEMA.empty_table()


def _hdvila_rows(text: str, line: int) -> Iterator[dict[str, Any]]:
    obj = _json_object(text)
    if not isinstance(obj, dict):
        yield _row(f"hdvila:line{line}", line, reason="bad_json")
        return
    video_id = _safe_id(obj.get("video_id"))
    if video_id is None:
        yield _row(f"hdvila:line{line}", line, reason="bad_video_id")
        return
    url = obj.get("url") if isinstance(obj.get("url"), str) else None
    duration_s = parse_timestamp(obj.get("duration")) if obj.get("duration") is not None else None
    clips = obj.get("clip")
    if not isinstance(clips, list) or not clips:
        yield _row(f"hdvila:line{line}", line, video_id=video_id, url=url, duration_s=duration_s, reason="no_clips")
        return
    video_reason = url_problem(url)
    for k, clip in enumerate(clips):
        clip = clip if isinstance(clip, dict) else {}
        start_s, end_s = _span(clip.get("span"))
        reason = video_reason
        if reason is None and (start_s is None or end_s is None or end_s <= start_s):
            reason = "bad_span"
        if reason is None and duration_s is not None:
            reason = check_span(start_s, end_s, duration_s)
        yield _row(f"hdvila:{video_id}:{k}", line, video_id=video_id, clip_id=sanitise_label(clip.get("clip_id")),
                   url=url, duration_s=duration_s, start_s=start_s, end_s=end_s, reason=reason)


def _span(span: Any) -> tuple[float | None, float | None]:
    if not isinstance(span, (list, tuple)) or len(span) != 2:
        return None, None
    return parse_timestamp(span[0]), parse_timestamp(span[1])


# --- loopback rewriting -----------------------------------------------------------------------


def rewritten_path(url: str) -> str:
    """The loopback path a real URL maps to: "/rewritten/<sha1 of the url><suffix>".

    The sha1 names the file without any part of the original path (no traversal, no collisions
    between hosts); the suffix (".mp4") is kept so downloaders that sniff extensions still work.
    A local server that serves rewritten files computes the same name with this function.
    """
    suffix = posixpath.splitext(urlsplit(url).path)[1].lower()
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""
    return f"/rewritten/{hashlib.sha1(url.encode('utf-8')).hexdigest()}{suffix}"


def rewrite_url(url: str, base_url: str, keep_path: bool = False) -> str:
    """One URL onto the loopback base: the sha1 name by default, or its own path with keep_path."""
    if keep_path:
        parts = urlsplit(url)
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        return base_url.rstrip("/") + (tail if tail.startswith("/") else f"/{tail}")
    return base_url.rstrip("/") + rewritten_path(url)


def rewrite_urls(table: pa.Table, base_url: str, keep_path: bool = False) -> pa.Table:
    """Point every http(s) URL of a metadata table at a loopback server.

    Tests and the demo read real metadata files but must never contact the real hosts. Only
    http(s) URLs are rewritten: the others are already invalid rows and keep their URL, so their
    recorded reason stays true. Raises ValueError if `base_url` is not on 127.0.0.0/8 or localhost.
    """
    _require_loopback(base_url)
    urls = table.column("url").to_pylist()
    new = [rewrite_url(u, base_url, keep_path) if u and url_problem(u) is None else u for u in urls]
    index = table.schema.get_field_index("url")
    return table.set_column(index, "url", pa.array(new, type=pa.string()))


def _require_loopback(base_url: str) -> None:
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"base_url must be http(s)://, got {base_url!r}")
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"base_url must be a loopback address (127.0.0.0/8, ::1, localhost), got {host!r}")

