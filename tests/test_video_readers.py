"""The video metadata readers: WebVid CSV and HD-VILA JSONL -> one outcome per input row, no text."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import fsspec
import pytest
from _shared import shared_file

from pipelines.videos.readers import (
    VIDEO_ROWS_SCHEMA,
    check_span,
    parse_iso_duration,
    parse_timestamp,
    read_hdvila,
    read_webvid,
    rewrite_urls,
    rewritten_path,
)

BASE = "http://127.0.0.1:8765"


def _real_webvid() -> Path:
    return shared_file("test_webvid.csv")


def test_real_webvid_rows_are_normalised_and_ok():
    path = _real_webvid()
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    table = read_webvid(str(path))
    assert table.schema == VIDEO_ROWS_SCHEMA
    assert table.num_rows == len(records) == 20
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"webvid:{r['videoid']}" for r in records]
    assert {r["status"] for r in rows} == {"ok"}
    assert rows[0]["duration_s"] == 17.0 and rows[15]["duration_s"] == 60.0  # PT00H01M00S
    assert all(r["start_s"] is None and r["end_s"] is None for r in rows)
    assert [r["url"] for r in rows] == [r["contentUrl"] for r in records]
    assert [r["line"] for r in rows] == list(range(2, 22))


def test_webvid_captions_never_reach_the_table():
    path = _real_webvid()
    with open(path, newline="", encoding="utf-8") as f:
        captions = [r["name"] for r in csv.DictReader(f)]
    table = read_webvid(str(path))
    assert "name" not in table.column_names
    cells = [str(v) for col in table.columns for v in col.to_pylist() if v is not None]
    for caption in captions:
        assert all(caption not in cell for cell in cells), caption


def test_webvid_bad_rows_each_get_one_reason(tmp_path):
    rows = [
        ["1", "fine", "1", "d", "PT00H00M17S", "https://example.org/v/1.mp4"],
        ["2", "a caption, with \"quotes\"\nand a newline", "1", "d", "PT1M5.5S", "http://example.org/2.mp4"],
        ["3", "bad duration", "1", "d", "17 seconds", "https://example.org/3.mp4"],
        ["4", "zero duration", "1", "d", "PT00H00M00S", "https://example.org/4.mp4"],
        ["5", "no url", "1", "d", "PT10S", ""],
        ["6", "ftp", "1", "d", "PT10S", "ftp://example.org/6.mp4"],
        ["../7", "unsafe id", "1", "d", "PT10S", "https://example.org/7.mp4"],
        ["1", "duplicate", "1", "d", "PT10S", "https://example.org/1b.mp4"],
        ["9", "too few fields"],
    ]
    path = tmp_path / "webvid.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        writer.writerows(rows)
    out = read_webvid(str(path)).to_pylist()
    assert len(out) == len(rows)
    assert [r["reason"] for r in out] == [None, None, "bad_duration", "bad_duration", "no_url",
                                          "bad_url_scheme", "bad_video_id", "duplicate_key", "bad_csv_row"]
    assert [r["status"] for r in out] == ["ok", "ok"] + ["invalid"] * 7
    assert out[1]["duration_s"] == 65.5
    # The quoted newline spans two physical lines: later rows still name the line they start on.
    assert [r["line"] for r in out] == [2, 3, 5, 6, 7, 8, 9, 10, 11]
    keys = [r["key"] for r in out]
    assert len(set(keys)) == len(keys) and all("/" not in k and "." not in k for k in keys)


def test_webvid_through_fsspec_url_and_compression():
    path = _real_webvid()
    with fsspec.open("memory://meta/webvid.csv.gz", "wb") as f:
        f.write(gzip.compress(path.read_bytes()))
    table = read_webvid("memory://meta/webvid.csv.gz")
    assert table.num_rows == 20 and set(table.column("status").to_pylist()) == {"ok"}


def test_webvid_missing_column_is_an_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("videoid,name,duration\n1,x,PT1S\n")
    with pytest.raises(ValueError, match="contentUrl"):
        read_webvid(str(path))


@pytest.mark.parametrize("text, seconds", [
    ("PT00H00M17S", 17.0), ("PT1H", 3600.0), ("PT2M30.5S", 150.5), ("P1DT1S", 86401.0), ("pt10s", 10.0),
    ("PT", None), ("P", None), ("17", None), ("", None), (None, None), ("PT0S", None), ("PT-3S", None),
])
def test_parse_iso_duration(text, seconds):
    assert parse_iso_duration(text) == seconds


def _write_jsonl(path: Path, lines: list) -> None:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


def test_hdvila_one_row_per_clip_with_every_outcome(tmp_path):
    path = tmp_path / "hdvila.jsonl"
    _write_jsonl(path, [
        {"video_id": "abcDEF_12-x", "url": "https://www.youtube.com/watch?v=abcDEF_12-x",
         "clip": [{"clip_id": "abcDEF_12-x.1.mp4", "span": ["00:00:25.520", "00:00:32.240"]},
                  {"clip_id": "../../etc/passwd", "span": [40, 45.5]},
                  {"clip_id": "c3", "span": ["00:01:10.000", "00:01:05.000"]},
                  {"clip_id": "c4", "span": ["soon", "later"]}]},
        "{this is not json",
        "",
        {"video_id": "noclips", "url": "https://www.youtube.com/watch?v=noclips", "clip": []},
        {"url": "https://www.youtube.com/watch?v=none", "clip": [{"clip_id": "a", "span": [0, 1]}]},
        {"video_id": "ftpvid", "url": "ftp://x/y", "clip": [{"clip_id": "a", "span": [0, 1]}]},
        {"video_id": "withdur", "url": "https://v.example/w", "duration": 60,
         "clip": [{"clip_id": "a", "span": [50, 70]}]},
        ["a", "list"],
    ])
    table = read_hdvila(str(path))
    assert table.schema == VIDEO_ROWS_SCHEMA
    rows = table.to_pylist()
    summary = [(r["key"], r["line"], r["status"], r["reason"]) for r in rows]
    assert summary == [
        ("hdvila:abcDEF_12-x:0", 1, "ok", None),
        ("hdvila:abcDEF_12-x:1", 1, "ok", None),
        ("hdvila:abcDEF_12-x:2", 1, "invalid", "bad_span"),
        ("hdvila:abcDEF_12-x:3", 1, "invalid", "bad_span"),
        ("hdvila:line2", 2, "invalid", "bad_json"),
        ("hdvila:line4", 4, "invalid", "no_clips"),
        ("hdvila:line5", 5, "invalid", "bad_video_id"),
        ("hdvila:ftpvid:0", 6, "invalid", "bad_url_scheme"),
        ("hdvila:withdur:0", 7, "invalid", "span_past_end"),
        ("hdvila:line8", 8, "invalid", "bad_json"),
    ]
    assert (rows[0]["start_s"], rows[0]["end_s"]) == (pytest.approx(25.52), pytest.approx(32.24))
    assert (rows[1]["start_s"], rows[1]["end_s"]) == (40.0, 45.5)
    assert rows[1]["clip_id"] == "etc_passwd" and "/" not in "".join(r["clip_id"] or "" for r in rows)
    assert rows[0]["clip_id"] == "abcDEF_12-x.1.mp4"
    assert rows[0]["duration_s"] is None and rows[-2]["duration_s"] == 60.0


@pytest.mark.parametrize("value, seconds", [
    ("00:00:25.520", 25.52), ("01:02:03", 3723.0), ("02:03.5", 123.5), ("7.25", 7.25), (12, 12.0), (3.5, 3.5),
    ("-1", None), (-1, None), ("1:2:3:4", None), (True, None), (None, None), ("abc", None), (float("nan"), None),
])
def test_parse_timestamp(value, seconds):
    assert parse_timestamp(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_check_span_after_download():
    assert check_span(1.0, 5.0, 10.0) is None
    assert check_span(1.0, 10.04, 10.0) is None  # container rounding
    assert check_span(8.0, 12.0, 10.0) == "span_past_end"
    assert check_span(5.0, 5.0, 10.0) == "bad_span"
    assert check_span(1.0, 2.0, None) == "bad_duration"


def test_rewrite_urls_points_real_metadata_at_loopback():
    table = read_webvid(str(_real_webvid()))
    original = table.column("url").to_pylist()
    rewritten = rewrite_urls(table, BASE).column("url").to_pylist()
    for old, new in zip(original, rewritten):
        assert new == f"{BASE}/rewritten/{hashlib.sha1(old.encode()).hexdigest()}.mp4"
        assert new == BASE + rewritten_path(old)
    kept = rewrite_urls(table, BASE + "/", keep_path=True).column("url").to_pylist()
    assert kept[0] == BASE + original[0].split("ak.picdn.net", 1)[1]
    assert all("picdn" not in u for u in rewritten + kept)
    assert rewrite_urls(table, BASE).drop(["url"]).equals(table.drop(["url"]))


def test_rewrite_urls_leaves_invalid_urls_and_refuses_real_hosts(tmp_path):
    path = tmp_path / "hdvila.jsonl"
    _write_jsonl(path, [{"video_id": "v", "url": "ftp://x/y", "clip": [{"clip_id": "a", "span": [0, 1]}]}])
    table = read_hdvila(str(path))
    assert rewrite_urls(table, "http://localhost:9").column("url").to_pylist() == ["ftp://x/y"]
    for base in ("https://example.org", "http://10.0.0.1:80", "file:///tmp"):
        with pytest.raises(ValueError, match="base_url"):
            rewrite_urls(table, base)
