"""The image flow's download plan: metadata read, filtered and decided in bounded batches, written once.

    metadata parquet(s) --batch_rows at a time--> column mapping -> filter_batch -> URL decisions
    -> _work/plan/to_download/<batch>.parquet   allowed rows (URL, TEXT, row_id): img2dataset's input
       _work/plan/refused/<batch>.parquet       refused rows with the policy's reason
       outcomes.parquet/plan-<batch>.parquet    filtered and refused rows' outcomes
    -> _work/plan.json                          written last: the plan is complete

A job decides once: a resumed job reads plan.json and decides nothing again, so a DNS answer that
changed since a kill cannot move img2dataset's shard boundaries (each to_download file is cut into
shards of its own, in file order). Only one batch is in memory at a time.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import ImageDataConfig
from pipelines.images.decide import HostCache, decide_column
from pipelines.images.filters import KEPT, filter_batch
from pipelines.manifest import OUTCOME_SCHEMA, write_outcome_part
from pipelines.safety import Resolver, UrlPolicy, system_resolve
from training.storage import join

PLAN = "_work/plan"
PLAN_DONE = "_work/plan.json"
# Canonical column -> the ImageDataConfig field that names it in the metadata.
COLUMNS = {"URL": "url_col", "TEXT": "caption_col", "punsafe": "punsafe_col", "pwatermark": "pwatermark_col",
           "WIDTH": "width_col", "HEIGHT": "height_col", "similarity": "similarity_col"}
REQUIRED = ("URL", "TEXT")


class MetadataError(ValueError):
    """A metadata file that cannot be read or lacks a mapped column; the message is one line naming it."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def column_map(path: str, names: list[str], cfg: ImageDataConfig) -> dict[str, str]:
    """{metadata column: canonical name} for the mapped columns present. A configured name that is absent
    matches one column spelled with other case (`url` for URL); URL and TEXT must be there."""
    lower: dict[str, list[str]] = {}
    for name in names:
        lower.setdefault(name.lower(), []).append(name)
    mapping, missing = {}, []
    for canonical, field in COLUMNS.items():
        wanted = getattr(cfg, field)
        spellings = lower.get(wanted.lower(), [])
        found = wanted if wanted in names else spellings[0] if len(spellings) == 1 else None  # two: no guess
        if found is not None:
            mapping[found] = canonical
        elif canonical in REQUIRED:
            missing.append(f"{wanted!r} ({field})")
    if missing:
        raise MetadataError(f"{path}: no column {' or '.join(missing)}; it has {names[:20]} - "
                            "set --url-col/--caption-col or data.images.*_col")
    return mapping


def _readable(kind: pa.DataType, canonical: str) -> bool:
    if canonical in REQUIRED:
        return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind) or (
            canonical == "URL" and pa.types.is_dictionary(kind))
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind) or \
        pa.types.is_null(kind)


def open_metadata(path: str, cfg: ImageDataConfig) -> tuple[pq.ParquetFile, dict[str, str]]:
    """The file as parquet, with its column mapping; MetadataError when it cannot be read or mapped, or a
    mapped column has a type the filters cannot read (text in a score column)."""
    try:
        # pre_buffer off: with it, the reader keeps memory of every row group read until the file is done
        parquet = pq.ParquetFile(fsspec.open(path, "rb").open(), pre_buffer=False)
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except (pa.ArrowException, OSError, ValueError) as err:
        raise MetadataError(f"{path}: cannot read it as parquet ({_one_line(err)})") from None
    schema = parquet.schema_arrow
    mapping = column_map(path, schema.names, cfg)
    for name, canonical in mapping.items():
        if not _readable(schema.field(name).type, canonical):
            wanted = "text" if canonical in REQUIRED else "numbers"
            raise MetadataError(f"{path}: column {name!r} ({canonical}) holds {schema.field(name).type}, not {wanted}")
    return parquet, mapping


def check_metadata(paths: list[str], cfg: ImageDataConfig) -> int:
    """Open every file and check its columns (footers only); returns the total row count."""
    return sum(open_metadata(path, cfg)[0].metadata.num_rows for path in paths)


