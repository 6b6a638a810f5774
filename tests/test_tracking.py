"""MLflow tracking and the weights registry against a real sqlite store (no mocks, no server).

Creating an MLflow sqlite store runs its schema migrations (seconds), so the module shares one store and
each test works in its own experiment.
"""
from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import save_weights
from training.config import train_preset
from training.registry import load_stage_weights, resolve_weights, stage_versions
from training.tracker import NullTracker
from training.tracking import (MAX_PARAM_VALUE_LENGTH, PARENT_RUN_TAG, MlflowTracker, default_artifact_root,
                               default_tracking_uri, flatten, mlflow_client, pipeline_parent_run,
                               registered_name)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("run")
    return root, default_tracking_uri(str(root))


@pytest.fixture
def tracker(store) -> MlflowTracker:
    return MlflowTracker(store[1], f"exp-{uuid.uuid4().hex[:8]}")


def _manifest(folder: Path) -> Path:
    folder.mkdir(parents=True)
    manifest = {"kind": "images", "format": 1, "inputs": ["laion.parquet"], "inputs_hash": "a1" * 32,
                "settings": {"min_size": 8}, "settings_hash": "b2" * 32, "rows": 5,
                "counts": {"written": 3, "filtered:nsfw": 2},
                "shards": [{"name": "00000.tar", "samples": 3, "sha256": "c3" * 32}]}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_flatten_nests_with_dots_and_keeps_lists_whole():
    flat = flatten({"train": train_preset("tiny"), "data": {"sizes": [64, 256], "res": (16, 64),
                                                             "root": None, "empty": {}}})
    assert flat["train.decoder.lr"] == pytest.approx(1e-3)
    assert flat["train.experiment"] == "make-a-video"
    assert flat["train.prior.use_gpu"] is False
    assert json.loads(flat["data.sizes"]) == [64, 256] and json.loads(flat["data.res"]) == [16, 64]
    assert flat["data.root"] == "None" and flat["data.empty"] == "{}"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_default_uri_and_artifact_root_live_in_the_run_folder(tmp_path):
    uri = default_tracking_uri(str(tmp_path / "runs"))
    assert uri == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    assert default_artifact_root(uri) == (tmp_path / "runs" / "mlartifacts").resolve().as_uri()
    assert default_artifact_root("http://127.0.0.1:5000") is None
    assert registered_name("decoder") == "mav-decoder"
    with pytest.raises(ValueError, match="unknown stage 'decoderr'"):
        registered_name("decoderr")


def test_parent_run_with_child_runs(store, tracker):
    factory = lambda: MlflowTracker(store[1], tracker.experiment)  # noqa: E731
    with pipeline_parent_run(factory, "pipeline", tags={"preset": "tiny"}) as parent:
        children = []
        for stage in ("prior", "decoder"):
            child = factory()
            children.append(child.start(stage, parent_run_id=parent.run_id))
            child.end()
    client = mlflow_client(store[1])
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["preset"] == "tiny"
    for run_id, stage in zip(children, ("prior", "decoder")):
        run = client.get_run(run_id)
        assert run.data.tags[PARENT_RUN_TAG] == parent.run_id and run.info.run_name == stage
        assert run.info.experiment_id == parent_run.info.experiment_id
    with pytest.raises(RuntimeError, match="boom"):
        with pipeline_parent_run(factory, "crashed") as crashed:
            raise RuntimeError("boom")
    assert client.get_run(crashed.run_id).info.status == "FAILED"


