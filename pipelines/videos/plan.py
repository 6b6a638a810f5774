"""The video flow's download plan: reader batches decided once, written as they come, reused on resume.

    reader batches (row_id, source) --one at a time--> URL decisions (fetch | filtered | failed)
    -> _work/plan/rows/<batch>.parquet         every row with its decision
       outcomes.parquet/plan-<batch>.parquet   the outcomes of the rows not fetched
       _work/jobs/<first shard>.parquet        the batch's download jobs; its shards are numbered from
                                               the file's name on, `samples_per_shard` jobs each
    -> _work/plan.json                         written last: the plan is complete

A resumed job reads plan.json and decides nothing again, so a DNS answer that changed since a kill
cannot move shard boundaries. A batch never splits a video's clips (the readers keep a line whole).
"""
from __future__ import annotations

import json
import math
from typing import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.images.decide import HostCache, decide_urls
from pipelines.manifest import OUTCOME_SCHEMA, OUTCOMES, write_outcome_part
from pipelines.safety import UrlPolicy
from training.storage import join

PLAN_ROWS = "_work/plan/rows"
PLAN_DONE = "_work/plan.json"
JOBS = "_work/jobs"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")  # what video2dataset fetches without yt-dlp
JOB_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("clips", pa.list_(pa.list_(pa.float64()))),  # [[start, end], ...]; empty: the whole video (WebVid)
    ("row_id", pa.int64()),                       # the first row; each written clip's meta holds its own
    ("row_ids", pa.list_(pa.int64())),            # one per span (or the one WebVid row)
    ("dropped_row_ids", pa.list_(pa.int64())),    # filled by ClipAndResize: spans that gave no clip ...
    ("dropped_reasons", pa.list_(pa.string())),   # ... and why
    ("dataset", pa.string()),                     # webvid | hdvila: in every clip's .json, for per-stage selection
    ("keys", pa.list_(pa.string())),              # the rows' reader keys (outcomes), not sent to the worker
    ("from_shard", pa.int64()),                   # a retried job: the shard whose outcome it replaces
])
JOB_COLUMNS = ["row_id", "row_ids", "dropped_row_ids", "dropped_reasons", "dataset"]  # carried into each clip's meta


def plan_rows(rows: pa.Table, policy: UrlPolicy, cache: HostCache | None = None) -> pa.Table:
    """Add `decision` (fetch | filtered | failed), `why` and, for refusals, the policy's `detail`."""
    ok = pc.fill_null(pc.equal(rows["status"].combine_chunks(), "ok"), False)
    urls = rows.filter(ok)["url"].to_pylist()
    refusals = pa.array(decide_urls(urls, policy, cache=cache), pa.string())
    detail = pc.replace_with_mask(pa.nulls(len(rows), pa.string()), ok, refusals)
    fetchable = pc.fill_null(_any_suffix(rows["url"]), False)
    null = pa.scalar(None, pa.string())
    decision = pc.if_else(pc.invert(ok), "filtered",
                          pc.if_else(pc.is_valid(detail), "failed", pc.if_else(fetchable, "fetch", "filtered")))
    # A URL without a video suffix is yt-dlp's domain in video2dataset: not fetched.
    why = pc.if_else(pc.invert(ok), rows["reason"],
                     pc.if_else(pc.is_valid(detail), "refused", pc.if_else(fetchable, null, "unsupported_url")))
    return rows.append_column("decision", decision).append_column("why", why).append_column("detail", detail)


def _any_suffix(urls: pa.ChunkedArray | pa.Array) -> pa.Array:
    lower = pc.utf8_lower(urls)
    hit = pc.ends_with(lower, VIDEO_SUFFIXES[0])
    for suffix in VIDEO_SUFFIXES[1:]:
        hit = pc.or_(hit, pc.ends_with(lower, suffix))
    return hit


def _passes(clips: list[tuple[float, float, int, str]]) -> list[list[tuple[float, float, int, str]]]:
    """Spans of one video in groups without overlap (one download per group), each sorted by start."""
    groups: list[list[tuple[float, float, int, str]]] = []
    for clip in sorted(clips):
        target = next((g for g in groups if g[-1][1] <= clip[0]), None)
        if target is None:
            groups.append([clip])
        else:
            target.append(clip)
    return groups


def _empty_lists(n: int, values: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], values))


