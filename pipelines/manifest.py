"""Dataset versions: one folder per version with its shards, an outcome per input row, and a manifest.

The manifest is the contract between the data flows and training (training reads only files):
the inputs' hash, the settings, per-status counts, and each shard's sample count and checksum.
Every input row ends in exactly one outcome - `written`, `filtered` (reason) or `failed` (reason) -
and `count_outcomes` proves it before a manifest is written.

Outcomes are parquet parts in the folder `outcomes.parquet`, each written by whoever produced the
rows (a shard's part by the step that wrote the shard, refusals and filtered rows per metadata batch),
so nothing holds every outcome at once; `pq.read_table(<root>/outcomes.parquet)` still reads them all.
A row fetched again later (a retry shard) keeps one outcome: `supersede` takes it out of the other
parts before the new part is written.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.storage import MANIFEST, hash_settings, join, sha256_file

OUTCOMES = "outcomes.parquet"
STATUSES = ("written", "filtered", "failed")
OUTCOME_SCHEMA = pa.schema([
    ("row_id", pa.int64()),   # position in the concatenated inputs
    ("key", pa.string()),     # the row's URL (or clip key)
    ("status", pa.string()),  # written | filtered | failed
    ("reason", pa.string()),  # null for written
    ("shard", pa.string()),   # the shard holding the sample, for written rows
    ("sample_key", pa.string()),
])


class ManifestError(ValueError):
    """A dataset folder that does not match what is asked of it (changed inputs, lost rows)."""


def hash_inputs(paths: Iterable[str]) -> str:
    """One hash over the inputs' contents, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _parts(root: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, path = fsspec.core.url_to_fs(join(root, OUTCOMES))
    if not fs.isdir(path):
        return fs, []
    return fs, sorted(p for p in fs.glob(path + "/*.parquet") if not p.rsplit("/", 1)[-1].startswith((".", "_")))


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.{name}.tmp"
    with fs.open(tmp, "wb") as fh:
        pq.write_table(table, fh)
    fs.mv(tmp, path)


def write_outcome_part(root: str, name: str, table: pa.Table) -> None:
    """OUTCOME_SCHEMA rows to `root`/outcomes.parquet/`name`.parquet, atomically; a part of the same
    name is replaced (a shard written again replaces its part)."""
    fs, path = fsspec.core.url_to_fs(join(root, OUTCOMES))
    if fs.isfile(path):  # the single-file layout: its rows are produced again by the flow
        fs.rm(path)
    fs.makedirs(path, exist_ok=True)
    _write_atomic(fs, f"{path}/{name}.parquet", table.select(OUTCOME_SCHEMA.names).cast(OUTCOME_SCHEMA))


def supersede(root: str, row_ids: pa.Array | pa.ChunkedArray, keep: str | set[str], among: str = "") -> int:
    """Take `row_ids` out of every outcome part whose name starts with `among`, except `keep` (the
    part(s) that will hold their new outcome); returns how many outcomes were removed. One part in
    memory at a time; safe to repeat."""
    fs, parts = _parts(root)
    keep = {keep} if isinstance(keep, str) else keep
    removed = 0
    for path in parts:
        name = path.rsplit("/", 1)[-1][:-len(".parquet")]
        if name in keep or not name.startswith(among):
            continue
        ids = pq.read_table(fs.open(path, "rb"), columns=["row_id"]).column("row_id")
        hit = pc.is_in(ids, value_set=pa.array(row_ids, pa.int64()))
        n = pc.sum(hit).as_py() or 0
        if n:
            table = pq.read_table(fs.open(path, "rb"))
            _write_atomic(fs, path, table.filter(pc.invert(hit)))
            removed += n
    return removed


def _outcome_keys(table: pa.Table) -> pa.ChunkedArray:
    """`status` for written rows and rows without a reason, else `status:reason`."""
    status, reason = table.column("status"), table.column("reason")
    joined = pc.binary_join_element_wise(status, reason, ":")
    return pc.if_else(pc.or_(pc.equal(status, "written"), pc.is_null(reason)), status, joined)


