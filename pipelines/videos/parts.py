"""The video flow's per-shard outcomes, and the jobs that later rounds fetch again.

Each shard has one outcome part, `outcomes.parquet/shard-<id>.parquet`, made from two files only:
its slice of the jobs file it was cut from (`samples_per_shard` jobs, in file order, as video2dataset's
InputSharder cuts it) and, once the shard is done, video2dataset's parquet of that shard. A retried
job names the shard it came from (`from_shard`); its rows' outcomes move to the new shard's part and
leave the old one. Parts are made again in shard order on every run, so a run cut short anywhere
leaves nothing the next run does not redo, and only one jobs file and one shard are held at a time.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.manifest import OUTCOME_SCHEMA, OUTCOMES, write_outcome_part
from pipelines.videos.plan import JOB_SCHEMA, JOBS
from training.storage import join

JOB_FILE_ROWS = 1 << 16  # retried jobs per jobs file
SHARD_COLUMNS = ["row_id", "row_ids", "dropped_row_ids", "dropped_reasons", "key", "status", "error_message"]


def part_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}"


def job_files(out: str) -> list[tuple[int, str]]:
    """(first shard id, path) of every jobs file, in shard order."""
    fs, root = fsspec.core.url_to_fs(join(out, JOBS))
    if not fs.isdir(root):
        return []
    paths = sorted(p for p in fs.glob(root + "/*.parquet") if not p.rsplit("/", 1)[-1].startswith("."))
    return [(int(p.rsplit("/", 1)[-1].split(".")[0]), fs.unstrip_protocol(p)) for p in paths]


def shard_ids(first: int, path: str, samples_per_shard: int) -> range:
    with fsspec.open(path, "rb") as fh:
        rows = pq.ParquetFile(fh).metadata.num_rows
    return range(first, first + math.ceil(rows / samples_per_shard))


def shard_outcomes(jobs: pa.Table, records: list[dict] | None, shard: str,
                   reason_of: Callable[[str | None], str]) -> pa.Table:
    """One outcome per row of a shard's jobs: from the shard's records when it is done, else
    `failed: shard_incomplete` (a shard that failed every retry; redone on the next run)."""
    result: dict[int, tuple[str, str | None, str | None, str | None]] = {}
    for rec in records or []:
        dropped = dict(zip(rec["dropped_row_ids"] or [], rec["dropped_reasons"] or []))
        for row_id, why in dropped.items():
            result[row_id] = ("failed", why, None, None)
        if rec["status"] == "success":
            result[rec["row_id"]] = ("written", None, f"{shard}.tar", rec["key"])
            continue
        for row_id in rec["row_ids"] or []:
            if row_id not in dropped:
                result[row_id] = ("failed", reason_of(rec["error_message"]), None, None)
    row_ids, keys = pc.list_flatten(jobs["row_ids"]), pc.list_flatten(jobs["keys"])
    fields = ("status", "reason", "shard", "sample_key")
    values = list(zip(*result.values())) if result else [()] * len(fields)
    at = pc.index_in(row_ids, value_set=pa.array(list(result), pa.int64()))
    missing = pc.is_null(at)
    column = {name: pc.take(pa.array(list(v), pa.string()), at) for name, v in zip(fields, values)}
    return pa.table({"row_id": row_ids, "key": keys,
                     "status": pc.if_else(missing, "failed", column["status"]),
                     "reason": pc.if_else(missing, "shard_incomplete", column["reason"]),
                     "shard": column["shard"], "sample_key": column["sample_key"]}, schema=OUTCOME_SCHEMA)


def _shard_records(shards: str, shard_id: int) -> list[dict]:
    with fsspec.open(join(shards, f"{shard_id:05d}.parquet"), "rb") as fh:
        return pq.read_table(fh, columns=SHARD_COLUMNS).to_pylist()


def _read_part(out: str, shard_id: int) -> pa.Table | None:
    fs, path = fsspec.core.url_to_fs(join(out, OUTCOMES, f"{part_name(shard_id)}.parquet"))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def write_parts(out: str, first: int, path: str, samples_per_shard: int, done: set[int],
                reason_of: Callable[[str | None], str]) -> dict[str, int]:
    """The outcome part of each shard of one jobs file; the rows of retried jobs leave the parts of the
    shards they came from. Returns the samples of each done shard ({"00003.tar": n})."""
    with fsspec.open(path, "rb") as fh:
        jobs = pq.read_table(fh)
    samples = {}
    for k in range(math.ceil(len(jobs) / samples_per_shard)):
        shard_id = first + k
        records = _shard_records(join(out, "shards"), shard_id) if shard_id in done else None
        part = shard_outcomes(jobs.slice(k * samples_per_shard, samples_per_shard), records, f"{shard_id:05d}",
                              reason_of)
        write_outcome_part(out, part_name(shard_id), part)
        if records is not None:
            samples[f"{shard_id:05d}.tar"] = pc.sum(pc.equal(part["status"], "written")).as_py() or 0
    retried = jobs.filter(pc.is_valid(jobs["from_shard"]))
    for origin in pc.unique(retried["from_shard"]).to_pylist():
        moved = pc.list_flatten(retried.filter(pc.equal(retried["from_shard"], origin))["row_ids"])
        old = _read_part(out, origin)
        if old is not None:
            write_outcome_part(out, part_name(origin), old.filter(pc.invert(pc.is_in(old["row_id"], moved))))
    return samples


def _retry_candidates(out: str, reasons: set[str] | None, skip: set[str],
                      samples_per_shard: int) -> Iterator[pa.Table]:
    """Per shard, its jobs whose every row failed for one of `reasons` (None: any reason not in `skip`)."""
    for first, path in job_files(out):
        with fsspec.open(path, "rb") as fh:
            jobs = pq.read_table(fh)
        for k in range(math.ceil(len(jobs) / samples_per_shard)):
            part = _read_part(out, first + k)
            if part is None:
                continue
            chosen = pc.is_in(part["reason"], pa.array(sorted(reasons or skip), pa.string()))
            hit = pc.and_(pc.equal(part["status"], "failed"), chosen if reasons else pc.invert(chosen))
            failed = set(part.filter(pc.fill_null(hit, False))["row_id"].to_pylist())
            if not failed:
                continue
            shard = jobs.slice(k * samples_per_shard, samples_per_shard)
            keep = [bool(ids) and all(r in failed for r in ids) for ids in shard["row_ids"].to_pylist()]
            again = shard.filter(pa.array(keep, pa.bool_()))
            if len(again):
                n = len(again)
                yield (again.set_column(again.schema.get_field_index("from_shard"), "from_shard",
                                        pa.array([first + k] * n, pa.int64()))
                       .set_column(again.schema.get_field_index("dropped_row_ids"), "dropped_row_ids",
                                   pa.array([[]] * n, pa.list_(pa.int64())))
                       .set_column(again.schema.get_field_index("dropped_reasons"), "dropped_reasons",
                                   pa.array([[]] * n, pa.list_(pa.string()))))


def write_retry_jobs(out: str, reasons: set[str] | None, samples_per_shard: int,
                     skip: set[str] = frozenset()) -> list[tuple[int, str, int]]:
    """Jobs files of the jobs to fetch again (see _retry_candidates), numbered after every existing
    shard; returns (first shard, path, jobs) of each."""
    files = job_files(out)
    start = max((shard_ids(f, p, samples_per_shard).stop for f, p in files), default=0)
    written: list[tuple[int, str, int]] = []
    buffer: list[pa.Table] = []

    def flush() -> None:
        nonlocal start
        table = pa.concat_tables(buffer).cast(JOB_SCHEMA)
        path = join(out, JOBS, f"{start:09d}.parquet")
        with fsspec.open(path, "wb") as fh:
            pq.write_table(table, fh)
        written.append((start, path, len(table)))
        start += math.ceil(len(table) / samples_per_shard)
        buffer.clear()

    for again in _retry_candidates(out, reasons, set(skip), samples_per_shard):
        buffer.append(again)
        if sum(len(t) for t in buffer) >= JOB_FILE_ROWS:
            flush()
    if buffer:
        flush()
    return written
