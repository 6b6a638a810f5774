"""Download WebVid videos and HD-VILA clips with video2dataset into webdataset shards, through the egress proxy.

The parts are video2dataset's own: its `InputSharder` slices the job list into shards, its
`DownloadWorker` runs each shard (thread pool, webdataset writer, per-shard parquet, `_stats.json`).
Four of the worker's parts are replaced, because in 1.3.0 they would be wrong here:
- the web-file downloader ignores the HTTP status (a 404 page is saved as a "successful" video) and
  connects wherever the environment says; `CheckedDownloader` goes through the egress proxy
  explicitly and fails on status, HTML bodies and size, with a reason;
- yt-dlp (used for any URL without a video suffix) is refused: it fetches on its own terms;
- the clipping subsampler's "low" precision cuts at keyframes (off by up to a GOP, 5 s in real
  videos, and a span shorter than a GOP crashes the whole video), and its resolution subsampler
  crashes; `ClipAndResize` cuts each span exactly and scales to `clip_size` in one ffmpeg pass;
- the writer puts failed rows into the tar as .json-only samples; `ClipsOnlyWriter` keeps them in
  the shard's parquet only.
Sample keys: video2dataset's `{shard:05d}{index}` per job; an HD-VILA clip adds `_{k:05d}`, k being
the clip's position among its job's spans (sorted by start), so a key never changes on a rerun.
Resume: a shard is done when its `_stats.json` exists; others are redone from scratch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import decord
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from pipelines.egress import environment
from pipelines.gates import GateRun
from pipelines.images.download import decide_urls
from pipelines.manifest import OUTCOME_SCHEMA
from pipelines.safety import UrlPolicy
from pipelines.videos.workers import CheckedDownloader, ClipAndResize, ClipsOnlyWriter, NoYtDlp
from training.storage import join

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")  # what video2dataset fetches without yt-dlp
REASONS = ("refused", "http_404", "http_error", "timeout", "html", "too_big", "truncated", "too_many_redirects",
           "download_error", "corrupt", "bad_duration", "span_past_end", "empty_clip", "clip_failed",
           "unsupported_url")
JOB_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("clips", pa.list_(pa.list_(pa.float64()))),  # [[start, end], ...]; empty: the whole video (WebVid)
    ("row_id", pa.int64()),                       # the first row; each written clip's meta holds its own
    ("row_ids", pa.list_(pa.int64())),            # one per span (or the one WebVid row)
    ("dropped_row_ids", pa.list_(pa.int64())),    # filled by ClipAndResize: spans that gave no clip ...
    ("dropped_reasons", pa.list_(pa.string())),   # ... and why
    ("dataset", pa.string()),                     # webvid | hdvila: in every clip's .json, for per-stage selection
])
JOB_COLUMNS = ["row_id", "row_ids", "dropped_row_ids", "dropped_reasons", "dataset"]  # carried into each clip's meta


def reason_of(message: str | None) -> str:
    """The reason a worker recorded: the leading word of our own messages, else a generic one."""
    head = (message or "").split(":", 1)[0].strip()
    return head if head in REASONS else "download_error"


# --- the decision step: every row, before any connection -------------------------------------


def plan_rows(rows: pa.Table, policy: UrlPolicy) -> pa.Table:
    """Add `decision` (fetch | filtered | failed), `why` and, for refusals, the policy's `detail`."""
    status, reasons, urls = (rows[c].to_pylist() for c in ("status", "reason", "url"))
    ok = [i for i, s in enumerate(status) if s == "ok"]
    refusals = dict(zip(ok, decide_urls([urls[i] for i in ok], policy)))
    decided = [_decide(state, reason, url, refusals.get(i))
               for i, (state, reason, url) in enumerate(zip(status, reasons, urls))]
    return (rows.append_column("decision", pa.array([d[0] for d in decided], pa.string()))
            .append_column("why", pa.array([d[1] for d in decided], pa.string()))
            .append_column("detail", pa.array(refusals.get(i) for i in range(len(rows))).cast(pa.string())))


def _decide(state: str, reason: str | None, url: str | None, refusal: str | None) -> tuple[str, str | None]:
    if state != "ok":
        return "filtered", reason
    if refusal is not None:
        return "failed", "refused"
    if not url or not url.lower().endswith(VIDEO_SUFFIXES):  # yt-dlp's domain in video2dataset: not fetched
        return "filtered", "unsupported_url"
    return "fetch", None


