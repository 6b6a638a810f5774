"""Dataset job records: a job resumes only under the same inputs and settings."""
from __future__ import annotations

import json

import pytest

from pipelines.manifest import JOB, ManifestError, open_job


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
