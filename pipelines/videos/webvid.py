"""WebVid-10M metadata, CSV or parquet, in bounded batches of VIDEO_ROWS_SCHEMA rows (see readers).

Only `videoid` and `contentUrl` are required (matched case-insensitively); `duration` is checked when
present; `name`, `page_idx` and `page_dir` are never read: the video side carries no text. Each batch
is validated with Arrow compute, column at a time: no Python object per row after the CSV parser.
"""
from __future__ import annotations

import csv
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.videos.readers import (BATCH_ROWS, ISO_DURATION, URL_SCHEMES, VIDEO_ROWS_SCHEMA, WEBVID_REQUIRED,
                                      KeySet, MetadataError, mark_duplicates, one_line, sniff_format)

_ISO_GROUPS = ("d", "h", "m", "s")
_ISO_SECONDS = (86400.0, 3600.0, 60.0, 1.0)
_HTTP_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#]*@)?(?:\[[^\]/?#]+\]|[^/?#:@\[\]]+)"


def _iso_seconds(durations: pa.Array) -> pa.Array:
    """ISO-8601 durations -> seconds (> 0), null where unparseable; numbers are taken as seconds."""
    if pa.types.is_integer(durations.type) or pa.types.is_floating(durations.type):
        seconds = pc.cast(durations, pa.float64())
        return pc.if_else(pc.greater(seconds, 0.0), seconds, pa.scalar(None, pa.float64()))
    text = pc.utf8_upper(pc.utf8_trim_whitespace(pc.cast(durations, pa.string())))
    parts = pc.extract_regex(text, "^" + ISO_DURATION.pattern + "$")
    total = pa.array(np.zeros(len(durations)))
    nonempty = pa.array(np.zeros(len(durations), dtype=bool))
    for name, scale in zip(_ISO_GROUPS, _ISO_SECONDS):
        field = pc.struct_field(parts, name)
        given = pc.not_equal(field, "")
        nonempty = pc.or_(nonempty, given)
        value = pc.cast(pc.if_else(given, field, "0"), pa.float64())
        total = pc.add(total, pc.multiply(value, scale))
    ok = pc.fill_null(pc.and_(nonempty, pc.greater(total, 0.0)), False)
    return pc.if_else(ok, total, pa.scalar(None, pa.float64()))


def url_reasons(urls: pa.Array) -> pa.Array:
    """`url_problem` for a column of trimmed URLs: null where fine, else no_url / bad_url_scheme / bad_url."""
    scheme = pc.utf8_lower(pc.struct_field(pc.extract_regex(urls, r"^(?P<s>[A-Za-z][A-Za-z0-9+.-]*):"), "s"))
    no_url = pc.fill_null(pc.equal(pc.utf8_length(urls), 0), True)
    bad_scheme = pc.invert(pc.fill_null(pc.is_in(scheme, pa.array(URL_SCHEMES)), False))
    bad_host = pc.invert(pc.fill_null(pc.match_substring_regex(urls, _HTTP_HOST), False))
    null = pa.scalar(None, pa.string())
    return pc.if_else(no_url, "no_url", pc.if_else(bad_scheme, "bad_url_scheme", pc.if_else(bad_host, "bad_url", null)))


def webvid_table(ids: pa.Array, urls: pa.Array, durations: pa.Array | None, lines: pa.Array,
                 bad_record: pa.Array | None = None) -> pa.Table:
    """One batch of WebVid columns -> VIDEO_ROWS_SCHEMA, validated with Arrow compute (no row objects)."""
    n = len(ids)
    null_s, null_f = pa.scalar(None, pa.string()), pa.scalar(None, pa.float64())
    ids = pc.utf8_trim_whitespace(pc.cast(ids, pa.string()))
    bad_record = bad_record if bad_record is not None else pa.array(np.zeros(n, dtype=bool))
    id_ok = pc.and_(pc.invert(bad_record), pc.fill_null(pc.match_substring_regex(ids, r"^[A-Za-z0-9_-]{1,64}$"), False))
    urls = pc.utf8_trim_whitespace(pc.cast(urls, pa.string()))
    urls = pc.if_else(pc.fill_null(pc.equal(urls, ""), True), null_s, urls)
    seconds = _iso_seconds(durations) if durations is not None else pa.nulls(n, pa.float64())
    bad_duration = (pc.is_null(seconds) if durations is not None else pa.array(np.zeros(n, dtype=bool)))
    reason = pc.coalesce(url_reasons(urls), pc.if_else(bad_duration, "bad_duration", null_s))
    reason = pc.if_else(bad_record, "bad_csv_row", pc.if_else(id_ok, reason, "bad_video_id"))
    line_key = pc.binary_join_element_wise("webvid:line", pc.cast(lines, pa.string()), "")
    return pa.table({
        "key": pc.if_else(id_ok, pc.binary_join_element_wise("webvid:", ids, ""), line_key),
        "video_id": pc.if_else(id_ok, ids, null_s),
        "clip_id": pa.nulls(n, pa.string()),
        "url": pc.if_else(id_ok, urls, null_s),
        "duration_s": pc.if_else(id_ok, seconds, null_f),
        "start_s": pa.nulls(n, pa.float64()),
        "end_s": pa.nulls(n, pa.float64()),
        "line": pc.cast(lines, pa.int64()),
        "status": pc.if_else(pc.is_null(reason), "ok", "invalid"),
        "reason": reason,
    }, schema=VIDEO_ROWS_SCHEMA)


