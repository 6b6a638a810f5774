"""Video data flow (WebVid, HD-VILA): read the metadata, download and cut with video2dataset, write a manifest.

    webvid.csv|.parquet / hdvila.jsonl -> readers (every row ok or a reason; captions dropped)
    -> decision per URL (refused before any connection) -> video2dataset through the egress proxy,
       HD-VILA spans cut exactly, every clip scaled to clip_size -> webdataset shards of .mp4 + .json
    -> outcomes.parquet/ (one outcome per WebVid row and per HD-VILA clip, a part per metadata batch
       and per shard) + manifest.json
Metadata is read, decided and planned in bounded batches (videos.plan); shards run one jobs file at a
time and each shard's outcomes are written as its own part (videos.parts): the driver holds one batch.

Outcomes: `written` (shard, sample key), `filtered` (read-time reasons such as bad_span, bad_duration,
and unsupported_url), `failed` (refused, http_404, timeout, html, corrupt, too_big, truncated, and
span_past_end when a span is found past the end of the downloaded video). Re-running with the same
inputs and settings resumes; other inputs or settings in the same folder are refused unless `overwrite`.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext

from pipelines.config import VideoDataConfig, load_config
from pipelines.flows import run_step
from pipelines.manifest import count_outcomes, format_counts, hash_inputs, open_job, shard_entries, write_manifest
from pipelines.safety import UrlPolicy
from pipelines.videos.download import download_videos, resolve_distributor
from pipelines.videos.plan import load_plan, write_plan
from pipelines.videos.readers import BATCH_ROWS, VIDEO_ROWS_SCHEMA, KeySet, iter_hdvila, mark_duplicates, rewrite_urls
from pipelines.videos.webvid import iter_webvid

READERS: dict[str, Callable[..., Iterator[pa.Table]]] = {"webvid": iter_webvid, "hdvila": iter_hdvila}
SOURCE_DOC = "sources: a list of (kind, path) pairs, kind one of webvid, hdvila"


def check_sources(sources: list[tuple[str, str]] | list[list[str]]) -> list[tuple[str, str]]:
    if not sources:
        raise ValueError(f"no video sources given; {SOURCE_DOC}")
    checked = []
    for item in sources:
        if len(item) != 2 or item[0] not in READERS:
            raise ValueError(f"bad source {item!r}; {SOURCE_DOC}")
        checked.append((str(item[0]), str(item[1])))
    return checked


def check_metadata(sources: list[tuple[str, str]]) -> None:
    """Open every source and read its first batch: a file that is not its kind's format raises
    MetadataError (one line) before a flow starts."""
    for kind, path in check_sources(sources):
        next(READERS[kind](path, batch_rows=1), None)


def iter_sources(sources: list[tuple[str, str]], rewrite_base: str | None = None,
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """The readers' rows of every source in order, in batches, with `source` and `row_id` (position);
    keys unique over all sources. `rewrite_base` points every URL at a loopback mirror
    (readers.rewrite_urls) before anything is decided or fetched."""
    seen, start = KeySet(), 0
    for kind, path in sources:
        for batch in READERS[kind](path, batch_rows):
            batch = mark_duplicates(batch, seen)
            batch = rewrite_urls(batch, rewrite_base) if rewrite_base else batch
            batch = batch.append_column("source", pa.array([kind] * len(batch), pa.string()))
            yield batch.append_column("row_id", pa.array(np.arange(start, start + len(batch), dtype=np.int64)))
            start += len(batch)


def read_sources(sources: list[tuple[str, str]], rewrite_base: str | None = None) -> pa.Table:
    """Every row of the sources as one table (small inputs: tests, tools)."""
    batches = list(iter_sources(sources, rewrite_base))
    empty = VIDEO_ROWS_SCHEMA.append(pa.field("source", pa.string())).append(pa.field("row_id", pa.int64()))
    return pa.concat_tables(batches) if batches else empty.empty_table()


@task(name="plan-video-rows")
def plan_task(sources: list[tuple[str, str]], out: str, policy: UrlPolicy, rewrite_base: str | None,
              samples_per_shard: int, batch_rows: int = BATCH_ROWS) -> dict:
    """The job's saved plan, or a new one: read, decide and write one batch at a time."""
    return load_plan(out) or write_plan(iter_sources(sources, rewrite_base, batch_rows), out, policy,
                                        samples_per_shard)


