"""Stage jobs: each stage of the cascade is one Ray Train job (TorchTrainer), tracked in MLflow.

`run_stage` trains one stage and registers its weights; `train_all` runs stages in the cascade's order
(clip -> prior, decoder -> temporal -> interpolation, sr_low, sr_high) under one parent MLflow run.

Run folder (`run_root`): a local folder, or any fsspec URL every node reaches (s3://, gs://, file://);
Ray Train writes its checkpoints there itself (`RunConfig.storage_path`), the final weights are written
locally, registered, then copied there. An object-store run folder needs a tracking server.
  ray/<stage>/            Ray Train's storage for the run named <stage>: checkpoints (2 kept) and the
                          run snapshot. Ray Train (its V2 API) resumes a run whose RunConfig(name,
                          storage_path) already holds a snapshot from its latest checkpoint, so
                          re-running a stage that stopped part-way (crash, Ctrl-C) continues from there.
  local/<stage>/step_N/   the same checkpoints when the stage trains in the driver's process instead
                          (`in_process`, `mav train --in-process`); resumed the same way
  <stage>/run.json        the stage's MLflow run id, reused when the stage is resumed
  <stage>/<stage>.safetensors  final EMA weights with the resolved config as metadata (registered)
  <stage>/result.json     written after registration: the stage is done; re-runs skip it unless force
  mlflow.db, mlartifacts/ the embedded MLflow store (when no tracking URI is configured)

The driver opens each stage's MLflow run and hands its id to the workers; rank 0 reopens it to log.
Before any stage trains, the driver resolves every stage's grad_accum, grad_checkpointing and sharding
(`training.plan.resolve_stage`: the memory plan where `gpu_memory` is set); the workers get the resolved
configs, MLflow logs them (config/resolved.json, and config/plan.json), and a stage that cannot fit stops
the run there.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from model.checkpoint import is_url, load_weights, save_weights
from model.config import CascadeConfig
from training.config import STAGES, StageTrainConfig, TrainConfig
from training.data import shard_urls
from training.faults import CHAOS_ENV
from training.job import Job
from training.loop import run, train_loop_per_worker
from training.plan import StagePlan, resolve_stage
from training.registry import resolve_weights
from training.routing import second_data
from training.stages import ImageView, requires, stage_spec
from training.storage import (MANIFEST, embeddings_marker_path, filesystem, hash_settings, join, read_manifest,
                              unfinished_embeddings)
from training.tracker import DEFAULT_ALIAS
from training.tracking import MlflowTracker, pipeline_parent_run, resolve_tracking_uri
from training.workers import LocalWorker


@dataclass(frozen=True)
class StageResult:
    stage: str
    weights_path: str
    run_id: str
    version: int
    steps: int


def _configs(cfg: Any) -> tuple[CascadeConfig, TrainConfig]:
    """The two config parts a stage needs, from any object with `.cascade` and `.train` (PipelineConfig)."""
    cascade, train = getattr(cfg, "cascade", None), getattr(cfg, "train", None)
    if not isinstance(cascade, CascadeConfig) or not isinstance(train, TrainConfig):
        raise TypeError("cfg needs .cascade (CascadeConfig) and .train (TrainConfig), e.g. a PipelineConfig")
    return cascade, train


def stage_data(stage: str, cascade: CascadeConfig, images: str | None, videos: str | None,
               video_datasets: tuple[str, ...] | None = None) -> str:
    """The dataset folder a stage reads, checked up front: kind, shards, (if needed) embeddings, and clips
    of the video datasets the stage selects."""
    spec = stage_spec(stage)
    root = images if spec.data == "images" else videos
    if root is None:
        raise ValueError(f"stage {stage} reads {spec.data}: pass the {spec.data} dataset folder (--{spec.data})")
    root = location(root)
    manifest = read_manifest(root, spec.data)
    if video_datasets is not None:
        _check_video_datasets(stage, spec.data, root, manifest, video_datasets)
    view = spec.view(cascade)
    if isinstance(view, ImageView) and view.embeddings:
        missing = unfinished_embeddings(root, [u[len(root) + 1:] for u in shard_urls(root, manifest)])
        if missing:
            raise FileNotFoundError(f"stage {stage} needs CLIP embeddings: {embeddings_marker_path(root, missing[0])} "
                                    f"is missing or from other CLIP weights ({len(missing)} shards); run the embed "
                                    "flow on this dataset first")
    return root


def _check_video_datasets(stage: str, kind: str, root: str, manifest: dict, wanted: tuple[str, ...]) -> None:
    """A selection of video datasets needs a video stage and a folder that holds rows of one of them."""
    if kind != "videos":
        raise ValueError(f"train.{stage}.video_datasets: the {stage} stage reads images, not video clips")
    rows = manifest.get("source_rows")
    if rows is None:
        raise ValueError(f"{root}: the manifest does not record its clips' datasets; rebuild it with the video flow "
                         f"to select {', '.join(wanted)}")
    if not any(rows.get(name, 0) for name in wanted):
        raise ValueError(f"stage {stage} reads {', '.join(wanted)} clips; {root} holds none ({rows})")


def check_pretrained_clip(cascade: CascadeConfig, train: TrainConfig, stages: Iterable[str]) -> None:
    """With train.pretrained_clip, CLIP comes from its file: refuse to start without one, or to train it."""
    if not train.pretrained_clip:
        return
    if cascade.clip.weights_path is None:
        raise ValueError("train.pretrained_clip: set a local open_clip checkpoint, e.g. "
                         f"--set cascade.clip.weights_path=/path/{cascade.clip.model_name}.safetensors")
    if not filesystem(cascade.clip.weights_path).isfile(cascade.clip.weights_path):
        raise FileNotFoundError(f"cascade.clip.weights_path: no file at {cascade.clip.weights_path}")
    if "clip" in stages:
        raise ValueError("stage clip: train.pretrained_clip loads CLIP from cascade.clip.weights_path; "
                         "it is not trained")


Resolved = tuple[CascadeConfig, StageTrainConfig, StagePlan | None]


def resolve(stage: str, cfg: Any) -> Resolved:
    """The stage's configs as its workers train them (`training.plan.resolve_stage`)."""
    cascade, train_cfg = _configs(cfg)
    return resolve_stage(stage, cascade, train_cfg.stage(stage))


