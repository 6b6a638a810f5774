"""Dataset versions: one folder per version with its shards, an outcome per input row, and a manifest.

The manifest is the contract between the data flows and training (training reads only files):
the inputs' hash, the settings, per-status counts, and each shard's sample count and checksum.
Every input row ends in exactly one outcome - `written`, `filtered` (reason) or `failed` (reason) -
and `check_outcomes` proves it before a manifest is written.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from typing import Any, Iterable

import fsspec
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


def check_outcomes(outcomes: pa.Table, n_inputs: int) -> dict[str, int]:
    """Every input row has exactly one outcome; returns per `status[:reason]` counts."""
    ids = outcomes.column("row_id")
    if len(outcomes) != n_inputs or pc.count_distinct(ids).as_py() != n_inputs:
        have = pc.count_distinct(ids).as_py() if len(outcomes) else 0
        raise ManifestError(f"{n_inputs} input rows but {len(outcomes)} outcomes for {have} distinct rows")
    if n_inputs and (pc.min(ids).as_py() != 0 or pc.max(ids).as_py() != n_inputs - 1):
        raise ManifestError("outcome row_ids do not cover 0..n-1")
    bad = set(outcomes.column("status").to_pylist()) - set(STATUSES)
    if bad:
        raise ManifestError(f"unknown statuses {sorted(bad)}")
    counts: Counter[str] = Counter()
    for status, reason in zip(outcomes.column("status").to_pylist(), outcomes.column("reason").to_pylist()):
        counts[status if status == "written" or reason is None else f"{status}:{reason}"] += 1
    return dict(sorted(counts.items()))


def shard_entries(root: str, samples: dict[str, int]) -> list[dict[str, Any]]:
    """The manifest's shard list: each tar of `root`/shards (name -> sample count) with its sha256."""
    return [{"name": f"shards/{name}", "samples": samples[name], "sha256": sha256_file(join(root, "shards", name))}
            for name in sorted(samples)]


def write_manifest(root: str, *, kind: str, inputs: list[str], inputs_hash: str, settings: dict[str, Any],
                   outcomes: pa.Table, shards: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict:
    counts = check_outcomes(outcomes, len(outcomes))
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
        "rows": len(outcomes),
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


def write_outcomes(root: str, outcomes: pa.Table) -> None:
    with fsspec.open(join(root, OUTCOMES), "wb") as fh:
        pq.write_table(outcomes.sort_by("row_id"), fh)


def format_counts(counts: dict[str, int], total: int) -> str:
    """A small table for the end of a flow: one line per outcome, then the total."""
    width = max([len(k) for k in counts] + [5])
    lines = [f"  {k:<{width}}  {v:>8}" for k, v in counts.items()]
    lines.append(f"  {'total':<{width}}  {total:>8}")
    return "\n".join(lines)