def _passes(clips: list[tuple[float, float, int]]) -> list[list[tuple[float, float, int]]]:
    """Spans of one video in groups without overlap (one download per group), each sorted by start."""
    groups: list[list[tuple[float, float, int]]] = []
    for clip in sorted(clips):
        target = next((g for g in groups if g[-1][1] <= clip[0]), None)
        if target is None:
            groups.append([clip])
        else:
            target.append(clip)
    return groups


def jobs_from_plan(plan: pa.Table) -> pa.Table:
    """One job per WebVid row and per non-overlapping group of an HD-VILA video's clips, in row order."""
    fetch = plan.filter(pc.equal(plan["decision"], "fetch"))
    jobs: list[tuple[int, str, list]] = []
    videos: dict[str, list[tuple[float, float, int]]] = {}
    dataset = dict(zip(fetch["row_id"].to_pylist(), fetch["source"].to_pylist()))
    for row in fetch.select(["row_id", "url", "start_s", "end_s"]).to_pylist():
        if row["start_s"] is None:
            jobs.append((row["row_id"], row["url"], [(None, None, row["row_id"])]))
        else:
            videos.setdefault(row["url"], []).append((row["start_s"], row["end_s"], row["row_id"]))
    for url, clips in videos.items():
        jobs += [(min(c[2] for c in g), url, g) for g in _passes(clips)]
    jobs.sort(key=lambda j: j[0])
    return pa.Table.from_pylist([{
        "url": url, "clips": [[s, e] for s, e, _ in group if s is not None], "row_id": group[0][2],
        "row_ids": [c[2] for c in group], "dropped_row_ids": [], "dropped_reasons": [],
        "dataset": dataset[group[0][2]],
    } for _, url, group in jobs], schema=JOB_SCHEMA)

@dataclass
class ShardRunner:
    """One shard in any process: video2dataset's worker with the proxy environment, temp files under
    `tmp_dir` (its subsamplers use `tempfile`) and its per-sample prints kept off stdout."""

    worker: Any
    env: dict[str, str]
    tmp_dir: str

    def __call__(self, shard: tuple[str, int]) -> tuple[bool, tuple[str, int]]:
        os.makedirs(self.tmp_dir, exist_ok=True)
        old_tempdir = tempfile.tempdir
        tempfile.tempdir = self.tmp_dir
        try:
            with environment(self.env), contextlib.redirect_stdout(io.StringIO()):
                return self.worker(shard)
        finally:
            tempfile.tempdir = old_tempdir


# --- running the shards ----------------------------------------------------------------------


def _restore_decord_bridge() -> None:
    """video2dataset's dataloader sets decord's process-wide bridge to torch when it is imported;
    everything else in this process reads frames as decord NDArrays (`.asnumpy()`), so put it back."""
    decord.bridge.set_bridge("native")


def make_worker(shards: str, column_list: list[str], *, clip_size: int, samples_per_shard: int, threads: int,
                timeout_s: float, max_bytes: int, proxy_url: str, tmp_dir: str) -> Any:
    """video2dataset's DownloadWorker (webdataset shards, no caption) with the parts above in place."""
    # video2dataset takes seconds to import (torch) and resets decord's bridge: only where clips are fetched
    from video2dataset.configs import CONFIGS
    from video2dataset.workers import DownloadWorker

    config = OmegaConf.to_container(CONFIGS["default"])
    config["reading"]["timeout"] = timeout_s
    config["storage"]["number_sample_per_shard"] = samples_per_shard
    config["distribution"]["thread_count"] = threads
    worker = DownloadWorker(sample_writer_class=ClipsOnlyWriter, save_caption=False,
                            output_folder=shards, column_list=column_list, tmp_dir=tmp_dir,
                            encode_formats={"video": "mp4"}, config=config)
    # The proxy answers 504 at policy.timeout_s; the client waits a little longer so that it hears it.
    worker.data_reader.webfile_downloader = CheckedDownloader(proxy_url, timeout_s + 5.0, max_bytes, tmp_dir)
    worker.data_reader.yt_downloader = NoYtDlp()
    worker.clipping_subsampler = ClipAndResize(clip_size, tmp_dir)
    _restore_decord_bridge()
    return worker


def resolve_distributor(name: str, pending: int, processes: int) -> str:
    """auto: Ray when RAY_ADDRESS is set; a process pool for several shards; else in this process
    (a spawned process pays video2dataset's import, torch included, for nothing)."""
    if name != "auto":
        return name
    if os.environ.get("RAY_ADDRESS"):
        return "ray"
    return "multiprocessing" if pending > 1 and processes > 1 else "local"