def resolve_all(stages: Iterable[str], cfg: Any) -> dict[str, Resolved]:
    """Every stage resolved up front: a late stage that cannot fit fails before the first one trains."""
    return {stage: resolve(stage, cfg) for stage in stages}


def location(path: str | Path) -> str:
    """A folder as a string: an absolute local path, or the URL (s3://, file://, ...) as given."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def _read_json(url: str) -> dict | None:
    fs = filesystem(url)
    if not fs.isfile(url):
        return None
    with fs.open(url, "r") as fh:
        return json.load(fh)


def _write_json(url: str, obj: Any) -> None:
    fs = filesystem(url)
    fs.makedirs(url.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(url, "w") as fh:
        json.dump(obj, fh)


def _remove(url: str) -> None:
    fs = filesystem(url)
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _finished(folder: str) -> StageResult | None:
    done = _read_json(join(folder, "result.json"))
    if done is None:
        return None
    result = StageResult(**done)
    return result if filesystem(result.weights_path).isfile(result.weights_path) else None


@contextlib.contextmanager
def _staged(folder: str) -> Iterator[Path]:
    """A local folder to write the stage's files into: `folder` itself when it is local, else a
    temporary one whose files are copied to `folder` afterwards."""
    if not is_url(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="mav-stage-") as tmp:
        yield Path(tmp)
        fs = filesystem(folder)
        fs.makedirs(folder, exist_ok=True)
        for file in sorted(Path(tmp).iterdir()):
            fs.put_file(str(file), join(folder, file.name))


def _settings_hash(stage: str, cfg: Any, data: str, extra: str | None = None) -> str:
    """What a resumed attempt must share with the stopped one: the stage's network and training config."""
    cascade, train_cfg = _configs(cfg)
    settings = {"cascade": cascade.model_dump(mode="json"), "train": train_cfg.stage(stage).model_dump(mode="json"),
                "data": data if extra is None else [data, extra]}
    return hash_settings(settings)


def _stage_run(folder: str, tracker: MlflowTracker, stage: str, parent_run_id: str | None, settings: str) -> str:
    """The stage's MLflow run: the one a stopped attempt left in run.json, else a new child run.
    A stopped attempt with other settings is not resumed into (its checkpoints and logged params
    belong to those settings): that is an error asking for --force."""
    record = join(folder, "run.json")
    stopped = _read_json(record)
    if stopped is not None:
        if stopped.get("settings") not in (None, settings):
            raise ValueError(f"stage {stage!r} was started with other settings (config or data) in {folder}; "
                             "rerun with force (mav train --force) to start it over, or use another run folder")
        return tracker.start(stage, resume_run_id=stopped["run_id"])
    run_id = tracker.start(stage, parent_run_id=parent_run_id, tags={"stage": stage})
    _write_json(record, {"run_id": run_id, "settings": settings})
    return run_id