def test_params_metrics_and_artifacts_read_back(store, tracker, tmp_path):
    run_id = tracker.start("decoder")
    params = {"train": {f"p{i:03d}": i for i in range(250)}, "note": "x" * (MAX_PARAM_VALUE_LENGTH + 500)}
    tracker.log_params(params)
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": torch.tensor(0.1)}, step)
    (tmp_path / "grid.png").write_bytes(b"png")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "a.gif").write_bytes(b"gif")
    tracker.log_artifact(str(tmp_path / "grid.png"), "samples/step_2")
    tracker.log_artifact(str(tmp_path / "samples"), "videos")
    config = {"decoder": {"channels": [32, 64], "lr": 1e-4}}
    tracker.log_dict(config, "config.yaml")
    tracker.end()

    client = mlflow_client(store[1])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(run.data.params) == 251 and run.data.params["train.p249"] == "249"
    assert len(run.data.params["note"]) == MAX_PARAM_VALUE_LENGTH
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5),
                                                                                   (2, pytest.approx(1 / 3))]
    assert run.data.metrics["lr"] == pytest.approx(0.1)
    assert [f.path for f in client.list_artifacts(run_id, "samples/step_2")] == ["samples/step_2/grid.png"]
    assert [f.path for f in client.list_artifacts(run_id, "videos")] == ["videos/a.gif"]
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == config
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(store[0] / "mlartifacts")


def test_manifest_is_a_dataset_input_and_an_artifact(store, tracker, tmp_path):
    manifest_path = _manifest(tmp_path / "images-v1")
    run_id = tracker.start("decoder")
    tracker.log_manifest(str(manifest_path), "train")
    client = mlflow_client(store[1])
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert dataset.name == "images-v1" and dataset.digest == ("a1" * 32)[:36]
    assert json.loads(dataset.source)["uri"] == str(manifest_path.parent.resolve())
    assert json.loads(dataset.profile)["samples"] == 3
    assert tags["mlflow.data.context"] == "train" and tags["mav.inputs_hash"] == "a1" * 32
    assert [f.path for f in client.list_artifacts(run_id, "datasets/train")] == ["datasets/train/manifest.json"]
    with pytest.raises(FileNotFoundError, match="dataset manifest not found"):
        tracker.log_manifest(str(tmp_path / "nope" / "manifest.json"), "train")
    tracker.end()


def _weights(path: Path, value: float) -> dict[str, torch.Tensor]:
    sd = {"conv.weight": torch.full((2, 3), value), "conv.bias": torch.arange(3.0) + value}
    save_weights(sd, path, metadata={"config": {"stage": "decoder", "channels": 8, "seed": value}})
    return sd


def test_register_twice_moves_the_alias_and_resolves_by_name(store, tracker, tmp_path):
    first = _weights(tmp_path / "a" / "decoder.safetensors", 1.0)
    second = _weights(tmp_path / "b" / "decoder.safetensors", 2.0)
    run_id = tracker.start("decoder")
    assert tracker.register_weights("decoder", str(tmp_path / "a" / "decoder.safetensors")) == 1
    assert tracker.register_weights("decoder", str(tmp_path / "b" / "decoder.safetensors")) == 2
    tracker.end()

    client = mlflow_client(store[1])
    current = client.get_model_version_by_alias("mav-decoder", "current")
    assert int(current.version) == 2 and current.run_id == run_id
    assert current.tags["stage"] == "decoder" and current.tags["run_id"] == run_id
    assert current.tags["config_hash"] != client.get_model_version("mav-decoder", "1").tags["config_hash"]

    path = resolve_weights("decoder", "models:/mav-decoder@current", store[1], cache_dir=tmp_path / "cache")
    assert Path(path).is_relative_to(store[0] / "mlartifacts")
    state, meta = load_stage_weights("decoder", "mlflow", store[1], cache_dir=tmp_path / "cache")
    assert all(torch.equal(state[k], second[k]) for k in second) and meta["config"]["seed"] == 2.0
    old, _ = load_stage_weights("decoder", "models:/mav-decoder/1", store[1], cache_dir=tmp_path / "cache")
    assert all(torch.equal(old[k], first[k]) for k in first)

    versions = stage_versions(store[1])
    assert versions["decoder"]["version"] == 2 and versions["decoder"]["run_id"] == run_id
    assert versions["decoder"]["alias"] == "current" and "prior" not in versions


