"""Download the kept LAION rows with img2dataset into webdataset shards, through the egress proxy.

Reader/writer are img2dataset's; this module adds what a production flow needs around it:
a decision step that refuses unsafe URLs before any connection, an egress proxy that re-checks every
request (redirects included) and caps size and time, and one recorded outcome per input row.
Resume is img2dataset's incremental mode: a shard is done when its `_stats.json` exists, so a shard
cut short by a kill is written again and no finished shard is repeated.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.egress import environment
from pipelines.gates import GateRun
from pipelines.manifest import OUTCOME_SCHEMA
from pipelines.safety import UrlPolicy, check_url, system_resolve
from training.storage import join

# Substrings of img2dataset's error messages -> the reason we record. First match wins.
_REASONS = (
    (re.compile(r"Refused by egress proxy"), "refused"),
    (re.compile(r"HTTP Error 404"), "http_404"),
    (re.compile(r"timed out|timeout|HTTP Error 504", re.I), "timeout"),
    (re.compile(r"HTTP Error (\d{3})"), "http_error"),
    (re.compile(r"decod|identify|truncat|corrupt", re.I), "corrupt"),
    (re.compile(r"too big|too small|size|aspect", re.I), "bad_size"),
)


def failure_reason(message: str | None) -> str:
    """Map an img2dataset error message to a short, countable reason."""
    text = message or "unknown error"
    for pattern, reason in _REASONS:
        if pattern.search(text):
            return reason
    return "download_error"


def decide_urls(urls: list[str], policy: UrlPolicy) -> list[str | None]:
    """The refusal reason of each URL (None: allowed). Host answers are cached for the batch."""
    resolve = functools.lru_cache(maxsize=None)(lambda host: tuple(system_resolve(host)))
    return [None if d.allowed else d.reason for d in (check_url(u, policy, resolve) for u in urls)]


def _distributor(name: str) -> str:
    if name == "auto":
        return "ray" if os.environ.get("RAY_ADDRESS") else "multiprocessing"
    return name


def run_img2dataset(url_list: str, shards: str, *, image_size: int, samples_per_shard: int, processes: int,
                    threads: int, retries: int, timeout: float, distributor: str, proxy_env: dict[str, str],
                    incremental_mode: str = "incremental") -> None:
    import img2dataset  # heavy import, only where downloads happen

    dist = _distributor(distributor)
    if dist == "ray":
        import ray  # seconds to import: only with the ray distributor

        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True,
                 runtime_env={"env_vars": proxy_env})
    quiet = io.StringIO()
    with environment(proxy_env), contextlib.redirect_stdout(quiet):
        img2dataset.download(
            url_list=url_list, input_format="parquet", url_col="URL", caption_col="TEXT",
            save_additional_columns=["row_id"], output_format="webdataset", output_folder=shards,
            image_size=image_size, resize_mode="center_crop", resize_only_if_bigger=False,
            processes_count=processes, thread_count=threads, number_sample_per_shard=samples_per_shard,
            timeout=max(1, int(timeout)), retries=retries, distributor=dist, incremental_mode=incremental_mode,
            enable_wandb=False, extract_exif=False, compute_hash="sha256", disallowed_header_directives=[],
        )


def collect_outcomes(shards: str) -> pa.Table:
    """Outcomes of every row img2dataset saw, from its per-shard parquet files (done shards only)."""
    fs, root = fsspec.core.url_to_fs(shards)
    tables = []
    for stats in sorted(fs.glob(root + "/*_stats.json")):
        shard = stats.rsplit("/", 1)[-1].split("_")[0]
        part = pq.read_table(fs.open(f"{root}/{shard}.parquet", "rb"), columns=["row_id", "url", "key", "status",
                                                                                 "error_message"])
        ok = pc.equal(part["status"], "success")
        reasons = pa.array([None if s == "success" else failure_reason(m)
                            for s, m in zip(part["status"].to_pylist(), part["error_message"].to_pylist())],
                           pa.string())
        tables.append(pa.table({
            "row_id": part["row_id"].cast(pa.int64()), "key": part["url"],
            "status": pc.if_else(ok, "written", "failed"), "reason": reasons,
            "shard": pc.if_else(ok, pa.scalar(f"{shard}.tar"), pa.scalar(None, pa.string())),
            "sample_key": pc.if_else(ok, part["key"], pa.scalar(None, pa.string())),
        }, schema=OUTCOME_SCHEMA))
    if not tables:
        return OUTCOME_SCHEMA.empty_table()
    outcomes = pa.concat_tables(tables)
    # A row retried on request sits in a later shard too: its latest outcome (shards in order) wins.
    latest = {row_id: i for i, row_id in enumerate(outcomes.column("row_id").to_pylist())}
    return outcomes.take(pa.array(sorted(latest.values()), pa.int64()))


def retry_rows(to_fetch: pa.Table, shards: str) -> pa.Table:
    """The rows of `to_fetch` whose latest outcome is a failed download (refusals are policy, not retried)."""
    current = collect_outcomes(shards)
    failed = current.filter(pc.equal(current["status"], "failed"))
    return to_fetch.filter(pc.is_in(to_fetch["row_id"], failed["row_id"]))


def download_images(kept: pa.Table, out: str, *, image_size: int, samples_per_shard: int, processes: int,
                    threads: int, retries: int, distributor: str, policy: UrlPolicy,
                    retry_failed: bool = False) -> tuple[pa.Table, dict]:
    """Download `kept` (URL, TEXT, row_id) into `out`/shards; returns (outcomes, egress record).

    Refused URLs never reach img2dataset; they are `failed` with reason `refused`. `retry_failed`:
    after the normal (resuming) pass, the rows whose download failed are fetched once more into new
    shards (img2dataset's "extend" mode); a row's latest outcome is the one recorded.
    """
    reasons = decide_urls(kept["URL"].to_pylist(), policy)
    allowed = pa.array([r is None for r in reasons])
    refused = kept.filter(pc.invert(allowed))
    to_fetch = kept.filter(allowed).select(["URL", "TEXT", "row_id"])
    url_list = join(out, "_work", "to_download.parquet")
    fs, _ = fsspec.core.url_to_fs(url_list)
    fs.makedirs(join(out, "_work"), exist_ok=True)
    with fsspec.open(url_list, "wb") as fh:
        pq.write_table(to_fetch, fh)
    egress: dict = {"refused": [], "cut": [], "retried": 0}
    if len(to_fetch):
        with GateRun(policy, record_dir=join(out, "_work", "egress")) as gates:
            fetch = functools.partial(run_img2dataset, shards=join(out, "shards"), image_size=image_size,
                                      samples_per_shard=samples_per_shard, processes=processes, threads=threads,
                                      retries=retries, timeout=policy.timeout_s, distributor=distributor,
                                      proxy_env=gates.env())
            fetch(url_list)
            again = retry_rows(to_fetch, join(out, "shards")) if retry_failed else to_fetch.slice(0, 0)
            if len(again):
                retry_list = join(out, "_work", "retry.parquet")
                with fsspec.open(retry_list, "wb") as fh:
                    pq.write_table(again, fh)
                fetch(retry_list, incremental_mode="extend")
            summary = gates.summary()
            egress = {"refused": summary["refused"], "cut": summary["cut"], "retried": len(again)}
    fetched = collect_outcomes(join(out, "shards"))
    refused_rows = pa.table({
        "row_id": refused["row_id"], "key": refused["URL"],
        "status": pa.array(["failed"] * len(refused), pa.string()),
        "reason": pa.array(["refused"] * len(refused), pa.string()),
        "shard": pa.nulls(len(refused), pa.string()), "sample_key": pa.nulls(len(refused), pa.string()),
    }, schema=OUTCOME_SCHEMA)
    return pa.concat_tables([fetched, refused_rows]), egress