def worker_cpus(train: StageTrainConfig, node_cpus: Iterable[float]) -> int:
    """CPU cores per Ray Train worker: `cpus_per_worker`, else the smallest node's share. Ray gives a worker
    one core by default and sets OMP_NUM_THREADS to it, so on a CPU machine the network would train on
    one thread whatever the machine has; reserving the cores also keeps two stages' workers apart."""
    if train.cpus_per_worker is not None:
        return train.cpus_per_worker
    per_node = [int(c) for c in node_cpus if c >= 1]
    return max(1, min(per_node, default=1) // train.num_workers)


def fit_stage(stage: str, config: dict[str, Any], train: StageTrainConfig, storage: str):
    """One TorchTrainer run; resumes from `storage/<stage>` when an earlier attempt left checkpoints."""
    import ray  # Ray Train takes seconds to import: only when a stage trains on Ray (not in-process)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()  # a local cluster, or the one RAY_ADDRESS names
    cpus = worker_cpus(train, [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")])
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={**config, "threads": cpus},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=stage, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    return trainer.fit()


@contextlib.contextmanager
def _trained(stage: str, config: dict[str, Any], train: StageTrainConfig, root: str,
             in_process: bool) -> Iterator[Path]:
    """Train the stage (a Ray Train job, or this process with the same loop); yields the folder of its
    last checkpoint."""
    if in_process:
        folder = join(root, "local", stage)
        run_local(config, folder, "cuda" if train.use_gpu else "cpu")
        with LocalWorker(folder).checkpoint() as path:
            if path is None:
                raise RuntimeError(f"stage {stage}: the run ended without a checkpoint")
            yield Path(path)
        return
    result = fit_stage(stage, config, train, join(root, "ray"))
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage}: the Ray Train run ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        yield Path(ckpt)


def _final_weights(ckpt: Path, folder: Path, stage: str, steps: int) -> Path:
    """The last checkpoint's EMA weights, saved as the stage's file with the resolved config."""
    state = json.loads((ckpt / "state.json").read_text())
    weights, _ = load_weights(ckpt / "weights.safetensors")
    if state["step"] != steps:
        raise RuntimeError(f"stage {stage}: last checkpoint is at step {state['step']}, not {steps}")
    meta = {"config": state["config"], "stage": stage, "steps": steps}
    return save_weights(weights, folder / f"{stage}.safetensors", meta)


def job_config(stage: str, cfg: Any, data: str, run_root: str, *, tracking_uri: str | None = None,
               experiment: str = "make-a-video", run_id: str | None = None, split: str | None = None,
               resolved: Resolved | None = None, extra_data: str | None = None) -> dict:
    """The JSON-able job every worker rebuilds with `Job.from_config` (training/job.py), with the stage's
    configs resolved (`resolve`; pass `resolved` to reuse them). Upstream weights come from the registry
    ("mlflow" = models:/mav-<stage>@current); MAV_FAIL_AT_STEP is forwarded (chaos knob)."""
    cascade, train, _ = resolved or resolve(stage, cfg)
    return {"stage": stage, "cascade": cascade.model_dump(mode="json"),
            "train": train.model_dump(mode="json"), "data": data, "extra_data": extra_data, "run_root": run_root,
            "tracking_uri": tracking_uri, "experiment": experiment, "run_id": run_id,
            "sources": {dep: "mlflow" for dep in requires(stage, cascade)}, "split": split,
            "fail_at_step": os.environ.get(CHAOS_ENV)}


def run_stage(stage: str, cfg: Any, images: str | None = None, videos: str | None = None,
              run_root: str = "runs", *, tracking_uri: str | None = None, experiment: str | None = None,
              parent_run_id: str | None = None, force: bool = False, split: str | None = None,
              in_process: bool = False, resolved: Resolved | None = None,
              alias: str | None = DEFAULT_ALIAS) -> StageResult:
    """Train one stage on Ray Train, register its weights as `mav-<stage>@challenger` and `@<alias>` (None:
    see `MlflowTracker.register_weights`), and return where they are. A finished stage (result.json +
    weights) is skipped unless `force`, which also drops its checkpoints so training starts over. `in_process`: train in this process with the same loop instead
    (no Ray; one process whatever num_workers says, which keeps the global batch and the loss curve;
    checkpoints in <run_root>/local/<stage>): for debugging a stage, and where Ray's start-up is the cost."""
    cascade, train_cfg = _configs(cfg)
    check_pretrained_clip(cascade, train_cfg, [stage])
    root = location(run_root)
    if in_process and is_url(root):
        raise ValueError(f"training in this process keeps its checkpoints in a local folder; {root} is a URL")
    tracking_uri = resolve_tracking_uri(tracking_uri, train_cfg.tracking_uri, root)
    folder = join(root, stage)
    if force:
        _remove(folder)
        _remove(join(root, "ray", stage))
        _remove(join(root, "local", stage))
    done = _finished(folder)
    if done is not None:
        print(f"[{stage}] already trained: {done.weights_path} (version {done.version}); skipped")
        return done
    resolved = resolved or resolve(stage, cfg)  # a stage that cannot fit its GPUs fails before any worker starts
    train = resolved[1]
    data = stage_data(stage, cascade, images, videos, train.video_datasets)
    extra = second_data(stage, cascade, train, {k: v and location(v) for k, v in (("images", images),
                                                                                 ("videos", videos))})
    _check_sources({dep: "mlflow" for dep in requires(stage, cascade)}, tracking_uri)
    tracker = MlflowTracker(tracking_uri, experiment or train_cfg.experiment)
    run_id = _stage_run(folder, tracker, stage, parent_run_id, _settings_hash(stage, cfg, data, extra))
    config = job_config(stage, cfg, data, root, tracking_uri=tracking_uri, experiment=tracker.experiment,
                        run_id=run_id, split=split, resolved=resolved, extra_data=extra)
    try:
        with _trained(stage, config, train, root, in_process) as ckpt, _staged(folder) as local:
            weights = _final_weights(ckpt, local, stage, train.steps)
            for folder_read in filter(None, (data, extra)):
                log_dataset(tracker, folder_read)
            tracker.log_dict({k: v for k, v in config.items() if k != "fail_at_step"}, "config/resolved.json")
            if resolved[2] is not None:
                tracker.log_dict(resolved[2].as_dict(), "config/plan.json")
            version = tracker.register_weights(stage, str(weights), alias=alias)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    out = StageResult(stage, join(folder, weights.name), run_id, version, train.steps)
    _write_json(join(folder, "result.json"), asdict(out))
    return out


def run_local(config: dict[str, Any], folder: str | Path, device: str = "cpu") -> dict[str, float]:
    """Run a job (see `job_config`) in this process with the same loop the Ray workers run."""
    return run(Job.from_config(config), LocalWorker(folder, device))


def _check_sources(sources: dict[str, str], tracking_uri: str) -> None:
    """Fail before starting Ray when an upstream stage is not registered yet."""
    for dep, source in sources.items():
        resolve_weights(dep, source, tracking_uri)


def log_dataset(tracker: MlflowTracker, data: str) -> None:
    """The manifest the stage trained on: an MLflow dataset input for a local folder; for an object-store
    folder (the tracker reads local files only) the manifest itself as an artifact."""
    if not is_url(data):
        tracker.log_manifest(str(Path(data) / MANIFEST), context="training")
        return
    tracker.log_dict(read_manifest(data), f"datasets/training/{MANIFEST}")


def stages_for(names: Iterable[str], cascade: CascadeConfig) -> list[str]:
    """Stage names (or "all") in the cascade's training order. "all" trains CLIP only when no pretrained
    CLIP file is configured (the toy world); real runs load CLIP from `clip.weights_path`."""
    names = list(names)
    if "all" in names:
        names = [s for s in STAGES if s != "clip" or cascade.clip.weights_path is None]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages are {', '.join(STAGES)} or all")
    return [s for s in STAGES if s in names]


def train_all(stages: Iterable[str], cfg: Any, images: str | None = None, videos: str | None = None,
              run_root: str = "runs", *, tracking_uri: str | None = None, experiment: str | None = None,
              parent_run_id: str | None = None, force: bool = False, in_process: bool = False,
              after_stage: Callable[[str, StageResult], None] | None = None,
              resolved: dict[str, Resolved] | None = None, alias: str | None = DEFAULT_ALIAS
              ) -> dict[str, StageResult]:
    """Run the stages in order, each a child of one parent MLflow run (a new one unless given); `alias`:
    see `run_stage`.

    `after_stage(stage, result)` runs once a stage is done (or skipped as done): the pipeline layer
    computes the CLIP embeddings of the image shards there, after `clip` and before the stages that
    read them. `resolved`: the stages' configs from `resolve_all`, else resolved here before any stage trains."""
    cascade, train_cfg = _configs(cfg)
    order = stages_for(stages, cascade)
    check_pretrained_clip(cascade, train_cfg, order)
    resolved = resolved if resolved is not None else resolve_all(order, cfg)
    uri = resolve_tracking_uri(tracking_uri, train_cfg.tracking_uri, location(run_root))
    kw = {"images": images, "videos": videos, "run_root": run_root, "tracking_uri": uri,
          "experiment": experiment, "force": force, "in_process": in_process, "alias": alias}

    def run_all(parent: str) -> dict[str, StageResult]:
        results = {}
        for stage in order:
            results[stage] = run_stage(stage, cfg, parent_run_id=parent, resolved=resolved.get(stage), **kw)
            if after_stage is not None:
                after_stage(stage, results[stage])
        return results

    if parent_run_id is not None:
        return run_all(parent_run_id)
    factory = lambda: MlflowTracker(uri, experiment or train_cfg.experiment)  # noqa: E731
    with pipeline_parent_run(factory, "train", tags={"stages": ",".join(order)}) as parent:
        return run_all(parent.run_id)
