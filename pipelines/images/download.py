"""Download the kept LAION rows with img2dataset into webdataset shards, through the egress proxy.

Reader/writer are img2dataset's; this module adds what a production flow needs around it:
a decision step that refuses unsafe URLs before any connection, an egress proxy that re-checks every
request (redirects included) and caps size and time, and one recorded outcome per input row.
Resume is img2dataset's incremental mode over the job's saved plan (pipelines.images.plan): a shard
is done when its `_stats.json` exists, so a shard cut short by a kill is written again and no finished
shard is repeated. Each done shard becomes an outcome part, a sample count and a sha256 as soon as
the driver sees it (`record_shards`); nothing is gathered over all rows.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.egress import environment
from pipelines.gates import GateRun, init_ray
from pipelines.images.plan import PLAN
from pipelines.manifest import OUTCOME_SCHEMA, OUTCOMES, map_shards, supersede, write_outcome_part
from pipelines.safety import Resolver, UrlPolicy, system_resolve
from training.storage import join, sha256_file

SHARD_INDEX = "_work/shards"  # <shard>.json: each recorded shard's sample count and sha256
RETRY = "_work/retry"

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
    if "Rate limited by egress gate" in text or "HTTP Error 429" in text:  # deferred: fetched again later
        return "rate_limited"
    for pattern, reason in _REASONS:
        if pattern.search(text):
            return reason
    return "download_error"


def _distributor(name: str) -> str:
    if name == "auto":
        return "ray" if os.environ.get("RAY_ADDRESS") else "multiprocessing"
    return name


def run_img2dataset(url_list: str, shards: str, *, image_size: int, samples_per_shard: int, processes: int,
                    threads: int, retries: int, timeout: float, distributor: str, proxy_env: dict[str, str],
                    incremental_mode: str = "incremental") -> None:
    import img2dataset  # heavy import, only where downloads happen

    dist = _distributor(distributor)
    if dist == "ray":  # each Ray worker process gets its own gate (proxy_env carries the run's gate spec)
        init_ray(proxy_env, os.environ.get("RAY_ADDRESS"))
    quiet = io.StringIO()
    # A process pool inherits the driver's gate through the environment; under Ray the driver fetches nothing
    # (its own HTTP, Ray's included, stays off the gate) and each worker process is routed by its setup hook.
    with environment({} if dist == "ray" else proxy_env), contextlib.redirect_stdout(quiet):
        img2dataset.download(
            url_list=url_list, input_format="parquet", url_col="URL", caption_col="TEXT",
            save_additional_columns=["row_id"], output_format="webdataset", output_folder=shards,
            image_size=image_size, resize_mode="center_crop", resize_only_if_bigger=False,
            processes_count=processes, thread_count=threads, number_sample_per_shard=samples_per_shard,
            timeout=max(1, int(timeout)), retries=retries, distributor=dist, incremental_mode=incremental_mode,
            enable_wandb=False, extract_exif=False, compute_hash="sha256", disallowed_header_directives=[],
        )


def shard_outcomes(shards: str, shard: str) -> pa.Table:
    """Outcomes of the rows of one done img2dataset shard, from its parquet file."""
    fs, root = fsspec.core.url_to_fs(shards)
    part = pq.read_table(fs.open(f"{root}/{shard}.parquet", "rb"),
                         columns=["row_id", "url", "key", "status", "error_message"])
    ok = pc.equal(part["status"], "success")
    reasons = pa.array([None if s == "success" else failure_reason(m)
                        for s, m in zip(part["status"].to_pylist(), part["error_message"].to_pylist())], pa.string())
    return pa.table({
        "row_id": part["row_id"].cast(pa.int64()), "key": part["url"],
        "status": pc.if_else(ok, "written", "failed"), "reason": reasons,
        "shard": pc.if_else(ok, pa.scalar(f"{shard}.tar"), pa.scalar(None, pa.string())),
        "sample_key": pc.if_else(ok, part["key"], pa.scalar(None, pa.string())),
    }, schema=OUTCOME_SCHEMA)


RECORD_WINDOW = 64  # shards recorded at once


def record_shard(out: str, shard: str) -> pa.Table:
    """Record a done shard's sample count and sha256 (hashed here, where the shard lies); returns its
    outcomes, for the caller to write as the shard's part."""
    shards = join(out, "shards")
    with fsspec.open(join(shards, f"{shard}_stats.json"), "r") as fh:
        samples = json.load(fh)["successes"]
    with fsspec.open(join(out, SHARD_INDEX, f"{shard}.json"), "w") as fh:
        json.dump({"samples": samples, "sha256": sha256_file(join(shards, f"{shard}.tar"))}, fh)
    return shard_outcomes(shards, shard)


