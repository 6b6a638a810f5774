"""Dataset job records, outcome parts and manifests: a job resumes only under the same inputs and settings,
every row has exactly one outcome."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.manifest import (JOB, OUTCOME_SCHEMA, OUTCOMES, ManifestError, count_outcomes, open_job, shard_entries,
                                supersede, write_manifest, write_outcome_part)


def test_a_job_resumes_under_the_same_inputs_and_settings_and_other_ones_are_refused(tmp_path):
    root = str(tmp_path / "videos")
    settings = {"videos": {"clip_size": 32}}
    assert open_job(root, kind="videos", inputs_hash="h", settings=settings) is False
    assert open_job(root, kind="videos", inputs_hash="h", settings=settings) is True
    with pytest.raises(ManifestError, match="other inputs"):
        open_job(root, kind="videos", inputs_hash="other", settings=settings)
    with pytest.raises(ManifestError, match="other settings"):
        open_job(root, kind="videos", inputs_hash="h", settings={"videos": {"clip_size": 64}})
    assert json.loads((tmp_path / "videos" / JOB).read_text())["inputs_hash"] == "h"


def _part(ids, status="written", reason=None):
    n = len(ids)
    return pa.table({"row_id": pa.array(ids, pa.int64()), "key": [f"u{i}" for i in ids], "status": [status] * n,
                     "reason": [reason] * n, "shard": [None] * n, "sample_key": [None] * n}, schema=OUTCOME_SCHEMA)


def test_outcome_parts_count_every_row_once_and_a_retry_part_supersedes_the_earlier_outcome(tmp_path):
    root = str(tmp_path)
    write_outcome_part(root, "shard-00000", _part([0, 1, 2], "failed", "timeout"))
    write_outcome_part(root, "plan-00000", _part([3, 4], "filtered", "nsfw"))
    assert count_outcomes(root, 5) == {"failed:timeout": 3, "filtered:nsfw": 2}
    with pytest.raises(ManifestError, match="6 input rows"):
        count_outcomes(root, 6)
    # A retry shard's part: its rows leave the earlier part before it is written, so each row has one outcome.
    assert supersede(root, pa.array([1, 2]), keep="shard-00001") == 2
    write_outcome_part(root, "shard-00001", _part([1, 2]))
    assert count_outcomes(root, 5) == {"failed:timeout": 1, "filtered:nsfw": 2, "written": 2}
    assert sorted(pq.read_table(tmp_path / OUTCOMES)["row_id"].to_pylist()) == [0, 1, 2, 3, 4]
    write_outcome_part(root, "shard-00001", _part([1, 2]))  # written again: replaced, not added
    assert count_outcomes(root, 5)["written"] == 2
    write_outcome_part(root, "extra", _part([4]))
    with pytest.raises(ManifestError, match="more than one outcome"):
        count_outcomes(root, 5)
    write_outcome_part(root, "extra", _part([7]))
    with pytest.raises(ManifestError, match="outside"):
        count_outcomes(root, 5)


def test_the_manifest_lists_shards_with_counts_and_hashes_and_refuses_counts_that_do_not_add_up(tmp_path):
    (tmp_path / "shards").mkdir()
    for name, body in (("00000.tar", b"a"), ("00001.tar", b"bc")):
        (tmp_path / "shards" / name).write_bytes(body)
    shards = shard_entries(str(tmp_path), {"00000.tar": 1, "00001.tar": 1}, known={"00001.tar": "f" * 64})
    assert shards[0] == {"name": "shards/00000.tar", "samples": 1, "sha256": hashlib.sha256(b"a").hexdigest()}
    assert shards[1]["sha256"] == "f" * 64
    common = dict(kind="images", inputs=["m"], inputs_hash="h", settings={}, shards=shards)
    manifest = write_manifest(str(tmp_path), counts={"written": 2, "failed:timeout": 1}, rows=3, **common)
    assert json.loads((tmp_path / "manifest.json").read_text())["rows"] == manifest["rows"] == 3
    with pytest.raises(ManifestError, match="shards hold 2"):
        write_manifest(str(tmp_path), counts={"written": 1, "failed:timeout": 2}, rows=3, **common)
    with pytest.raises(ManifestError, match="counted outcomes"):
        write_manifest(str(tmp_path), counts={"written": 2}, rows=3, **common)