def test_local_file_and_checkpoint_folder_sources(tmp_path):
    sd = _weights(tmp_path / "ckpt" / "decoder.safetensors", 3.0)
    torch.save({"step": torch.tensor(4)}, tmp_path / "ckpt" / "optimizer.pt")
    _weights(tmp_path / "ckpt" / "ema.safetensors", 0.0)
    assert resolve_weights("decoder", str(tmp_path / "ckpt")) == str(tmp_path / "ckpt" / "decoder.safetensors")
    state, _ = load_stage_weights("decoder", str(tmp_path / "ckpt" / "decoder.safetensors"))
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    _weights(tmp_path / "single" / "model.safetensors", 5.0)
    assert resolve_weights("prior", str(tmp_path / "single")).endswith("single/model.safetensors")
    with pytest.raises(FileNotFoundError, match="stage 'prior'.*several"):
        resolve_weights("prior", str(tmp_path / "ckpt"))


def test_missing_stage_is_a_clear_error(store, tmp_path):
    with pytest.raises(LookupError, match=r"stage 'sr_high'.*models:/mav-sr_high@current.*mlflow\.db"):
        resolve_weights("sr_high", "mlflow", store[1])
    with pytest.raises(FileNotFoundError, match=f"stage 'temporal'.*{tmp_path / 'none'}"):
        resolve_weights("temporal", str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="stage 'temporal': no .safetensors file"):
        resolve_weights("temporal", str(tmp_path / "empty"))


def test_resume_logs_into_the_same_run_without_duplicate_steps(store, tracker, tmp_path):
    manifest_path = _manifest(tmp_path / "clips-v1")
    run_id = tracker.start("temporal", tags={"attempt": "0"})
    tracker.log_params({"lr": 1e-4})
    tracker.log_manifest(str(manifest_path), "train")
    for step in range(4):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.end("FAILED")

    restarted = pickle.loads(pickle.dumps(tracker))  # as a Ray worker receives it
    assert restarted.start("temporal", resume_run_id=run_id, tags={"attempt": "1"}) == run_id
    client = mlflow_client(store[1])
    assert client.get_run(run_id).info.status == "RUNNING"
    restarted.log_params({"lr": 1e-4})  # a restart logs its config again: same values are accepted
    restarted.log_manifest(str(manifest_path), "train")
    for step in range(2, 6):  # replayed from the step-2 checkpoint
        restarted.log_metrics({"loss": 10.0 + step}, step)
    restarted.end()

    run = client.get_run(run_id)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert history == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "1"
    assert len(run.inputs.dataset_inputs) == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1
    with pytest.raises(LookupError, match="cannot resume MLflow run 'f00'"):
        MlflowTracker(store[1], tracker.experiment).start("temporal", resume_run_id="f00")


def test_null_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    null = NullTracker()
    with pipeline_parent_run(NullTracker, "pipeline") as parent:
        assert isinstance(parent.run_id, str)
        assert null.start("decoder", parent_run_id=parent.run_id) == null.run_id
        null.log_params({"a": {"b": 1}})
        null.log_metrics({"loss": 1.0}, 0)
        null.log_artifact(str(tmp_path / "missing.png"))
        null.log_dict({"a": 1}, "config.yaml")
        null.log_manifest(str(tmp_path / "missing.json"), "train")
        assert null.register_weights("decoder", str(tmp_path / "missing.safetensors")) == 0
        null.end()
    assert list(tmp_path.iterdir()) == []


def test_nothing_lands_in_the_working_directory(store, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _weights(tmp_path / "w" / "sr_low.safetensors", 1.0)
    tracker = MlflowTracker(store[1], f"exp-cwd-{uuid.uuid4().hex[:8]}")
    with pipeline_parent_run(lambda: tracker, "pipeline"):
        tracker.log_dict({"a": 1}, "config.json")
        tracker.log_artifact(str(tmp_path / "w" / "sr_low.safetensors"), "checkpoints")
        tracker.register_weights("sr_low", str(tmp_path / "w" / "sr_low.safetensors"))
        resolve_weights("sr_low", "mlflow", store[1])
    assert not (cwd / "mlruns").exists()
    assert list(cwd.iterdir()) == []
