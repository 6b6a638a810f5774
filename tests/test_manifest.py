"""Dataset job records: a job resumes only under the same inputs and settings, or an earlier form of them."""
from __future__ import annotations

import json

import pytest

from pipelines.manifest import JOB, ManifestError, open_job


def test_a_job_started_under_a_retired_setting_resumes_and_other_settings_are_refused(tmp_path):
    root = str(tmp_path / "videos")
    now = {"videos": {"clip_size": 32}}
    before = {"videos": {"clip_size": 32, "fps_min": 1, "fps_max": 30}}  # as an earlier version hashed it
    assert open_job(root, kind="videos", inputs_hash="h", settings=before) is False
    with pytest.raises(ManifestError, match="other settings"):
        open_job(root, kind="videos", inputs_hash="h", settings=now)
    assert open_job(root, kind="videos", inputs_hash="h", settings=now, earlier_forms=[before]) is True
    assert open_job(root, kind="videos", inputs_hash="h", settings=now) is True  # the record took the new form
    with pytest.raises(ManifestError, match="other inputs"):
        open_job(root, kind="videos", inputs_hash="other", settings=now, earlier_forms=[now])
    with pytest.raises(ManifestError, match="other settings"):
        open_job(root, kind="videos", inputs_hash="h", settings={"videos": {"clip_size": 64}}, earlier_forms=[before])
    assert json.loads((tmp_path / "videos" / JOB).read_text())["inputs_hash"] == "h"
