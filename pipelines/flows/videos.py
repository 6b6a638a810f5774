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

from typing import Any, Callable

import fsspec
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext

from pipelines.config import VideoDataConfig, load_config
from pipelines.manifest import format_counts, hash_inputs, join, open_job, shard_entries, write_manifest, write_outcomes
from pipelines.safety import UrlPolicy
from pipelines.videos.download import download_videos
from pipelines.videos.readers import read_hdvila, read_webvid

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
def read_sources(sources: list[tuple[str, str]]) -> pa.Table:
    """The readers' rows of every source, in order, with `row_id` (position) and `source`."""
    tables = []
    for kind, path in sources:
        table = READERS[kind](path)
        tables.append(table.append_column("source", pa.array([kind] * len(table), pa.string())))
    rows = pa.concat_tables(tables)
    return rows.append_column("row_id", pa.array(range(len(rows)), pa.int64()))


@task(name="download-videos")
def download_task(rows: pa.Table, cfg: VideoDataConfig, policy: UrlPolicy, out: str,
                  distributor: str) -> tuple[pa.Table, dict, dict[str, int]]:
    return download_videos(rows, out, clip_size=cfg.clip_size, samples_per_shard=cfg.samples_per_shard,
                           processes=cfg.processes, policy=policy, distributor=distributor)


def _step(step: Any, *args: Any) -> Any:
    """A task inside a flow run; its plain function outside one (a bare task call would start a
    temporary Prefect server)."""
    return step(*args) if FlowRunContext.get() is not None else step.fn(*args)


def build_video_dataset(sources: list[tuple[str, str]], out: str, cfg: VideoDataConfig, policy: UrlPolicy,
                        overwrite: bool = False, distributor: str = "auto") -> dict:
    """The flow's body, callable without Prefect (tests, other flows). Returns the manifest."""
    sources = check_sources(sources)
    if cfg.clip_size % 2:
        raise ValueError(f"videos.clip_size must be even (H.264 yuv420p), got {cfg.clip_size}")
    inputs = [path for _, path in sources]
    settings = {"videos": cfg.model_dump(mode="json"), "network": policy.model_dump(mode="json"),
                "sources": [kind for kind, _ in sources]}
    inputs_hash = hash_inputs(inputs)
    open_job(out, kind="videos", inputs_hash=inputs_hash, settings=settings, overwrite=overwrite)
    rows = _step(read_sources, sources)
    outcomes, egress, samples = _step(download_task, rows, cfg, policy, out, distributor)
    fs, root = fsspec.core.url_to_fs(join(out, "shards"))
    shards = shard_entries(fs, root, list(samples), samples)
    for entry in shards:
        entry["name"] = f"shards/{entry['name']}"
    write_outcomes(out, outcomes)
    sources_rows = {kind: sum(1 for s in rows["source"].to_pylist() if s == kind) for kind in READERS}
    return write_manifest(out, kind="videos", inputs=inputs, inputs_hash=inputs_hash, settings=settings,
                          outcomes=outcomes, shards=shards,
                          extra={"egress": egress, "input_rows": len(rows), "source_rows": sources_rows,
                                 "sample": {"video": "mp4", "meta": "json", "text": None,
                                            "size": [cfg.clip_size, cfg.clip_size]}})


@flow(name="video-data", log_prints=True)
def video_data(sources: list[tuple[str, str]], out: str, preset: str = "toy", config: str | None = None,
               overrides: list[str] | None = None, overwrite: bool = False) -> dict:
    """Download WebVid videos and HD-VILA clips into webdataset shards of unlabeled clips with a manifest."""
    cfg = load_config(preset, config, overrides or [])
    manifest = build_video_dataset(sources, out, cfg.data.videos, cfg.data.network, overwrite)
    if FlowRunContext.get() is not None:
        get_run_logger().info("video dataset at %s", out)
    print(f"video dataset {out}: {manifest['rows']} rows\n" + format_counts(manifest["counts"], manifest["rows"]))
    return manifest