@task(name="download-videos", log_prints=False)  # video2dataset prints a line per failed row: kept out of the logs
def download_task(cfg: VideoDataConfig, policy: UrlPolicy, out: str, distributor: str,
                  retry_failed: bool = False) -> tuple[dict, dict[str, int]]:
    return download_videos(out, clip_size=cfg.clip_size, samples_per_shard=cfg.samples_per_shard,
                           processes=cfg.processes, threads=cfg.threads, retries=cfg.retries, policy=policy,
                           distributor=distributor, retry_failed=retry_failed)


def build_video_dataset(sources: list[tuple[str, str]], out: str, cfg: VideoDataConfig, policy: UrlPolicy,
                        overwrite: bool = False, distributor: str | None = None, rewrite_base: str | None = None,
                        retry_failed: bool = False, batch_rows: int = BATCH_ROWS) -> dict:
    """The flow's body, callable without Prefect (tests, other flows). Returns the manifest.

    distributor: auto | local | multiprocessing | ray (see videos.download.resolve_distributor);
    None takes the config's. batch_rows: metadata rows read and decided at a time (the plan's jobs
    files follow the batches; a resumed job keeps its saved plan's).
    """
    sources = check_sources(sources)
    distributor = distributor or cfg.distributor
    inputs = [path for _, path in sources]
    settings = {"videos": cfg.model_dump(mode="json"), "network": policy.model_dump(mode="json"),
                "sources": [kind for kind, _ in sources], "rewrite_base": rewrite_base}
    inputs_hash = hash_inputs(inputs)
    open_job(out, kind="videos", inputs_hash=inputs_hash, settings=settings, overwrite=overwrite)
    plan = run_step(plan_task, sources, out, policy, rewrite_base, cfg.samples_per_shard, batch_rows)
    egress, samples = run_step(download_task, cfg, policy, out, distributor, retry_failed)
    counts = count_outcomes(out, plan["rows"])
    on_ray = resolve_distributor(distributor, 2, 2) == "ray"  # shards are hashed on the cluster, not here
    source_rows = {kind: plan["source_rows"].get(kind, 0) for kind in READERS}
    return write_manifest(out, kind="videos", inputs=inputs, inputs_hash=inputs_hash, settings=settings,
                          counts=counts, rows=plan["rows"],
                          shards=shard_entries(out, samples, on_ray=on_ray),
                          extra={"egress": egress, "input_rows": plan["rows"], "source_rows": source_rows,
                                 "sample": {"video": "mp4", "meta": "json", "text": None,
                                            "size": [cfg.clip_size, cfg.clip_size]}})


@flow(name="video-data", log_prints=True)
def video_data(sources: list[tuple[str, str]], out: str, preset: str = "toy", config: str | None = None,
               overrides: list[str] | None = None, overwrite: bool = False, rewrite_base: str | None = None,
               retry_failed: bool = False) -> dict:
    """Download WebVid videos and HD-VILA clips into webdataset shards of unlabeled clips with a manifest."""
    cfg = load_config(preset, config, overrides or [])
    manifest = build_video_dataset(sources, out, cfg.data.videos, cfg.data.network, overwrite,
                                   rewrite_base=rewrite_base, retry_failed=retry_failed)
    if FlowRunContext.get() is not None:
        get_run_logger().info("video dataset at %s", out)
    print(f"video dataset {out}: {manifest['rows']} rows\n" + format_counts(manifest["counts"], manifest["rows"]))
    return manifest