def run_shards(runner: ShardRunner, shards: list[tuple[str, int]], distributor: str, processes: int,
               retries: int = 1) -> list[tuple[str, int]]:
    """Run every shard, retrying failed ones `retries` times; returns the shards that still failed."""
    pending = list(shards)
    for _ in range(1 + retries):
        if not pending:
            break
        if distributor == "ray":
            results = _run_ray(runner, pending)
        elif distributor == "multiprocessing":
            with multiprocessing.get_context("spawn").Pool(min(processes, len(pending)), maxtasksperchild=5) as pool:
                results = list(pool.imap_unordered(runner, pending))
        elif distributor == "local":  # no process-wide proxy variables: other threads here (a Prefect
            # client) keep their routes; the downloader names its proxy itself
            results = [dataclasses.replace(runner, env={})(shard) for shard in pending]
        else:
            raise ValueError(f"distributor: unknown {distributor!r}; choose auto, local, multiprocessing or ray")
        pending = [shard for ok, shard in results if not ok]
    return pending


def _run_ray(runner: ShardRunner, shards: list[tuple[str, int]]) -> list[tuple[bool, tuple[str, int]]]:
    """Each shard as a Ray task (video2dataset has no Ray distributor). The runner carries the proxy
    address, so the task needs no runtime_env; the proxy must be reachable from the workers."""
    import ray  # seconds to import: only with the ray distributor

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    task = ray.remote(num_cpus=1)(_call_runner)
    ref = ray.put(runner)
    return ray.get([task.remote(ref, shard) for shard in shards])


def _call_runner(runner: ShardRunner, shard: tuple[str, int]) -> tuple[bool, tuple[str, int]]:
    return runner(shard)


def done_shards(shards: str) -> set[int]:
    """Shards with a `_stats.json`: video2dataset writes it last, so these are complete."""
    fs, root = fsspec.core.url_to_fs(shards)
    return {int(p.rsplit("/", 1)[-1].split("_")[0]) for p in fs.glob(root + "/*_stats.json")}


# --- outcomes --------------------------------------------------------------------------------


def collect_outcomes(shards: str, plan: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """One outcome per plan row (from the done shards' parquet files) and the samples per shard."""
    fs, root = fsspec.core.url_to_fs(shards)
    result: dict[int, tuple[str, str | None, str | None, str | None]] = {}
    samples: dict[str, int] = {}
    columns = ["row_id", "row_ids", "dropped_row_ids", "dropped_reasons", "key", "status", "error_message"]
    for shard_id in sorted(done_shards(shards)):
        name = f"{shard_id:05d}"
        with fs.open(f"{root}/{name}.parquet", "rb") as fh:
            records = pq.read_table(fh, columns=columns).to_pylist()
        samples[f"{name}.tar"] = sum(r["status"] == "success" for r in records)
        for rec in records:
            dropped = dict(zip(rec["dropped_row_ids"] or [], rec["dropped_reasons"] or []))
            for row_id, why in dropped.items():
                result[row_id] = ("failed", why, None, None)
            if rec["status"] == "success":
                result[rec["row_id"]] = ("written", None, f"{name}.tar", rec["key"])
                continue
            for row_id in rec["row_ids"]:
                if row_id not in dropped:
                    result[row_id] = ("failed", reason_of(rec["error_message"]), None, None)
    rows = []
    for row in plan.select(["row_id", "key", "decision", "why"]).to_pylist():
        if row["decision"] != "fetch":
            status, why, shard, sample = row["decision"], row["why"], None, None
        else:  # a shard that failed every retry: redone on the next run
            status, why, shard, sample = result.get(row["row_id"], ("failed", "shard_incomplete", None, None))
        rows.append({"row_id": row["row_id"], "key": row["key"], "status": status, "reason": why,
                     "shard": shard, "sample_key": sample})
    return pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA), samples


def _load_or_write_plan(rows: pa.Table, policy: UrlPolicy, path: str) -> pa.Table:
    """The plan is fixed when a job starts: a rerun must slice the same jobs into the same shards
    even if a host's DNS answer has changed since."""
    fs, local = fsspec.core.url_to_fs(path)
    if fs.exists(local):
        with fs.open(local, "rb") as fh:
            return pq.read_table(fh)
    plan = plan_rows(rows, policy)
    with fs.open(local + ".part", "wb") as fh:
        pq.write_table(plan, fh)
    fs.mv(local + ".part", local)
    return plan