def _canonical(batch: pa.RecordBatch, mapping: dict[str, str], path: str) -> pa.Table:
    table = pa.Table.from_batches([batch]).rename_columns([mapping[n] for n in batch.schema.names])
    for name in REQUIRED:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            try:
                column = pc.cast(column, pa.string())
            except pa.ArrowException as err:
                raise MetadataError(f"{path}: column for {name} holds {column.type}: {_one_line(err)}") from None
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def iter_metadata(paths: list[str], cfg: ImageDataConfig) -> Iterator[tuple[str, pa.Table]]:
    """(path, batch) over every file in order, `cfg.batch_rows` rows at a time, canonical column names."""
    for path in paths:
        parquet, mapping = open_metadata(path, cfg)
        try:
            for batch in parquet.iter_batches(cfg.batch_rows, columns=list(mapping)):
                yield path, _canonical(batch, mapping, path)
        except (pa.ArrowException, OSError) as err:
            raise MetadataError(f"{path}: cannot read it as parquet ({_one_line(err)})") from None


def _outcomes(rows: pa.Table, status: str, reason: pa.Array | pa.ChunkedArray) -> pa.Table:
    n = len(rows)
    return pa.table({"row_id": rows["row_id"], "key": rows["URL"], "status": pa.array([status] * n, pa.string()),
                     "reason": reason, "shard": pa.nulls(n, pa.string()), "sample_key": pa.nulls(n, pa.string())},
                    schema=OUTCOME_SCHEMA)


def plan_batch(table: pa.Table, seq: int, out: str, cfg: ImageDataConfig, policy: UrlPolicy,
               cache: HostCache) -> dict[str, int]:
    """Filter and decide one batch (with row_id); write its plan files and outcome part. Returns counts."""
    filtered = filter_batch(table, cfg.filters)
    kept_mask = pc.equal(filtered["status"], KEPT)
    kept, dropped = filtered.filter(kept_mask), filtered.filter(pc.invert(kept_mask))
    why = decide_column(kept["URL"], policy, cache)
    allowed = pc.is_null(why)
    to_fetch = kept.filter(allowed).select(["URL", "TEXT", "row_id"])
    refused = kept.filter(pc.invert(allowed)).select(["row_id", "URL"]).append_column("why", why.filter(
        pc.invert(allowed)))
    name = f"{seq:06d}.parquet"
    if len(to_fetch):
        with fsspec.open(join(out, PLAN, "to_download", name), "wb") as fh:
            pq.write_table(to_fetch, fh)
    if len(refused):
        with fsspec.open(join(out, PLAN, "refused", name), "wb") as fh:
            pq.write_table(refused, fh)
    write_outcome_part(out, f"plan-{seq:06d}", pa.concat_tables([
        _outcomes(dropped, "filtered", dropped["reason"]),
        _outcomes(refused, "failed", pa.array(["refused"] * len(refused), pa.string()))]))
    return {"rows": len(table), "filtered": len(dropped), "refused": len(refused), "allowed": len(to_fetch),
            "shards": math.ceil(len(to_fetch) / cfg.samples_per_shard)}


def write_plan(paths: list[str], out: str, cfg: ImageDataConfig, policy: UrlPolicy,
               resolve: Resolver = system_resolve) -> dict:
    """Read, filter and decide every row in batches; returns (and saves) the plan's summary."""
    fs, root = fsspec.core.url_to_fs(join(out, PLAN))
    if fs.exists(root):  # a plan cut short: its files are made again, none kept
        fs.rm(root, recursive=True)
    for folder in ("to_download", "refused"):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
    cache = HostCache(resolve, maxsize=cfg.host_cache, workers=cfg.resolve_workers)
    totals = {"rows": 0, "filtered": 0, "refused": 0, "allowed": 0, "shards": 0, "batches": 0}
    for path, batch in iter_metadata(paths, cfg):
        batch = batch.append_column("row_id", pa.array(np.arange(totals["rows"], totals["rows"] + len(batch))))
        try:
            counts = plan_batch(batch, totals["batches"], out, cfg, policy, cache)
        except ValueError as err:  # a column filter_batch cannot read (e.g. text in punsafe)
            raise MetadataError(f"{path}: {_one_line(err)}") from None
        for key, value in counts.items():
            totals[key] += value
        totals["batches"] += 1
    totals["host_lookups"], totals["origins_decided"] = cache.lookups, cache.decided
    with fsspec.open(join(out, PLAN_DONE), "w") as fh:
        json.dump(totals, fh)
    return totals


def load_or_write_plan(paths: list[str], out: str, cfg: ImageDataConfig, policy: UrlPolicy,
                       resolve: Resolver = system_resolve) -> dict:
    """The job's plan: the saved one when the job has one (nothing decided again), else a new one."""
    fs, done = fsspec.core.url_to_fs(join(out, PLAN_DONE))
    if fs.exists(done):
        with fs.open(done, "r") as fh:
            return json.load(fh) | {"reused": True}
    return write_plan(paths, out, cfg, policy, resolve) | {"reused": False}
