"""Image data flow (LAION-style): filter the metadata, download with img2dataset, write a manifest.

    metadata parquet(s) -> plan, in bounded batches: filter (every row kept or a reason) and decide
    (every kept URL allowed or refused) -> img2dataset into webdataset shards
    -> outcomes.parquet/ (one outcome per input row, one part per plan batch and per shard) + manifest.json

Re-running with the same inputs and settings resumes on the saved plan (nothing is decided again);
other inputs or settings in the same folder are refused unless `overwrite` is set. Nothing the
driver holds grows with the row count: batches, per-shard parts, counts streamed from the parts.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from pipelines.config import ImageDataConfig, load_config
from pipelines.flows import run_step
from pipelines.images.download import download_images, shard_index
from pipelines.images.plan import check_metadata, load_or_write_plan
from pipelines.manifest import count_outcomes, format_counts, hash_inputs, open_job, shard_entries, write_manifest
from pipelines.safety import Resolver, UrlPolicy, system_resolve


@task(name="plan-images")
def plan_step(metadata: list[str], cfg: ImageDataConfig, policy: UrlPolicy, out: str, resolve: Resolver) -> dict:
    return load_or_write_plan(metadata, out, cfg, policy, resolve)


@task(name="download-images")
def download_step(plan: dict, cfg: ImageDataConfig, policy: UrlPolicy, out: str, retry_failed: bool,
                  resolve: Resolver) -> dict:
    return download_images(out, plan, image_size=cfg.image_size, samples_per_shard=cfg.samples_per_shard,
                           processes=cfg.processes, threads=cfg.threads, retries=cfg.retries,
                           distributor=cfg.distributor, policy=policy, retry_failed=retry_failed, resolve=resolve,
                           deferred_rounds=cfg.deferred_rounds, deferred_wait_s=cfg.deferred_wait_s)


@task(name="write-manifest")
def manifest_step(out: str, metadata: list[str], inputs_hash: str, settings: dict, plan: dict, egress: dict) -> dict:
    counts = count_outcomes(out, plan["rows"])
    samples, hashes = shard_index(out)
    return write_manifest(out, kind="images", inputs=metadata, inputs_hash=inputs_hash, settings=settings,
                          counts=counts, rows=plan["rows"], shards=shard_entries(out, samples, hashes),
                          extra={"egress": egress, "input_rows": plan["rows"]})


def build_image_dataset(metadata: list[str], out: str, cfg: ImageDataConfig, policy: UrlPolicy,
                        overwrite: bool = False, retry_failed: bool = False,
                        resolve: Resolver = system_resolve) -> dict:
    """The flow's body: Prefect tasks inside a flow run, plain functions elsewhere (tests, scripts).
    `retry_failed`: fetch the rows whose download failed once more (a resumed dataset only grows).
    `resolve`: host name -> addresses for the URL decisions and the egress gate (tests inject one).
    A metadata file that cannot be read or mapped raises MetadataError (one line naming the file)."""
    settings = {"images": cfg.model_dump(mode="json"), "network": policy.model_dump(mode="json")}
    check_metadata(metadata, cfg)
    inputs_hash = hash_inputs(metadata)
    open_job(out, kind="images", inputs_hash=inputs_hash, settings=settings, overwrite=overwrite)
    plan = run_step(plan_step, metadata, cfg, policy, out, resolve)
    egress = run_step(download_step, plan, cfg, policy, out, retry_failed, resolve)
    return run_step(manifest_step, out, metadata, inputs_hash, settings, plan, egress)


@flow(name="image-data", log_prints=True)
def image_data(metadata: list[str], out: str, preset: str = "toy", config: str | None = None,
               overrides: list[str] | None = None, overwrite: bool = False, retry_failed: bool = False) -> dict:
    """Filter LAION-style metadata and download the kept rows into webdataset shards with a manifest."""
    cfg = load_config(preset, config, overrides or [])
    manifest = build_image_dataset(metadata, out, cfg.data.images, cfg.data.network, overwrite, retry_failed)
    get_run_logger().info("image dataset at %s", out)
    print(f"image dataset {out}: {manifest['rows']} rows\n" + format_counts(manifest["counts"], manifest["rows"]))
    return manifest
