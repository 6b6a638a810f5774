"""MLflow tracking: where runs go, how stages' weights are named, and `MlflowTracker`, the real backend
behind the `Tracker` interface (training/tracker.py).

Layout of a training pipeline in MLflow (see `pipeline_parent_run`): one experiment (`TrainConfig.experiment`)
holds one parent run per pipeline run and one child run per stage (tag `mlflow.parentRunId`). The driver
opens the parent run and hands its id to each stage job; rank 0 of the job opens the child run, and a
FailureConfig restart reopens that same child with `start(..., resume_run_id=...)`.

The embedded default store is a sqlite file in the run folder (`default_tracking_uri`), and its artifacts
go to `<run folder>/mlartifacts`, never to `./mlruns` of whatever directory the process runs in.
Trackers use `MlflowClient` with an explicit run id, never the fluent `mlflow.*` globals, so several
trackers (and Ray workers) never fight over a process-wide "active run".
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

from training.config import STAGES
from training.storage import hash_settings, sha256_file
from training.tracker import DEFAULT_ALIAS, Tracker

CHALLENGER_ALIAS = "challenger"  # every registration's alias; `current` moves on evidence (training.registry)

log = logging.getLogger(__name__)

ParamValue = str | int | float | bool
MAX_PARAMS_PER_BATCH = 100      # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000    # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAM_KEY_LENGTH = 250      # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VALUE_LENGTH = 6000   # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_DATASET_DIGEST_LENGTH = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
PARENT_RUN_TAG = "mlflow.parentRunId"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, ParamValue]:
    """Nested config -> dotted keys (`{"train.decoder.lr": 1e-4}`), the shape MLflow params take.
    Lists and tuples become JSON strings (one param, not one per element); pydantic models are dumped;
    None and other objects become their `str`."""
    out: dict[str, ParamValue] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping):
            out.update(flatten(value, name) if value else {name: "{}"})
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def default_tracking_uri(run_root: str) -> str:
    """The embedded store: a sqlite file in the run folder (nothing to start, no server). A run folder in
    object storage (s3://...) cannot hold one: name a tracking server instead."""
    if run_root.startswith("file://"):
        run_root = urlparse(run_root).path
    elif "://" in run_root:
        raise ValueError(f"the run folder {run_root} is not on a local disk, where MLflow's embedded sqlite "
                         "store would go: name a tracking server (--set train.tracking_uri=URL or "
                         "MLFLOW_TRACKING_URI)")
    return f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None, configured: str | None, run_root: str) -> str:
    """Where runs go, first set wins: the caller's argument, `train.tracking_uri`, the standard
    `MLFLOW_TRACKING_URI` variable (a tracking server on a cluster), then the sqlite file in the run folder."""
    return explicit or configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_root)


def default_artifact_root(tracking_uri: str) -> str | None:
    """`<folder of the sqlite file>/mlartifacts` for a sqlite store; None (the server decides) otherwise."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path == "/:memory:":
        return None
    db_file = Path(tracking_uri[len("sqlite:///"):])
    return (db_file.resolve().parent / "mlartifacts").as_uri()


def registered_name(stage: str) -> str:
    """Registry name of a stage's weights, e.g. `mav-decoder`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return f"mav-{stage}"


def config_hash(config: Any) -> str:
    """Stable short hash of a resolved config, to tell versions trained from different configs apart."""
    return hash_settings(config)[:16]


def _param_value(value: ParamValue) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        # The full value is in the resolved-config artifact; the param only has to stay loggable.
        marker = f"...[{len(text)} chars]"
        text = text[:MAX_PARAM_VALUE_LENGTH - len(marker)] + marker
    return text


def mlflow_client(tracking_uri: str | None):
    """An `MlflowClient` whose tracking and registry stores are both `tracking_uri` (MLflow's own default
    registry is the process-wide one, which would silently read another store)."""
    from mlflow import MlflowClient  # MLflow only when a store is used, not at import time

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_mlflow_error(err: Exception, code: str) -> bool:
    """Whether `err` is an MLflow error with this code (RESOURCE_DOES_NOT_EXIST, RESOURCE_ALREADY_EXISTS, ...)."""
    return getattr(err, "error_code", None) == code


