"""The chaos knob: a worker that fails on purpose, to exercise the restart path for real.

MAV_FAIL_AT_STEP=N (or "fail_at_step" in the job config) makes the last worker raise at step N, once per
stage run folder: a marker file `<run_root>/<stage>/.chaos-N` records that it did, so the worker that
Ray Train's FailureConfig restarts from the last checkpoint goes past step N.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from training.storage import filesystem, join
from training.workers import Worker

CHAOS_ENV = "MAV_FAIL_AT_STEP"


def fail_at_step(config: Mapping[str, Any]) -> int | None:
    """The step the job config names, else the one MAV_FAIL_AT_STEP names, else None."""
    fail = config.get("fail_at_step") or os.environ.get(CHAOS_ENV)
    return int(fail) if fail else None


def maybe_fail(step: int, fail_at: int | None, run_root: str, stage: str, worker: Worker) -> None:
    """The last worker raises once at step `fail_at` (module doc); every other call returns."""
    if fail_at != step or worker.rank != worker.world - 1:
        return
    marker = join(run_root, stage, f".chaos-{step}")
    fs = filesystem(marker)
    if fs.exists(marker):
        return
    fs.makedirs(join(run_root, stage), exist_ok=True)
    fs.touch(marker)
    raise RuntimeError(f"chaos: {CHAOS_ENV}={step} stopped worker {worker.rank} of stage {stage}")
