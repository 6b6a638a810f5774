"""Image data flow (LAION-style): filter the metadata, download with img2dataset, write a manifest.

    metadata parquet(s) -> filter (every row: kept or a reason) -> img2dataset into webdataset shards
    -> outcomes.parquet (one outcome per input row) + manifest.json

Re-running with the same inputs and settings resumes; other inputs or settings in the same folder
are refused unless `overwrite` is set.
"""
from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task

from pipelines.config import ImageDataConfig, load_config
from pipelines.flows import run_step
from pipelines.images.download import download_images
from pipelines.images.filters import filter_metadata, split_kept
from pipelines.manifest import (OUTCOME_SCHEMA, format_counts, hash_inputs, open_job, shard_entries, write_manifest,
                                write_outcomes)
from pipelines.safety import UrlPolicy
from training.storage import join


@task(name="read-metadata")
def read_metadata(paths: list[str]) -> pa.Table:
    tables = []
    for path in paths:
        with fsspec.open(path, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables, promote_options="permissive")


@task(name="filter-metadata")
def filter_step(table: pa.Table, cfg: ImageDataConfig, out: str) -> pa.Table:
    filtered = filter_metadata(table, cfg.filters)
    with fsspec.open(join(out, "filtered.parquet"), "wb") as fh:
        pq.write_table(filtered, fh)
    return filtered


@task(name="download-images")
def download_step(kept: pa.Table, cfg: ImageDataConfig, policy: UrlPolicy, out: str,
                  retry_failed: bool = False) -> tuple[pa.Table, dict]:
    return download_images(kept, out, image_size=cfg.image_size, samples_per_shard=cfg.samples_per_shard,
                           processes=cfg.processes, threads=cfg.threads, retries=cfg.retries,
                           distributor=cfg.distributor, policy=policy, retry_failed=retry_failed)


def _shard_samples(out: str) -> dict[str, int]:
    fs, root = fsspec.core.url_to_fs(join(out, "shards"))
    samples = {}
    for stats in fs.glob(root + "/*_stats.json"):
        with fs.open(stats, "r") as fh:
            samples[stats.rsplit("/", 1)[-1].split("_")[0] + ".tar"] = json.load(fh)["successes"]
    return samples


def build_image_dataset(metadata: list[str], out: str, cfg: ImageDataConfig, policy: UrlPolicy,
                        overwrite: bool = False, retry_failed: bool = False) -> dict:
    """The flow's body: Prefect tasks inside a flow run, plain functions elsewhere (tests, scripts).
    `retry_failed`: fetch the rows whose download failed once more (a resumed dataset only grows)."""
    settings = {"images": cfg.model_dump(mode="json"), "network": policy.model_dump(mode="json")}
    inputs_hash = hash_inputs(metadata)
    open_job(out, kind="images", inputs_hash=inputs_hash, settings=settings, overwrite=overwrite)
    table = run_step(read_metadata, metadata)
    filtered = run_step(filter_step, table, cfg, out)
    kept, dropped = split_kept(filtered)
    fetched, egress = run_step(download_step, kept, cfg, policy, out, retry_failed)
    filtered_rows = pa.table({
        "row_id": dropped["row_id"], "key": dropped["URL"], "status": dropped["status"],
        "reason": dropped["reason"], "shard": pa.nulls(len(dropped), pa.string()),
        "sample_key": pa.nulls(len(dropped), pa.string()),
    }, schema=OUTCOME_SCHEMA)
    outcomes = pa.concat_tables([fetched, filtered_rows])
    samples = _shard_samples(out)
    shards = shard_entries(out, samples)
    write_outcomes(out, outcomes)
    return write_manifest(out, kind="images", inputs=metadata, inputs_hash=inputs_hash, settings=settings,
                          outcomes=outcomes, shards=shards, extra={"egress": egress, "input_rows": len(table)})


@flow(name="image-data", log_prints=True)
def image_data(metadata: list[str], out: str, preset: str = "toy", config: str | None = None,
               overrides: list[str] | None = None, overwrite: bool = False, retry_failed: bool = False) -> dict:
    """Filter LAION-style metadata and download the kept rows into webdataset shards with a manifest."""
    cfg = load_config(preset, config, overrides or [])
    manifest = build_image_dataset(metadata, out, cfg.data.images, cfg.data.network, overwrite, retry_failed)
    get_run_logger().info("image dataset at %s", out)
    print(f"image dataset {out}: {manifest['rows']} rows\n" + format_counts(manifest["counts"], manifest["rows"]))
    return manifest