class MlflowTracker(Tracker):
    """A tracker writing to one MLflow experiment through `MlflowClient`.

    Picklable (the client is rebuilt lazily), so the driver can hand a configured tracker to Ray workers.
    MLflow is imported in the methods: it takes seconds to import, and every worker imports this module.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root or default_artifact_root(tracking_uri)
        self.run_id: str | None = None
        self._client_obj = None
        self._last_step: dict[str, int] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client_obj": None}

    @property
    def client(self):
        if self._client_obj is None:
            self._client_obj = mlflow_client(self.tracking_uri)
        return self._client_obj

    def experiment_id(self) -> str:
        """The experiment's id, creating it with its artifacts under `artifact_root` the first time."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        except Exception as err:  # another process created it between the lookup and here
            if not is_mlflow_error(err, "RESOURCE_ALREADY_EXISTS"):
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def _run_id(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run: call start() first")
        return self.run_id

    def start(self, run_name: str, *, parent_run_id: str | None = None, tags: dict | None = None,
              resume_run_id: str | None = None) -> str:
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if resume_run_id:
            self.run_id = self._reopen(resume_run_id)
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            return self.run_id
        if parent_run_id:
            tags[PARENT_RUN_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id(), tags=tags, run_name=run_name)
        self.run_id = run.info.run_id
        self._last_step = {}
        return self.run_id

    def _reopen(self, run_id: str) -> str:
        """Mark an existing run RUNNING again and learn the last step of each metric, so a restart that
        replays steps from its last checkpoint does not log them twice."""
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            if is_mlflow_error(err, "RESOURCE_DOES_NOT_EXIST"):
                raise LookupError(f"cannot resume MLflow run {run_id!r}: not found in {self.tracking_uri}") from None
            raise
        self.client.update_run(run_id, status="RUNNING")
        self._last_step = {key: max(m.step for m in self.client.get_metric_history(run_id, key))
                           for key in run.data.metrics}
        return run_id

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        too_long = [k for k in flat if len(k) > MAX_PARAM_KEY_LENGTH]
        if too_long:
            raise ValueError(f"param names longer than {MAX_PARAM_KEY_LENGTH} chars: {too_long[:3]}")
        items = [Param(k, _param_value(v)) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self._run_id(), params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Each key's steps only move forward: a value at or below the last step logged for that key
        (by this tracker or, after `resume_run_id`, by the run before the restart) is dropped, first
        write wins. This keeps a resumed run's curves free of duplicate steps whatever the loop does."""
        from mlflow.entities import Metric

        step = int(step)
        now = int(time.time() * 1000)
        fresh = {k: float(v) for k, v in metrics.items() if step > self._last_step.get(k, -1)}
        if len(fresh) < len(metrics):
            log.debug("dropped metrics already logged at or after step %d: %s", step,
                      sorted(set(metrics) - set(fresh)))
        items = [Metric(k, v, now, step) for k, v in fresh.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._run_id(), metrics=items[i:i + MAX_METRICS_PER_BATCH])
        self._last_step.update({k: step for k in fresh})

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"artifact not found: {path}")
        if path.is_dir():
            self.client.log_artifacts(self._run_id(), str(path), artifact_path)
        else:
            self.client.log_artifact(self._run_id(), str(path), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self._run_id(), data, artifact_file)

    def log_manifest(self, manifest_path: str, context: str) -> None:
        """The manifest becomes an MLflow dataset input (name: the dataset folder, digest: its
        `inputs_hash`, source: the folder, profile: rows/counts/shards) and the manifest file an artifact
        under `datasets/<context>/`, so a run always says which dataset version it trained on."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        path = Path(manifest_path)
        if not path.is_file():
            raise FileNotFoundError(f"dataset manifest not found: {path}")
        manifest = json.loads(path.read_text())
        dataset = manifest_dataset(manifest, str(path.resolve().parent))
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        for key in ("inputs_hash", "settings_hash", "kind"):
            if manifest.get(key):
                tags.append(InputTag(f"mav.{key}", str(manifest[key])))
        self.client.log_inputs(self._run_id(), datasets=[DatasetInput(dataset, tags)])
        self.log_artifact(str(path), f"datasets/{context}")

    def register_weights(self, stage: str, weights_path: str, alias: str | None = DEFAULT_ALIAS) -> int:
        """Log the file under `weights/<sha256[:12]>/` (so every version keeps its own immutable file,
        even when one run registers twice), register it as a new version of `registered_name(stage)`
        whose source is that artifact, and point `challenger` and `alias` at it. `alias` None: challenger
        only, and `current` too when the stage has none yet (nothing to compare with; promotion on evidence
        is `training.registry.promote_on_evidence`). No model flavor or MLmodel file is needed: a version
        is a name, a source URI and tags."""
        from model.checkpoint import CONFIG_KEY, read_metadata  # torch: kept out of `mav --help`'s imports

        name = registered_name(stage)
        path = Path(weights_path)
        if path.suffix != ".safetensors" or not path.is_file():
            raise FileNotFoundError(f"stage {stage!r}: no safetensors file at {path}")
        run_id = self._run_id()
        sha = sha256_file(path)
        artifact_dir = f"weights/{sha[:12]}"
        self.client.log_artifact(run_id, str(path), artifact_dir)
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_dir}/{path.name}"
        self._ensure_registered_model(name, stage)
        tags = {"stage": stage, "run_id": run_id, "sha256": sha,
                "config_hash": config_hash(read_metadata(path).get(CONFIG_KEY))}
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        self.client.set_registered_model_alias(name, CHALLENGER_ALIAS, version.version)
        if alias is None and not self._has_alias(name, DEFAULT_ALIAS):
            alias = DEFAULT_ALIAS
        if alias is not None:
            self.client.set_registered_model_alias(name, alias, version.version)
        self.client.set_tag(run_id, f"mav.registered.{stage}", f"{name}/{version.version}")
        return int(version.version)

    def _has_alias(self, name: str, alias: str) -> bool:
        return alias in (self.client.get_registered_model(name).aliases or {})

    def _ensure_registered_model(self, name: str, stage: str) -> None:
        try:
            self.client.create_registered_model(name, tags={"stage": stage},
                                                description=f"Make-A-Video {stage} weights (safetensors)")
        except Exception as err:
            if not is_mlflow_error(err, "RESOURCE_ALREADY_EXISTS"):
                raise

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def manifest_dataset(manifest: dict, root: str):
    """An `mlflow.entities.Dataset` describing a dataset version from its manifest (no data is read)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    digest = str(manifest.get("inputs_hash") or config_hash(manifest))[:MAX_DATASET_DIGEST_LENGTH]
    with warnings.catch_warnings():  # a local path matches two equivalent local source classes; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(root)
    meta = MetaDataset(source, name=Path(root).name or manifest.get("kind"), digest=digest)
    profile = {"kind": manifest.get("kind"), "rows": manifest.get("rows"), "counts": manifest.get("counts"),
               "shards": len(manifest.get("shards", [])),
               "samples": sum(s.get("samples", 0) for s in manifest.get("shards", []))}
    d = meta.to_dict()
    return Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                   profile=json.dumps(profile))


@contextlib.contextmanager
def tracked_run(tracker: Tracker, run_name: str, **start_kwargs: Any) -> Iterator[Tracker]:
    """Start a run and always end it: FINISHED on success, KILLED on Ctrl-C, FAILED on any other error."""
    tracker.start(run_name, **start_kwargs)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


@contextlib.contextmanager
def pipeline_parent_run(tracker_factory: Callable[[], Tracker], run_name: str, *, tags: dict | None = None,
                        resume_run_id: str | None = None) -> Iterator[Tracker]:
    """The parent run of one pipeline run; each stage logs into its own child run.

        with pipeline_parent_run(lambda: MlflowTracker(uri, cfg.experiment), "demo-2024") as parent:
            for stage in stages:            # each a Ray Train job; rank 0 inside it does:
                child = tracker_factory()   #   child.start(stage, parent_run_id=parent.run_id)
                ...                         #   and on a FailureConfig restart resume_run_id=<child id>

    Yields the parent's tracker (its `run_id` is what stage jobs need). The parent ends FINISHED, or
    FAILED / KILLED when the block raises, so a crashed pipeline never looks finished in the UI.
    """
    with tracked_run(tracker_factory(), run_name, tags=tags, resume_run_id=resume_run_id) as parent:
        yield parent
