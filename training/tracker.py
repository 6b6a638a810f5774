"""What training code logs through: the `Tracker` interface and `NullTracker`, the one that logs nothing.

MLflow is the real backend (`training.tracking.MlflowTracker`); the null one keeps library code and the
ranks other than 0 free of `if tracker:` branches.
"""
from __future__ import annotations

import abc

DEFAULT_ALIAS = "current"  # the registry alias a stage's newest weights get, and sampling reads


class Tracker(abc.ABC):
    """What training code needs from a tracker. Call it on rank 0 only; other ranks get a NullTracker."""

    run_id: str | None = None

    @abc.abstractmethod
    def start(self, run_name: str, *, parent_run_id: str | None = None, tags: dict | None = None,
              resume_run_id: str | None = None) -> str:
        """Open a run (a child of `parent_run_id` when given), or reopen `resume_run_id`; returns its id."""

    @abc.abstractmethod
    def log_params(self, params: dict) -> None:
        """Log a (nested) config as flattened params."""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalars at `step`; a step at or below the last one logged for a key is dropped."""

    @abc.abstractmethod
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts (under `artifact_path`)."""

    @abc.abstractmethod
    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Write `data` as an artifact, YAML for .yaml/.yml names, JSON otherwise."""

    @abc.abstractmethod
    def log_manifest(self, manifest_path: str, context: str) -> None:
        """Record the dataset manifest the run trained on, as a dataset input and as an artifact."""

    @abc.abstractmethod
    def register_weights(self, stage: str, weights_path: str, alias: str = DEFAULT_ALIAS) -> int:
        """Register a stage's safetensors file in the model registry; returns the new version."""

    @abc.abstractmethod
    def end(self, status: str = "FINISHED") -> None:
        """Close the run with FINISHED, FAILED or KILLED."""


class NullTracker(Tracker):
    """Does nothing, so library code and non-zero ranks need no `if tracker:` branches."""

    def start(self, run_name: str, *, parent_run_id: str | None = None, tags: dict | None = None,
              resume_run_id: str | None = None) -> str:
        self.run_id = resume_run_id or f"null-{run_name}"
        return self.run_id

    def log_params(self, params: dict) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        return None

    def log_dict(self, data: dict, artifact_file: str) -> None:
        return None

    def log_manifest(self, manifest_path: str, context: str) -> None:
        return None

    def register_weights(self, stage: str, weights_path: str, alias: str = DEFAULT_ALIAS) -> int:
        return 0

    def end(self, status: str = "FINISHED") -> None:
        return None
