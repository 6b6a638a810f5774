"""Readers for the video metadata: WebVid-10M CSV and HD-VILA-100M JSONL -> one normalised table.

Both readers return a `pa.Table` with the schema `VIDEO_ROWS_SCHEMA`, so the flow can concatenate
them and hand the ok rows to the downloader:

    key         "webvid:{videoid}" or "hdvila:{video_id}:{k}" (k = the clip's index in its video);
                unique per table, safe as a webdataset sample key (no "/" and no ".")
    video_id    the source's id ([A-Za-z0-9_-]{1,64}); null when missing or unsafe
    clip_id     HD-VILA's clip_id, sanitised; a label only, never used as a path (null for WebVid)
    url         where the video is fetched from
    duration_s  WebVid's ISO-8601 duration in seconds; HD-VILA's optional "duration"; else null
    start_s, end_s  the clip span in seconds (null for WebVid: the whole video)
    line        input line: the JSONL line number, or the CSV record's line (header = line 1)
    status      "ok" | "invalid"
    reason      null for ok rows, else one short reason ("bad_duration", "no_url", ...)

Every input record ends in exactly one row (an HD-VILA video in one row per clip), so the flow can
count outcomes. Captions (WebVid's `name`) are dropped here: the video side never carries text.
All files are opened through `fsspec.open`, so s3:// or gs:// paths work by configuration and
".gz"/".zst" files are decompressed by suffix.
"""
from __future__ import annotations

import csv
import hashlib
import ipaddress
import json
import math
import posixpath
import re
from typing import Any, Iterator
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa

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
URL_SCHEMES = ("http", "https")

_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ISO_DURATION = re.compile(
    r"P(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?"
)
_TIMESTAMP = re.compile(r"(?:(?:(?P<h>\d+):)?(?P<m>\d+):)?(?P<s>\d+(?:\.\d+)?)")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def parse_iso_duration(text: str | None) -> float | None:
    """'PT00H00M17S' -> 17.0; None when unparseable or not positive (a video has some length)."""
    if not text:
        return None
    match = _ISO_DURATION.fullmatch(text.strip().upper())
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


def _row(key: str, line: int, *, video_id: str | None = None, clip_id: str | None = None,
         url: str | None = None, duration_s: float | None = None, start_s: float | None = None,
         end_s: float | None = None, reason: str | None = None) -> dict[str, Any]:
    return {
        "key": key, "video_id": video_id, "clip_id": clip_id, "url": url, "duration_s": duration_s,
        "start_s": start_s, "end_s": end_s, "line": line,
        "status": "ok" if reason is None else "invalid", "reason": reason,
    }


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> table; a key seen before is made unique and its row marked "duplicate_key"."""
    seen: set[str] = set()
    for row in rows:
        if row["key"] in seen:
            row["key"] = f"{row['key']}@line{row['line']}"
            if row["reason"] is None:
                row["status"], row["reason"] = "invalid", "duplicate_key"
        seen.add(row["key"])
    return pa.Table.from_pylist(rows, schema=VIDEO_ROWS_SCHEMA)


def _safe_id(value: Any) -> str | None:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return text if _VIDEO_ID.fullmatch(text) else None


# --- WebVid-10M -------------------------------------------------------------------------------


def read_webvid(path: str, **storage_options: Any) -> pa.Table:
    """WebVid-10M CSV (`videoid,name,page_idx,page_dir,duration,contentUrl`) -> VIDEO_ROWS_SCHEMA.

    One row per CSV record; a record with the wrong number of fields becomes an invalid row
    ("bad_csv_row"). The caption column is never read into the result.
    """
    with fsspec.open(path, "rt", encoding="utf-8", newline="", compression="infer", **storage_options) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty WebVid CSV (no header)")
        missing = [c for c in WEBVID_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: WebVid CSV lacks columns {missing}")
        col = {name: header.index(name) for name in ("videoid", "duration", "contentUrl")}
        rows = []
        line = reader.line_num + 1  # the line where the next record starts
        for record in reader:
            rows.append(_webvid_row(record, len(header), col, line))
            line = reader.line_num + 1
    return _to_table(rows)


def _webvid_row(record: list[str], n_columns: int, col: dict[str, int], line: int) -> dict[str, Any]:
    if len(record) != n_columns:
        return _row(f"webvid:line{line}", line, reason="bad_csv_row")
    video_id = _safe_id(record[col["videoid"]])
    if video_id is None:
        return _row(f"webvid:line{line}", line, reason="bad_video_id")
    url = record[col["contentUrl"]].strip() or None
    duration_s = parse_iso_duration(record[col["duration"]])
    reason = url_problem(url) or (None if duration_s is not None else "bad_duration")
    return _row(f"webvid:{video_id}", line, video_id=video_id, url=url, duration_s=duration_s, reason=reason)


# --- HD-VILA-100M -----------------------------------------------------------------------------


def read_hdvila(path: str, **storage_options: Any) -> pa.Table:
    """HD-VILA-100M JSONL (`{video_id, url, clip: [{clip_id, span: [start, end]}]}`) -> one row per clip.

    A line that is not a JSON object gives one "bad_json" row keyed by its line number; a video
    without a usable id, or without clips, gives one invalid row; a clip whose span is unreadable
    or ends before it starts is invalid with "bad_span". Blank lines are not records.
    """
    rows: list[dict[str, Any]] = []
    with fsspec.open(path, "rt", encoding="utf-8", errors="replace", compression="infer", **storage_options) as f:
        for line_no, text in enumerate(f, start=1):
            if text.strip():
                rows.extend(_hdvila_rows(text, line_no))
    return _to_table(rows)


def _hdvila_rows(text: str, line: int) -> Iterator[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
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