def count_outcomes(root: str, n_inputs: int) -> dict[str, int]:
    """Stream the outcome parts: every row_id 0..n-1 has exactly one outcome (ManifestError otherwise);
    returns the per `status[:reason]` counts. Holds one part and one byte per input row."""
    fs, parts = _parts(root)
    seen = np.zeros(n_inputs, dtype=bool)
    counts: Counter[str] = Counter()
    total = 0
    for path in parts:
        parquet = pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False)
        for batch in parquet.iter_batches(1 << 18, columns=["row_id", "status", "reason"]):
            table = pa.Table.from_batches([batch])
            ids = table.column("row_id").to_numpy()
            if len(ids) and (ids.min() < 0 or ids.max() >= n_inputs):
                raise ManifestError(f"{path}: outcome row_ids outside 0..{n_inputs - 1}")
            if seen[ids].any():
                raise ManifestError(f"{path}: a row has more than one outcome")
            seen[ids] = True
            total += len(ids)
            bad = set(pc.unique(table.column("status")).to_pylist()) - set(STATUSES)
            if bad:
                raise ManifestError(f"{path}: unknown statuses {sorted(bad)}")
            for item in pc.value_counts(_outcome_keys(table)).to_pylist():
                counts[item["values"]] += item["counts"]
    have = int(np.count_nonzero(seen))
    if have != total or have != n_inputs:
        raise ManifestError(f"{n_inputs} input rows but {total} outcomes for {have} distinct rows")
    return dict(sorted(counts.items()))


def _hash_workers() -> int:
    return min(8, os.cpu_count() or 1)


def map_shards(fn: Callable[..., Any], calls: list[tuple], on_ray: bool = False) -> list[Any]:
    """fn(*args) for each of `calls`, in order: as Ray tasks on the cluster when the run downloads with Ray
    (the shards' bytes are then read on its nodes, never through the driver), else by a thread pool here.
    Only a Ray the run has started is used: starting one here would skip the run's gates (pipelines.gates)."""
    ray = sys.modules.get("ray")
    if on_ray and calls and ray is not None and ray.is_initialized():
        task = ray.remote(num_cpus=1)(fn)
        return ray.get([task.remote(*args) for args in calls])
    with ThreadPoolExecutor(_hash_workers()) as pool:
        return list(pool.map(lambda args: fn(*args), calls))


def shard_entries(root: str, samples: dict[str, int], known: dict[str, str] | None = None,
                  on_ray: bool = False) -> list[dict[str, Any]]:
    """The manifest's shard list: each tar of `root`/shards (name -> sample count) with its sha256,
    taken from `known` (hashed where the shard was written) or hashed by `map_shards`."""
    names = sorted(samples)
    known = known or {}
    todo = [n for n in names if n not in known]
    hashed = dict(zip(todo, map_shards(sha256_file, [(join(root, "shards", n),) for n in todo], on_ray)))
    return [{"name": f"shards/{n}", "samples": samples[n], "sha256": known.get(n) or hashed[n]} for n in names]


def write_manifest(root: str, *, kind: str, inputs: list[str], inputs_hash: str, settings: dict[str, Any],
                   counts: dict[str, int], rows: int, shards: list[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> dict:
    """Write `root`/manifest.json from `counts` (see count_outcomes) over `rows` input rows."""
    if sum(counts.values()) != rows:
        raise ManifestError(f"{rows} input rows but {sum(counts.values())} counted outcomes")
    written = sum(s["samples"] for s in shards)
    if written != counts.get("written", 0):
        raise ManifestError(f"shards hold {written} samples but {counts.get('written', 0)} rows are written")
    manifest = {
        "kind": kind,
        "format": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "inputs_hash": inputs_hash,
        "settings": settings,
        "settings_hash": hash_settings(settings),
        "rows": rows,
        "counts": counts,
        "shards": shards,
        **(extra or {}),
    }
    with fsspec.open(join(root, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest


JOB = "_work/job.json"


def open_job(root: str, *, kind: str, inputs_hash: str, settings: dict[str, Any], overwrite: bool = False) -> bool:
    """Start or resume the dataset job in `root`. Returns True when resuming.

    Changed inputs or settings are detected, never silently mixed: they raise unless `overwrite`,
    which clears the folder first.
    """
    fs, path = fsspec.core.url_to_fs(root)
    job = {"kind": kind, "inputs_hash": inputs_hash, "settings_hash": hash_settings(settings)}
    job_path = join(path, JOB)
    if fs.exists(job_path):
        with fs.open(job_path, "r") as fh:
            old = json.load(fh)
        if old == job:
            return True
        if not overwrite:
            changed = [k for k in ("kind", "inputs_hash", "settings_hash") if old.get(k) != job[k]]
            raise ManifestError(f"{root} holds a {old.get('kind')} dataset built from other "
                                f"{' and '.join(c.split('_')[0] for c in changed)}; "
                                "choose a new output folder or pass overwrite")
    if overwrite and fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(join(path, "_work"), exist_ok=True)
    with fs.open(job_path, "w") as fh:
        json.dump(job, fh)
    return False


def format_counts(counts: dict[str, int], total: int) -> str:
    """A small table for the end of a flow: one line per outcome, then the total."""
    width = max([len(k) for k in counts] + [5])
    lines = [f"  {k:<{width}}  {v:>8}" for k, v in counts.items()]
    lines.append(f"  {'total':<{width}}  {total:>8}")
    return "\n".join(lines)
