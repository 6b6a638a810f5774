"""The video metadata readers: WebVid CSV or parquet and HD-VILA JSONL -> one outcome per input row, no text;
read in bounded batches; a file that cannot be read is one line naming it."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from _shared import shared_file

from pipelines.cli import main
from pipelines.flows.videos import iter_sources
from pipelines.images.decide import HostCache
from pipelines.safety import UrlPolicy
from pipelines.videos.plan import plan_rows, write_plan
from pipelines.videos.readers import (
    VIDEO_ROWS_SCHEMA,
    KeySet,
    MetadataError,
    check_span,
    iter_hdvila,
    mark_duplicates,
    parse_iso_duration,
    parse_timestamp,
    read_hdvila,
    rewrite_urls,
    rewritten_path,
)
from pipelines.videos.webvid import iter_webvid, read_webvid

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


# --- the metadata files people have: formats, batches, files that cannot be read ----------------


def _webvid_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_webvid_parquet_reads_as_the_csv_does_whatever_its_name(tmp_path):
    """WebVid as parquet (how most copies circulate): the same rows as the CSV; the format is taken from
    the bytes, so a parquet file named .csv reads too. Integer ids (the parquet copies' type) are ids."""
    csv_path = _real_webvid()
    records = pa_csv.read_csv(csv_path)  # videoid as int64, as in the parquet copies
    assert pa.types.is_integer(records.schema.field("videoid").type)
    for name in ("webvid.parquet", "named_like.csv"):
        pq.write_table(records, tmp_path / name)
        table = read_webvid(str(tmp_path / name))
        assert table.drop(["line"]).equals(read_webvid(str(csv_path)).drop(["line"]))
        assert table["line"].to_pylist() == list(range(2, 22))


def test_webvid_needs_only_an_id_and_a_url(tmp_path):
    """`videoid,name,contentUrl` (no duration, no page fields; a spreadsheet's BOM first) reads; duration
    is checked only when given."""
    path = tmp_path / "minimal.csv"
    path.write_text("\ufeffvideoid,name,contentUrl\n"
                    "11,a caption,https://v.example/11.mp4\n"
                    "12,another,\n"
                    "13,third,https://v.example/13.mp4\n")
    rows = read_webvid(str(path)).to_pylist()
    assert [(r["key"], r["status"], r["reason"], r["duration_s"]) for r in rows] == [
        ("webvid:11", "ok", None, None), ("webvid:12", "invalid", "no_url", None), ("webvid:13", "ok", None, None)]
    parquet = _webvid_parquet(tmp_path / "minimal.parquet", [
        {"videoid": 1, "contentUrl": "https://v.example/1.mp4", "duration": 12.5},
        {"videoid": None, "contentUrl": "https://v.example/2.mp4", "duration": 3.0},
        {"videoid": 3, "contentUrl": "ftp://v.example/3.mp4", "duration": 3.0},
        {"videoid": 4, "contentUrl": "https://v.example/4.mp4", "duration": 0.0},
        {"videoid": 1, "contentUrl": "https://v.example/1b.mp4", "duration": 2.0},
        {"videoid": 6, "contentUrl": "http://:80/6.mp4", "duration": 2.0}])
    got = [(r["key"], r["reason"], r["duration_s"]) for r in read_webvid(str(parquet)).to_pylist()]
    assert got == [("webvid:1", None, 12.5), ("webvid:line3", "bad_video_id", None),
                   ("webvid:3", "bad_url_scheme", 3.0), ("webvid:4", "bad_duration", None),
                   ("webvid:1@line6", "duplicate_key", 2.0), ("webvid:6", "bad_url", 2.0)]


def test_batches_give_the_rows_of_one_read_and_never_split_a_video(tmp_path):
    """Small batches: the same rows (duplicates found across batches too); HD-VILA batches end on a line."""
    whole = read_webvid(str(_real_webvid()))
    seen = KeySet()
    batches = [mark_duplicates(b, seen) for b in iter_webvid(str(_real_webvid()), batch_rows=3)]
    assert [len(b) for b in batches] == [3] * 6 + [2]
    assert pa.concat_tables(batches).equals(whole)
    path = tmp_path / "hdvila.jsonl"
    videos = [{"video_id": f"v{i}", "url": f"https://v.example/{i}.mp4",
               "clip": [{"clip_id": f"v{i}.{k}", "span": [k, k + 1]} for k in range(i % 3 + 1)]} for i in range(7)]
    _write_jsonl(path, videos + [videos[2]])  # the last line repeats a video: its clips are duplicates
    seen = KeySet()
    batches = [mark_duplicates(b, seen) for b in iter_hdvila(str(path), batch_rows=2)]
    assert all(len(set(b["line"].to_pylist()) & set(c["line"].to_pylist())) == 0
               for b, c in zip(batches, batches[1:]))
    joined = pa.concat_tables(batches)
    assert joined.equals(read_hdvila(str(path)))
    assert joined["reason"].to_pylist()[-3:] == ["duplicate_key"] * 3
    assert joined["key"].to_pylist()[-1] == "hdvila:v2:2@line8"


def test_key_set_finds_every_repeat_across_many_adds():
    keys = [f"webvid:{i % 1000}" for i in range(5000)]
    seen = KeySet()
    repeats = np.concatenate([seen.add(keys[i:i + 137]) for i in range(0, len(keys), 137)])
    assert repeats.sum() == 4000 and not repeats[:1000].any() and repeats[1000:].all()
    assert len(seen.runs) <= 8  # merged like a binary counter: log2 of the adds


def test_hdvila_released_format_reads_and_youtube_rows_stay_refused():
    """The released HD-VILA-100M line (XPretrain hd-vila-100m/README.md): clips with HH:MM:SS.mmm spans;
    its YouTube URLs are read fine and then not fetched: `unsupported_url`, before any connection."""
    line = {"video_id": "QMi8x8o55Ns", "url": "https://www.youtube.com/watch?v=QMi8x8o55Ns",
            "clip": [{"clip_id": "QMi8x8o55Ns.1.mp4", "span": ["00:00:17.759", "00:00:23.279"]},
                     {"clip_id": "QMi8x8o55Ns.16.mp4", "span": ["00:04:52.140", "00:05:03.350"]}]}
    with fsspec.open("memory://meta/hdvila_part0.jsonl", "w") as fh:
        fh.write(json.dumps(line) + "\n")
    rows = read_hdvila("memory://meta/hdvila_part0.jsonl")
    assert rows["status"].to_pylist() == ["ok", "ok"]
    assert rows["start_s"].to_pylist() == [pytest.approx(17.759), pytest.approx(292.14)]
    assert rows["clip_id"].to_pylist() == ["QMi8x8o55Ns.1.mp4", "QMi8x8o55Ns.16.mp4"]
    public = UrlPolicy()
    rows = rows.append_column("source", pa.array(["hdvila"] * 2)).append_column("row_id", pa.array([0, 1]))
    plan = plan_rows(rows, public, HostCache(lambda host: ["93.184.216.34"]))  # no lookup leaves the machine
    assert plan["decision"].to_pylist() == ["filtered"] * 2
    assert plan["why"].to_pylist() == ["unsupported_url"] * 2


def _bad_files(tmp: Path) -> dict[str, tuple[str, Path, str]]:
    """name -> (source kind, file, what its one line must say)."""
    pq.write_table(pa.table({"videoid": [1], "contentUrl": ["https://v.example/1.mp4"]}), tmp / "webvid.parquet")
    pq.write_table(pa.table({"videoid": [1], "url": ["https://v.example/1.mp4"]}), tmp / "nourl.parquet")
    (tmp / "latin1.csv").write_bytes("videoid,name,contentUrl\n1,caf\xe9,https://v.example/1.mp4\n".encode("latin-1"))
    (tmp / "nocol.csv").write_text("videoid,name,duration\n1,x,PT1S\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "cut.parquet").write_bytes((tmp / "webvid.parquet").read_bytes()[:40])
    (tmp / "hdvila.jsonl").write_text('{"video_id": "a", "url": "https://v.example/a.mp4", "clip": []}\n')
    (tmp / "notjson.jsonl").write_text("{'video_id': 'a', 'url': 'x'}\n")
    return {
        "parquet given as HD-VILA": ("hdvila", tmp / "webvid.parquet", "a parquet file, not HD-VILA JSON lines"),
        "CSV given as HD-VILA": ("hdvila", tmp / "nocol.csv", "CSV or other text, not HD-VILA JSON lines"),
        "JSON lines given as WebVid": ("webvid", tmp / "hdvila.jsonl", "JSON lines, not WebVid CSV or parquet"),
        "not UTF-8": ("webvid", tmp / "latin1.csv", "not UTF-8 text at line 2"),
        "CSV without contentUrl": ("webvid", tmp / "nocol.csv", "lacks column(s) contentUrl"),
        "parquet without contentUrl": ("webvid", tmp / "nourl.parquet", "lacks column(s) contentUrl"),
        "empty": ("webvid", tmp / "empty.csv", "empty file"),
        "cut parquet": ("webvid", tmp / "cut.parquet", "unreadable parquet"),
        "malformed first JSON line": ("hdvila", tmp / "notjson.jsonl", "line 1 is not a JSON object"),
        "missing": ("webvid", tmp / "absent.csv", "no such file"),
    }


def test_a_file_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    for case, (kind, path, what) in _bad_files(tmp_path).items():
        with pytest.raises(MetadataError) as err:
            list(iter_sources([(kind, str(path))]))
        message = str(err.value)
        assert message.startswith(f"{path}: ") and what in message and "\n" not in message, (case, message)


def test_the_cli_says_one_line_and_no_traceback(tmp_path, capsys):
    bad = _bad_files(tmp_path)
    for case in ("parquet given as HD-VILA", "not UTF-8", "CSV without contentUrl"):
        kind, path, what = bad[case]
        assert main(["data", "videos", f"--{kind}", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err and str(path) in err and "Traceback" not in err, (case, err)
    assert not (tmp_path / "out").exists()


def test_plan_in_small_batches_decides_and_groups_as_one_batch(tmp_path):
    """The plan written batch by batch: every row once (an outcome part for rows not fetched, a job
    for the others), overlapping HD-VILA spans in separate jobs, the same as in one batch."""
    hd = tmp_path / "hdvila.jsonl"
    _write_jsonl(hd, [{"video_id": f"h{i}", "url": f"http://127.0.0.1:9/h{i}.mp4",
                       "clip": [{"clip_id": "a", "span": [0, 2]}, {"clip_id": "b", "span": [1, 3]},
                                {"clip_id": "c", "span": [2, 4]}, {"clip_id": "d", "span": [3, 1]}]}
                      for i in range(3)] + ["{broken"])
    sources = [("webvid", str(_real_webvid())), ("hdvila", str(hd))]
    policy = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"])
    summaries, plans = [], []
    for batch_rows, out in ((4, tmp_path / "small"), (1000, tmp_path / "one")):
        batches = iter_sources(sources, rewrite_base="http://127.0.0.1:9", batch_rows=batch_rows)
        summaries.append(write_plan(batches, str(out), policy, samples_per_shard=4))
        jobs = pq.read_table(out / "_work" / "jobs")
        plans.append((sorted(map(tuple, jobs["row_ids"].to_pylist())),
                      pq.read_table(out / "outcomes.parquet").sort_by("row_id").to_pylist()))
    small, one = summaries
    assert small["rows"] == one["rows"] == 20 + 12 + 1 and small["batches"] > one["batches"] == 2
    assert small["source_rows"] == one["source_rows"] == {"webvid": 20, "hdvila": 13}
    assert plans[0] == plans[1]
    job_rows, outcomes = plans[0]
    covered = sorted([r for ids in job_rows for r in ids] + [o["row_id"] for o in outcomes])
    assert covered == list(range(33))
    assert job_rows[20:] == [(20, 22), (21,), (24, 26), (25,), (28, 30), (29,)]  # spans [0,2]+[2,4], then [1,3]
    assert [(o["status"], o["reason"]) for o in outcomes] == [("filtered", "bad_span")] * 3 + [("filtered", "bad_json")]