def record_shards(out: str, main_shards: int, on_ray: bool = False) -> int:
    """Record every done shard not recorded yet (its part's presence means recorded), RECORD_WINDOW at a
    time (`map_shards`: on the cluster's nodes when `on_ray`). Retry shards (numbered from `main_shards`
    on) supersede their rows' earlier outcomes: those leave the older shard parts first, so a kill in
    between leaves no row with two. Returns how many."""
    fs, root = fsspec.core.url_to_fs(join(out, "shards"))
    done = sorted(p.rsplit("/", 1)[-1].split("_")[0] for p in fs.glob(root + "/*_stats.json"))
    recorded = {p.rsplit("/", 1)[-1][len("shard-"):-len(".parquet")] for p in fs.glob(
        fsspec.core.url_to_fs(join(out, OUTCOMES))[1] + "/shard-*.parquet")}
    todo = [s for s in done if s not in recorded]
    fs.makedirs(fsspec.core.url_to_fs(join(out, SHARD_INDEX))[1], exist_ok=True)
    for start in range(0, len(todo), RECORD_WINDOW):  # the driver holds one window's parts, not every row's
        window = todo[start:start + RECORD_WINDOW]
        parts = map_shards(record_shard, [(out, s) for s in window], on_ray)
        retried = [part["row_id"] for shard, part in zip(window, parts) if int(shard) >= main_shards]
        if retried:
            supersede(out, pa.chunked_array(retried, pa.int64()), keep={f"shard-{s}" for s in window},
                      among="shard-")
        for shard, part in zip(window, parts):
            write_outcome_part(out, f"shard-{shard}", part)
    return len(todo)


def shard_index(out: str) -> tuple[dict[str, int], dict[str, str]]:
    """({tar name: samples}, {tar name: sha256}) of the recorded shards."""
    fs, root = fsspec.core.url_to_fs(join(out, SHARD_INDEX))
    paths = sorted(fs.glob(root + "/*.json"))

    def read(path: str) -> dict:
        with fs.open(path, "r") as fh:
            return json.load(fh)

    with ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(read, paths))
    names = [p.rsplit("/", 1)[-1][:-len(".json")] + ".tar" for p in paths]
    return ({n: e["samples"] for n, e in zip(names, entries)}, {n: e["sha256"] for n, e in zip(names, entries)})


def failed_row_ids(out: str, reason: str | None = None) -> pa.ChunkedArray:
    """Row ids whose download failed (for `reason` only, if given), from the shard parts: refusals by
    the plan are policy, never fetched again."""
    fs, root = fsspec.core.url_to_fs(join(out, OUTCOMES))
    chunks = []
    for path in sorted(fs.glob(root + "/shard-*.parquet")):
        part = pq.read_table(fs.open(path, "rb"), columns=["row_id", "status", "reason"])
        failed = pc.equal(part["status"], "failed")
        if reason is not None:
            failed = pc.and_(failed, pc.fill_null(pc.equal(part["reason"], reason), False))
        chunks.append(part.filter(failed)["row_id"].combine_chunks())
    return pa.chunked_array(chunks, pa.int64())


def write_retry_list(out: str, failed: pa.ChunkedArray) -> int:
    """The plan's rows among `failed`, to _work/retry/ (one file per plan file); returns how many."""
    fs, retry = fsspec.core.url_to_fs(join(out, RETRY))
    if fs.exists(retry):
        fs.rm(retry, recursive=True)
    fs.makedirs(retry, exist_ok=True)
    if not len(failed):
        return 0
    value_set = failed.combine_chunks()
    plan_fs, plan_dir = fsspec.core.url_to_fs(join(out, PLAN, "to_download"))
    total = 0
    for path in sorted(plan_fs.glob(plan_dir + "/*.parquet")):
        rows = pq.read_table(plan_fs.open(path, "rb"))
        again = rows.filter(pc.is_in(rows["row_id"], value_set=value_set))
        if len(again):
            with fs.open(f"{retry}/{path.rsplit('/', 1)[-1]}", "wb") as fh:
                pq.write_table(again, fh)
            total += len(again)
    return total


def download_images(out: str, plan: dict, *, image_size: int, samples_per_shard: int, processes: int, threads: int,
                    retries: int, distributor: str, policy: UrlPolicy, retry_failed: bool = False,
                    resolve: Resolver = system_resolve, deferred_rounds: int = 3,
                    deferred_wait_s: float = 2.0) -> dict:
    """Download the plan's allowed rows into `out`/shards and record each done shard (outcome part,
    sample count, sha256); returns the run's egress record.

    Refused URLs never reach img2dataset (the plan recorded them). `retry_failed`: after the normal
    (resuming) pass, the rows whose download failed are fetched once more into new shards
    (img2dataset's "extend" mode); their new outcome supersedes the old one. Rows a host deferred
    (`rate_limited`: its rate, or a 429/503 with Retry-After) are fetched again the same way, after
    `deferred_wait_s`, for up to `deferred_rounds` rounds; one still deferred then stays `rate_limited`.
    """
    on_ray = _distributor(distributor) == "ray"
    record = functools.partial(record_shards, out, plan["shards"], on_ray)
    record()  # shards finished before a kill
    again = rounds = 0
    with GateRun(policy, record_dir=join(out, "_work", "egress"), resolve=resolve) as gates:
        fetch = functools.partial(run_img2dataset, shards=join(out, "shards"), image_size=image_size,
                                  samples_per_shard=samples_per_shard, processes=processes, threads=threads,
                                  retries=retries, timeout=policy.timeout_s, distributor=distributor,
                                  proxy_env=gates.env())
        if plan["allowed"]:
            fetch(join(out, PLAN, "to_download"))
            record()
        again = write_retry_list(out, failed_row_ids(out)) if retry_failed else 0
        if again:
            fetch(join(out, RETRY), incremental_mode="extend")
            record()
        while rounds < deferred_rounds and write_retry_list(out, failed_row_ids(out, "rate_limited")):
            time.sleep(deferred_wait_s)
            fetch(join(out, RETRY), incremental_mode="extend")
            record()
            rounds += 1
        summary = gates.summary()
    return {**summary, "retried": again, "deferred_rounds": rounds}
