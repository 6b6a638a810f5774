"""Video data flow (WebVid, HD-VILA): read the metadata, download and cut with video2dataset, write a manifest.

    webvid.csv / hdvila.jsonl -> readers (every row ok or a reason; captions dropped)
    -> decision per URL (refused before any connection) -> video2dataset through the egress proxy,
       HD-VILA spans cut exactly, every clip scaled to clip_size -> webdataset shards of .mp4 + .json
    -> outcomes.parquet (one outcome per WebVid row and per HD-VILA clip) + manifest.json

Outcomes: `written` (shard, sample key), `filtered` (read-time reasons such as bad_span, bad_duration,
and unsupported_url), `failed` (refused, http_404, timeout, html, corrupt, too_big, truncated, and
span_past_end when a span is found past the end of the downloaded video). Re-running with the same
inputs and settings resumes; other inputs or settings in the same folder are refused unless `overwrite`.
"""
from __future__ import annotations

from typing import Callable

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext

from pipelines.config import VideoDataConfig, load_config
from pipelines.flows import run_step
from pipelines.manifest import format_counts, hash_inputs, open_job, shard_entries, write_manifest, write_outcomes
from pipelines.safety import UrlPolicy
from pipelines.videos.download import download_videos
from pipelines.videos.readers import read_hdvila, read_webvid, rewrite_urls

READERS: dict[str, Callable[[str], pa.Table]] = {"webvid": read_webvid, "hdvila": read_hdvila}
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


@task(name="read-video-metadata")
def read_sources(sources: list[tuple[str, str]], rewrite_base: str | None = None) -> pa.Table:
    """The readers' rows of every source, in order, with `row_id` (position) and `source`.

    `rewrite_base` points every URL at a loopback mirror (readers.rewrite_urls) before anything is
    decided or fetched: real metadata, local files, no request to the real hosts.
    """
    tables = []
    for kind, path in sources:
        table = READERS[kind](path)
        tables.append(table.append_column("source", pa.array([kind] * len(table), pa.string())))
    rows = pa.concat_tables(tables)
    rows = rewrite_urls(rows, rewrite_base) if rewrite_base else rows
    return rows.append_column("row_id", pa.array(range(len(rows)), pa.int64()))


@task(name="download-videos", log_prints=False)  # video2dataset prints a line per failed row: kept out of the logs
def download_task(rows: pa.Table, cfg: VideoDataConfig, policy: UrlPolicy, out: str,
                  distributor: str, retry_failed: bool = False) -> tuple[pa.Table, dict, dict[str, int]]:
    return download_videos(rows, out, clip_size=cfg.clip_size, samples_per_shard=cfg.samples_per_shard,
                           processes=cfg.processes, threads=cfg.threads, retries=cfg.retries, policy=policy,
                           distributor=distributor, retry_failed=retry_failed)


def build_video_dataset(sources: list[tuple[str, str]], out: str, cfg: VideoDataConfig, policy: UrlPolicy,
                        overwrite: bool = False, distributor: str | None = None, rewrite_base: str | None = None,
                        retry_failed: bool = False) -> dict:
    """The flow's body, callable without Prefect (tests, other flows). Returns the manifest.

    distributor: auto | local | multiprocessing | ray (see videos.download.resolve_distributor);
    None takes the config's.
    """
    sources = check_sources(sources)
    distributor = distributor or cfg.distributor
    inputs = [path for _, path in sources]
    settings = {"videos": cfg.model_dump(mode="json"), "network": policy.model_dump(mode="json"),
                "sources": [kind for kind, _ in sources], "rewrite_base": rewrite_base}
    inputs_hash = hash_inputs(inputs)
    open_job(out, kind="videos", inputs_hash=inputs_hash, settings=settings, overwrite=overwrite)
    rows = run_step(read_sources, sources, rewrite_base)
    outcomes, egress, samples = run_step(download_task, rows, cfg, policy, out, distributor, retry_failed)
    shards = shard_entries(out, samples)
    write_outcomes(out, outcomes)
    sources_rows = {kind: sum(1 for s in rows["source"].to_pylist() if s == kind) for kind in READERS}
    return write_manifest(out, kind="videos", inputs=inputs, inputs_hash=inputs_hash, settings=settings,
                          outcomes=outcomes, shards=shards,
                          extra={"egress": egress, "input_rows": len(rows), "source_rows": sources_rows,
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