def _local_tmp(out: str) -> str:
    """video2dataset writes downloads with plain open(): a local folder, under the output when it is local."""
    fs, root = fsspec.core.url_to_fs(out)
    if "file" in fs.protocol:
        return os.path.join(root, "_work", "tmp")
    return os.path.join(tempfile.gettempdir(), "mav-videos-" + uuid.uuid5(uuid.NAMESPACE_URL, out).hex[:12])


def retry_jobs(jobs: pa.Table, outcomes: pa.Table) -> pa.Table:
    """The download jobs to fetch again on request: every row failed, for a reason that another try
    can change (refusals are policy, a span past the video's end is a fact), and none was written."""
    final = {"refused", "span_past_end"}
    state = {r: (s, why) for r, s, why in zip(*(outcomes[c].to_pylist() for c in ("row_id", "status", "reason")))}
    keep = [bool(ids) and all(state.get(r, ("", None))[0] == "failed" and state[r][1] not in final for r in ids)
            for ids in jobs["row_ids"].to_pylist()]
    return jobs.filter(pa.array(keep, pa.bool_()))


def download_videos(rows: pa.Table, out: str, *, clip_size: int, samples_per_shard: int, processes: int,
                    policy: UrlPolicy, threads: int = 4, distributor: str = "auto",
                    retries: int = 1, retry_failed: bool = False) -> tuple[pa.Table, dict, dict[str, int]]:
    """Fetch, cut and resize the ok reader rows (with row_id) into `out`/shards.

    Returns (outcomes for every row, egress record, samples per done shard). Rows invalid at read
    time are `filtered` with the reader's reason; refused URLs `failed`/`refused` without a connection.
    `retry_failed`: after the normal (resuming) pass, the failed downloads are fetched once more into
    new shards numbered after the existing ones; a row's latest outcome is the one recorded.
    """
    from video2dataset.input_sharder import InputSharder  # seconds to import (torch): only when fetching

    _restore_decord_bridge()
    work, shards, tmp_dir = join(out, "_work"), join(out, "shards"), _local_tmp(out)
    fs, _ = fsspec.core.url_to_fs(out)
    fs.makedirs(shards, exist_ok=True)
    plan = _load_or_write_plan(rows, policy, join(work, "plan.parquet"))
    jobs = jobs_from_plan(plan)
    with fs.open(join(work, "to_download.parquet"), "wb") as fh:
        pq.write_table(jobs, fh)
    sharder = InputSharder(join(work, "to_download.parquet"), "parquet", "url", None, "clips",
                           JOB_COLUMNS, samples_per_shard,
                           done_shards(shards), join(work, "v2d_input"))
    egress: dict = {"refused": [], "cut": [], "hosts": [], "retried": 0}
    again = retry_jobs(jobs, collect_outcomes(shards, plan)[0]) if retry_failed and len(jobs) else jobs.slice(0, 0)
    if len(again):
        # Retry shards go after every existing shard: the sharder numbers from 0, so shift its ids.
        with fs.open(join(work, "retry.parquet"), "wb") as fh:
            pq.write_table(again, fh)
        offset = max(done_shards(shards), default=-1) + 1
        retry_sharder = InputSharder(join(work, "retry.parquet"), "parquet", "url", None, "clips",
                                     JOB_COLUMNS, samples_per_shard, set(), join(work, f"v2d_retry_{offset}"))
    if len(jobs):
        fs.makedirs(join(work, "v2d_input"), exist_ok=True)
        os.makedirs(tmp_dir, exist_ok=True)
        with GateRun(policy, record_dir=join(work, "egress")) as gates, contextlib.redirect_stdout(io.StringIO()):
            pending = list(sharder)  # writes the input slices of the shards not yet done
            worker = make_worker(shards, sharder.column_list, clip_size=clip_size,
                                 samples_per_shard=samples_per_shard, threads=threads, timeout_s=policy.timeout_s,
                                 max_bytes=policy.max_bytes, proxy_url=gates.url, tmp_dir=tmp_dir)
            runner = ShardRunner(worker, {**gates.env(), "TMPDIR": tmp_dir}, tmp_dir)
            run_shards(runner, pending, resolve_distributor(distributor, len(pending), processes), processes,
                       retries)
            if len(again):
                fs.makedirs(join(work, f"v2d_retry_{offset}"), exist_ok=True)
                shifted = [(path, shard_id + offset) for path, shard_id in retry_sharder]
                run_shards(runner, shifted, resolve_distributor(distributor, len(shifted), processes), processes,
                           retries)
            egress = {**gates.summary(), "retried": len(again)}
    outcomes, samples = collect_outcomes(shards, plan)
    return outcomes, egress, samples