def _columns(path: str, names: list[str]) -> dict[str, str]:
    """The WebVid columns present ({wanted: as spelled}, case-insensitive); the required ones must be."""
    lower = {name.lower(): name for name in names}
    found = {c: c if c in names else lower.get(c.lower()) for c in ("videoid", "contentUrl", "duration")}
    missing = [c for c in WEBVID_REQUIRED if found[c] is None]
    if missing:
        raise MetadataError(f"{path}: WebVid metadata lacks column(s) {', '.join(missing)} "
                            f"(has {', '.join(names[:12]) or 'none'})")
    return {c: name for c, name in found.items() if name is not None}


def iter_webvid(path: str, batch_rows: int = BATCH_ROWS, **storage_options: Any) -> Iterator[pa.Table]:
    """WebVid-10M metadata, CSV or parquet, as VIDEO_ROWS_SCHEMA batches; keys not yet de-duplicated
    (`mark_duplicates`). `line`: the CSV record's line (header = 1), or the parquet row's number + 1."""
    kind = sniff_format(path, **storage_options)
    if kind == "parquet":
        yield from _webvid_parquet(path, batch_rows, storage_options)
    elif kind == "csv":
        yield from _webvid_csv(path, batch_rows, storage_options)
    elif kind == "empty":
        raise MetadataError(f"{path}: empty file, not WebVid CSV or parquet")
    else:
        raise MetadataError(f"{path}: JSON lines, not WebVid CSV or parquet (HD-VILA metadata goes with --hdvila)")


def _webvid_parquet(path: str, batch_rows: int, storage_options: dict) -> Iterator[pa.Table]:
    with fsspec.open(path, "rb", **storage_options) as fh:
        try:
            reader = pq.ParquetFile(fh)
            col = _columns(path, reader.schema_arrow.names)
            batches = reader.iter_batches(batch_rows, columns=list(col.values()))
            start = 0
            for batch in batches:
                lines = pa.array(np.arange(start + 2, start + 2 + len(batch), dtype=np.int64))
                durations = batch.column(col["duration"]) if "duration" in col else None
                yield webvid_table(batch.column(col["videoid"]), batch.column(col["contentUrl"]), durations, lines)
                start += len(batch)
        except (pa.ArrowException, OSError) as err:
            raise MetadataError(f"{path}: unreadable parquet: {one_line(err)}") from None


def _webvid_csv(path: str, batch_rows: int, storage_options: dict) -> Iterator[pa.Table]:
    with fsspec.open(path, "rb", compression="infer", **storage_options) as raw:
        read = [0]  # physical lines decoded so far: where a decoding error is
        reader = csv.reader(_decoded(raw, read))
        try:
            header = next(reader, None)
            if header is None:
                raise MetadataError(f"{path}: empty WebVid CSV (no header)")
            col = _columns(path, header)
            index = {c: header.index(name) for c, name in col.items()}
            batch: dict[str, list] = {"id": [], "url": [], "duration": [], "line": [], "bad": []}
            line = reader.line_num + 1  # the line where the next record starts
            for record in reader:
                bad = len(record) != len(header)
                batch["bad"].append(bad)
                batch["line"].append(line)
                for name, c in (("id", "videoid"), ("url", "contentUrl"), ("duration", "duration")):
                    batch[name].append(None if bad or c not in index else record[index[c]])
                line = reader.line_num + 1
                if len(batch["line"]) >= batch_rows:
                    yield _csv_batch(batch, "duration" in index)
                    batch = {k: [] for k in batch}
            if batch["line"]:
                yield _csv_batch(batch, "duration" in index)
        except UnicodeDecodeError as err:
            raise MetadataError(f"{path}: not UTF-8 text at line {read[0]} ({err.reason}); "
                                "WebVid CSV must be UTF-8") from None
        except csv.Error as err:
            raise MetadataError(f"{path}: not a readable CSV at line {reader.line_num}: {one_line(err)}") from None


def _decoded(raw: Any, read: list[int]) -> Iterator[str]:
    """The file's lines as text (a leading BOM dropped), counting them in `read`."""
    for n, line in enumerate(raw, start=1):
        read[0] = n
        yield line.decode("utf-8-sig" if n == 1 else "utf-8")


def _csv_batch(batch: dict[str, list], has_duration: bool) -> pa.Table:
    return webvid_table(pa.array(batch["id"], pa.string()), pa.array(batch["url"], pa.string()),
                        pa.array(batch["duration"], pa.string()) if has_duration else None,
                        pa.array(batch["line"], pa.int64()), pa.array(batch["bad"], pa.bool_()))


def read_webvid(path: str, **storage_options: Any) -> pa.Table:
    """A whole WebVid file as one table, duplicate keys marked (small files: tests, tools)."""
    seen = KeySet()
    batches = [mark_duplicates(b, seen) for b in iter_webvid(path, **storage_options)]
    return pa.concat_tables(batches) if batches else VIDEO_ROWS_SCHEMA.empty_table()


