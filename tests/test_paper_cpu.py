"""The paper-cpu preset end to end: the paper's cascade (its stages, samplers, per-stage data, frame arithmetic
and resolution ratios, the memory plan in use, CLIP from a local file) at CPU sizes, run for real: the tiny
world served on 127.0.0.1 -> the image and video data flows -> every stage on Ray Train, tracked in MLflow ->
a watermarked video of 76 frames at the sr_high size."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from model.cascade_uses import text_to_video
from model.checkpoint import save_weights
from model.clip import build_clip
from pipelines.config import load_config
from pipelines.flows.images import build_image_dataset
from pipelines.flows.train import train_cascade
from pipelines.flows.videos import build_video_dataset
from pipelines.defaults import DEFAULT_FPS
from pipelines.generate import generate, load_cascade
from training.config import PLANNED_STAGES
from training.jobs import resolve_all
from training.storage import read_manifest
from training.tracking import default_tracking_uri, mlflow_client

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def paper_cpu(served_world, ray_session, tmp_path_factory):
    world, _ = served_world
    root = tmp_path_factory.mktemp("paper-cpu")
    # A pretrained CLIP stands in for ViT-L-14: random weights of the preset's tiny architecture, in a file.
    clip, _, _ = build_clip(load_config("paper-cpu").cascade.clip)
    weights = save_weights(clip, root / "clip.safetensors", {})
    cfg = load_config("paper-cpu", overrides=[f"cascade.clip.weights_path={weights}"])
    images, videos = str(root / "images"), str(root / "videos")
    build_image_dataset([str(world / "laion.parquet")], images, cfg.data.images, cfg.data.network)
    build_video_dataset([("webvid", str(world / "webvid.csv")), ("hdvila", str(world / "hdvila.jsonl"))], videos,
                        cfg.data.videos, cfg.data.network)
    run_root = root / "run"
    results = train_cascade(["all"], cfg, images, videos, str(run_root))
    uri = default_tracking_uri(str(run_root))
    cascade = load_cascade(cfg, tracking_uri=uri)  # the registered weights of every stage, CLIP from its file
    video = text_to_video(cascade, [PROMPT], DEFAULT_FPS, seed=0, progress=False)["sr_high"]
    (record,) = generate(cfg, [PROMPT], root / "out", cascade=cascade, seed=0, progress=False)
    return SimpleNamespace(cfg=cfg, images=images, videos=videos, run_root=run_root, results=results, uri=uri,
                           video=video, record=record)


def test_the_preset_keeps_the_papers_structure_at_cpu_sizes():
    cpu, paper = load_config("paper-cpu"), load_config("paper")
    shape = cpu.cascade.shape
    assert (shape.frames, shape.frame_skip, shape.interpolated_frames) == (16, 5, 76)
    assert shape.sr_low_size / shape.base_size == 4 and shape.sr_high_size / shape.base_size == 12
    assert (cpu.data.images.image_size, cpu.data.videos.clip_size) == (shape.sr_high_size, shape.sr_low_size)
    for stage in ("decoder", "temporal", "interpolation", "sr_low", "sr_high"):
        ours, theirs = getattr(cpu.cascade, stage), getattr(paper.cascade, stage)
        assert ours.sampler.name == theirs.sampler.name and ours.sampler.steps < theirs.sampler.steps, stage
        assert ours.diffusion == theirs.diffusion and ours.net.channel_mult == theirs.net.channel_mult, stage
        assert (ours.keyframe, ours.candidates, ours.known_fill) == ("none", 1, "zeros"), stage  # no toy aids
    assert cpu.cascade.prior.candidates == paper.cascade.prior.candidates == 2
    assert cpu.train.pretrained_clip and cpu.world == load_config("tiny").world
    for stage in PLANNED_STAGES:
        assert cpu.train.stage(stage).video_datasets == paper.train.stage(stage).video_datasets, stage


def test_the_plan_picks_accumulation_and_checkpointing_where_memory_is_short():
    resolved = resolve_all(PLANNED_STAGES, load_config("paper-cpu"))
    chosen = {s: (train.grad_accum, train.grad_checkpointing) for s, (_, train, _) in resolved.items()}
    assert chosen["sr_low"] == (2, True)  # the largest activations; sr_high trains on 24 px crops
    assert chosen["sr_high"] == (1, False)
    assert chosen["decoder"] == chosen["prior"] == (1, False)
    assert all(plan is not None and plan.fits for _, _, plan in resolved.values())


@pytest.mark.slow
def test_every_stage_trained_on_ray_with_its_resolved_plan(paper_cpu):
    assert list(paper_cpu.results) == list(PLANNED_STAGES)  # clip is pretrained: never trained
    resolved = resolve_all(PLANNED_STAGES, paper_cpu.cfg)
    mlflow = mlflow_client(paper_cpu.uri)
    for stage, result in paper_cpu.results.items():
        params = mlflow.get_run(result.run_id).data.params
        _, train, plan = resolved[stage]
        assert plan is not None and (params["train.grad_accum"], params["train.grad_checkpointing"]) == (
            str(train.grad_accum), str(train.grad_checkpointing)), stage
        assert params["train.gpu_memory"] == "3140MB" and params["cascade.shape.frames"] == "16", stage
        assert list((paper_cpu.run_root / "ray" / stage).glob("checkpoint_*")), stage  # a Ray Train run
        # Each stage's folder, and the SR stages' second one: sr_low's images, sr_high's clips (frames).
        data = {"temporal": [paper_cpu.videos], "interpolation": [paper_cpu.videos],
                "sr_low": [paper_cpu.videos, paper_cpu.images], "sr_high": [paper_cpu.images, paper_cpu.videos]}
        data = data.get(stage, [paper_cpu.images])
        read = [d.dataset for d in mlflow.get_run(result.run_id).inputs.dataset_inputs]
        assert sorted(r.name for r in read) == sorted(Path(d).name for d in data), stage
        for folder in data:
            (match,) = [r for r in read if r.name == Path(folder).name]
            assert read_manifest(folder)["inputs_hash"].startswith(match.digest), stage
    assert (paper_cpu.results["sr_low"].steps, resolved["sr_low"][1].grad_accum) == (2, 2)  # an image step first
    params = mlflow.get_run(paper_cpu.results["sr_high"].run_id).data.params
    assert (params["train.frame_share"], params["train.crop_size"]) == ("0.5", "24")


@pytest.mark.slow
def test_temporal_read_webvid_clips_only(paper_cpu):
    rows = read_manifest(paper_cpu.videos, "videos")["source_rows"]
    assert rows["webvid"] and rows["hdvila"]  # both datasets are there; the stage chose one
    params = mlflow_client(paper_cpu.uri).get_run(paper_cpu.results["temporal"].run_id).data.params
    assert json.loads(params["train.video_datasets"]) == ["webvid"]
    assert json.loads(mlflow_client(paper_cpu.uri).get_run(paper_cpu.results["interpolation"].run_id)
                      .data.params["train.video_datasets"]) == ["webvid", "hdvila"]


@pytest.mark.slow
def test_a_video_at_the_papers_frame_arithmetic_and_sr_high_size(paper_cpu):
    record, size = paper_cpu.record, paper_cpu.cfg.cascade.shape.sr_high_size
    assert tuple(paper_cpu.video.shape) == (1, 3, 76, size, size) and size == 96  # (B, C, F, H, W)
    assert record["stage"] == "sr_high" and record["frames"] == 76 and record["size"] == (size, size)
    sidecar = json.loads(Path(record["files"]["json"]).read_text())
    assert sidecar["watermark"]["enabled"] and sidecar["prompt"] == PROMPT
    assert all(Path(path).stat().st_size for path in record["files"].values())