def _one_row_jobs(rows: pa.Table) -> pa.Table:
    """A job per row (WebVid: the whole video), column at a time."""
    n = len(rows)
    one_each = pa.array(np.arange(n + 1, dtype=np.int32))
    return pa.table({
        "url": rows["url"], "clips": _empty_lists(n, pa.list_(pa.float64())), "row_id": rows["row_id"],
        "row_ids": pa.ListArray.from_arrays(one_each, rows["row_id"].combine_chunks()),
        "dropped_row_ids": _empty_lists(n, pa.int64()), "dropped_reasons": _empty_lists(n, pa.string()),
        "dataset": rows["source"], "keys": pa.ListArray.from_arrays(one_each, rows["key"].combine_chunks()),
        "from_shard": pa.nulls(n, pa.int64()),
    }, schema=JOB_SCHEMA)


def _clip_jobs(rows: pa.Table) -> pa.Table:
    """HD-VILA: a job per non-overlapping group of a video's clips."""
    videos: dict[str, list[tuple[float, float, int, str]]] = {}
    dataset: dict[str, str] = {}
    for row in rows.select(["row_id", "key", "url", "start_s", "end_s", "source"]).to_pylist():
        videos.setdefault(row["url"], []).append((row["start_s"], row["end_s"], row["row_id"], row["key"]))
        dataset[row["url"]] = row["source"]
    return pa.Table.from_pylist([{
        "url": url, "clips": [[s, e] for s, e, _, _ in group], "row_id": min(c[2] for c in group),
        "row_ids": [c[2] for c in group], "dropped_row_ids": [], "dropped_reasons": [], "dataset": dataset[url],
        "keys": [c[3] for c in group], "from_shard": None,
    } for url, clips in videos.items() for group in _passes(clips)], schema=JOB_SCHEMA)


def jobs_from_plan(plan: pa.Table) -> pa.Table:
    """One job per WebVid row and per non-overlapping group of an HD-VILA video's clips, in row order
    (of a job's first row)."""
    fetch = plan.filter(pc.equal(plan["decision"], "fetch"))
    whole = pc.is_null(fetch["start_s"])
    jobs = pa.concat_tables([_one_row_jobs(fetch.filter(whole)), _clip_jobs(fetch.filter(pc.invert(whole)))])
    return jobs.sort_by("row_id")


def outcomes_of(plan: pa.Table) -> pa.Table:
    """The outcomes of the rows the plan does not fetch: filtered with the reader's reason, or failed."""
    rows = plan.filter(pc.not_equal(plan["decision"], "fetch"))
    return pa.table({"row_id": rows["row_id"], "key": rows["key"], "status": rows["decision"], "reason": rows["why"],
                     "shard": pa.nulls(len(rows), pa.string()), "sample_key": pa.nulls(len(rows), pa.string())},
                    schema=OUTCOME_SCHEMA)


def write_plan(batches: Iterable[pa.Table], out: str, policy: UrlPolicy, samples_per_shard: int) -> dict:
    """Decide and write every batch (row_id and source already set); returns (and saves) the summary."""
    fs, root = fsspec.core.url_to_fs(out)
    for folder in (PLAN_ROWS, JOBS):  # a plan cut short: its files are made again, none kept
        if fs.exists(join(root, folder)):
            fs.rm(join(root, folder), recursive=True)
        fs.makedirs(join(root, folder), exist_ok=True)
    for part in fs.glob(join(root, OUTCOMES, "plan-*.parquet")):
        fs.rm(part)
    cache = HostCache()
    summary: dict = {"rows": 0, "batches": 0, "jobs": 0, "shards": 0, "source_rows": {}}
    for batch in batches:
        plan = plan_rows(batch, policy, cache)
        name = f"{summary['batches']:06d}"
        with fsspec.open(join(out, PLAN_ROWS, f"{name}.parquet"), "wb") as fh:
            pq.write_table(plan, fh)
        done = outcomes_of(plan)
        if len(done):
            write_outcome_part(out, f"plan-{name}", done)
        jobs = jobs_from_plan(plan)
        if len(jobs):
            with fsspec.open(join(out, JOBS, f"{summary['shards']:09d}.parquet"), "wb") as fh:
                pq.write_table(jobs, fh)
        summary["shards"] += math.ceil(len(jobs) / samples_per_shard)
        summary["jobs"] += len(jobs)
        summary["rows"] += len(batch)
        summary["batches"] += 1
        for item in pc.value_counts(batch["source"]).to_pylist():
            summary["source_rows"][item["values"]] = summary["source_rows"].get(item["values"], 0) + item["counts"]
    summary["host_lookups"] = cache.lookups
    with fsspec.open(join(out, PLAN_DONE), "w") as fh:
        json.dump(summary, fh)
    return summary


def load_plan(out: str) -> dict | None:
    """The saved plan's summary when the job has a complete plan, else None."""
    fs, path = fsspec.core.url_to_fs(join(out, PLAN_DONE))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return json.load(fh)
