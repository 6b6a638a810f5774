"""Download WebVid videos and HD-VILA clips with video2dataset into webdataset shards, through the egress proxy.

The parts are video2dataset's own: its `InputSharder` slices each jobs file of the plan (videos.plan)
into shards, numbered on from the file's name, one file at a time; its `DownloadWorker` runs each
shard (thread pool, webdataset writer, per-shard parquet, `_stats.json`).
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
Resume: a shard is done when its `_stats.json` exists; others are redone from scratch. Each shard's
outcomes are its own part of outcomes.parquet (videos.parts); jobs fetched again (--retry-failed, rows
the gate deferred) go to new jobs files after the last shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import decord
import fsspec
from omegaconf import OmegaConf

from pipelines.egress import environment
from pipelines.gates import GateRun, flush_process_gates, gate_env
from pipelines.safety import UrlPolicy
from pipelines.videos.parts import job_files, shard_ids, write_parts, write_retry_jobs
from pipelines.videos.plan import JOB_COLUMNS
from pipelines.videos.workers import CheckedDownloader, ClipAndResize, ClipsOnlyWriter, NoYtDlp
from training.storage import join

REASONS = ("refused", "http_404", "http_error", "timeout", "html", "too_big", "truncated", "too_many_redirects",
           "download_error", "corrupt", "bad_duration", "span_past_end", "empty_clip", "clip_failed",
           "unsupported_url")

def reason_of(message: str | None) -> str:
    """The reason a worker recorded: the leading word of our own messages, else a generic one."""
    head = (message or "").split(":", 1)[0].strip()
    return head if head in REASONS or head == "rate_limited" else "download_error"


@dataclass
class ShardRunner:
    """One shard in any process: video2dataset's worker behind this process's own egress gate (started
    from the run's gate spec in `env`, its record written when the shard ends), temp files under
    `tmp_dir` (its subsamplers use `tempfile`) and its per-sample prints kept off stdout."""

    worker: Any
    env: dict[str, str]
    tmp_dir: str

    def __call__(self, shard: tuple[str, int]) -> tuple[bool, tuple[str, int]]:
        os.makedirs(self.tmp_dir, exist_ok=True)
        old_tempdir = tempfile.tempdir
        tempfile.tempdir = self.tmp_dir
        try:
            with environment(gate_env(self.env)), contextlib.redirect_stdout(io.StringIO()):
                return self.worker(shard)
        finally:
            tempfile.tempdir = old_tempdir
            flush_process_gates()


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
    """Each shard as a Ray task (video2dataset has no Ray distributor). The runner carries the run's gate
    spec, never an address: each task's process starts its own gate, so the task needs no runtime_env."""
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


def _local_tmp(out: str) -> str:
    """video2dataset writes downloads with plain open(): a local folder, under the output when it is local."""
    fs, root = fsspec.core.url_to_fs(out)
    if "file" in fs.protocol:
        return os.path.join(root, "_work", "tmp")
    return os.path.join(tempfile.gettempdir(), "mav-videos-" + uuid.uuid5(uuid.NAMESPACE_URL, out).hex[:12])


# Reasons another try can change, for --retry-failed: refusals are policy, a span past the video's end a
# fact, and a shard left incomplete is redone on every run anyway.
FINAL_REASONS = ("refused", "span_past_end", "shard_incomplete")
RATE_LIMIT_ROUNDS = 3  # later rounds for rows the gate deferred (429/503); after them: failed: rate_limited


@dataclass
class FileRunner:
    """Runs the shards of one jobs file that are not done yet, then writes every shard's outcome part."""

    runner: ShardRunner
    out: str
    samples_per_shard: int
    distributor: str
    processes: int
    retries: int

    def __call__(self, first: int, path: str, done: set[int]) -> dict[str, int]:
        from video2dataset.input_sharder import InputSharder  # seconds to import (torch): only when fetching

        shards = join(self.out, "shards")
        ids = shard_ids(first, path, self.samples_per_shard)
        if any(i not in done for i in ids):
            slices = join(self.out, "_work", "v2d_input", f"{first:09d}")
            fs, folder = fsspec.core.url_to_fs(slices)
            fs.makedirs(folder, exist_ok=True)
            sharder = InputSharder(path, "parquet", "url", None, "clips", JOB_COLUMNS, self.samples_per_shard,
                                   {i - first for i in ids if i in done}, slices)
            pending = [(slice_path, shard_id + first) for slice_path, shard_id in sharder]
            run_shards(self.runner, pending, resolve_distributor(self.distributor, len(pending), self.processes),
                       self.processes, self.retries)
            fs, root = fsspec.core.url_to_fs(shards)
            done |= {i for i in ids if fs.exists(f"{root}/{i:05d}_stats.json")}  # the file's shards only
        return write_parts(self.out, first, path, self.samples_per_shard, done, reason_of)


def download_videos(out: str, *, clip_size: int, samples_per_shard: int, processes: int, policy: UrlPolicy,
                    threads: int = 4, distributor: str = "auto", retries: int = 1,
                    retry_failed: bool = False) -> tuple[dict, dict[str, int]]:
    """Fetch, cut and resize the planned jobs (`plan.write_plan`) into `out`/shards, one jobs file at a time.

    Returns (egress record, samples per done shard); every fetched row's outcome is in its shard's part.
    Rows the gate deferred (`rate_limited`: a 429/503 or the host's turn too far off) are fetched again in
    up to RATE_LIMIT_ROUNDS later rounds, the k-th after k x policy.backoff_s; never dropped: a row still
    deferred after the last round is `failed: rate_limited` (and fetched again by the next run).
    `retry_failed`: first, the failed downloads are fetched once more into new shards numbered after the
    existing ones; a row's outcome is then its latest shard's.
    """
    _restore_decord_bridge()
    shards, tmp_dir = join(out, "shards"), _local_tmp(out)
    fs, _ = fsspec.core.url_to_fs(out)
    fs.makedirs(shards, exist_ok=True)
    files = job_files(out)
    if not files:
        return {"refused": [], "cut": [], "hosts": [], "retried": 0, "deferred_again": 0}, {}
    os.makedirs(tmp_dir, exist_ok=True)
    samples: dict[str, int] = {}
    with GateRun(policy, record_dir=join(out, "_work", "egress")) as gates, \
            contextlib.redirect_stdout(io.StringIO()):
        worker = make_worker(shards, JOB_COLUMNS + ["clips", "url"], clip_size=clip_size,
                             samples_per_shard=samples_per_shard, threads=threads, timeout_s=policy.timeout_s,
                             max_bytes=policy.max_bytes, proxy_url=gates.url, tmp_dir=tmp_dir)
        run = FileRunner(ShardRunner(worker, {**gates.env(), "TMPDIR": tmp_dir}, tmp_dir), out, samples_per_shard,
                         distributor, processes, retries)
        done = done_shards(shards)
        for first, path in files:
            samples.update(run(first, path, done))
        fetched_again = {"retried": 0, "deferred_again": 0}
        rounds = [("retried", 0)] if retry_failed else []
        for kind, k in rounds + [("deferred_again", k) for k in range(1, RATE_LIMIT_ROUNDS + 1)]:
            if kind == "retried":
                again = write_retry_jobs(out, None, samples_per_shard, skip=set(FINAL_REASONS))
            else:  # a host that asked for a pause gets it before its rows are asked for again
                again = write_retry_jobs(out, {"rate_limited"}, samples_per_shard)
                if not again:
                    break
                time.sleep(min(policy.backoff_s * k, policy.max_backoff_s))
            fetched_again[kind] += sum(n for _, _, n in again)
            for first, path, _ in again:
                samples.update(run(first, path, done))
        egress = {**gates.summary(), **fetched_again}
    return egress, samples
