"""Staged training on Ray Train, tracked in MLflow: every stage for real on tiny shards built here.

Real Ray Train (the session's local cluster), a real MLflow sqlite store, the tiny preset on CPU.
One module-scoped chain trains every stage in order (clip -> embeddings -> prior, decoder -> temporal ->
interpolation, sr_low, sr_high), with the decoder on 2 workers (gloo DDP) and a worker killed in the prior
stage (MAV_FAIL_AT_STEP); the last three stages train in the test's process with the same loop
(`in_process`); the tests read its MLflow store and registry. Ray jobs cost seconds each of process
start-up on a small machine, so the chain (and one run-folder URL test) is the only place they run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from model.checkpoint import load_weights
from model.clip import build_clip, encode_images, encode_text
from model.config import cascade_preset
from model.inflate import is_added
from model.layers import resize
from model.networks import build_network
from pipelines.cli.train import add_train_commands
from pipelines.config import load_config
from pipelines.embed import write_identity, write_shard
from training.config import STAGES, StageTrainConfig, train_preset
from training.data import sample_stream, shard_urls, stage_batches
from training.faults import CHAOS_ENV
from training.job import Job
from training.jobs import job_config, run_local, run_stage, stages_for, train_all, worker_cpus
from training.lineage import describe, video_lineage
from training.loop import fps_schedule, restrict_trainable, tokenizer_for
from training.registry import load_stage_weights
from training.stages import (SPECS, ImageView, SampleRng, Stage, build_stage, downsample, requires, stage_spec,
                             weights_module)
from training.storage import read_manifest, sha256_file
from training.tracking import MlflowTracker, default_tracking_uri, mlflow_client

pytestmark = pytest.mark.slow
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
FFMPEG = "/usr/bin/ffmpeg"


# --- tiny datasets in the real formats ------------------------------------------------------------------

def shape_image(colour: str, shape: str, background: str, size: int) -> tuple[bytes, str]:
    img = Image.new("RGB", (size, size), COLOURS[background])
    draw, box = ImageDraw.Draw(img), (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), f"a {colour} {shape} on a {background} background"


def write_manifest(root: Path, kind: str, shards: list[tuple[str, int]]) -> None:
    manifest = {"kind": kind, "format": 1, "inputs_hash": f"test-{kind}", "rows": sum(n for _, n in shards),
                "counts": {"written": sum(n for _, n in shards)},
                "shards": [{"name": name, "samples": n, "sha256": sha256_file(str(root / name))}
                           for name, n in shards]}
    (root / "manifest.json").write_text(json.dumps(manifest))


def image_dataset(root: Path, size: int, shards: int = 2, per_shard: int = 8) -> Path:
    """img2dataset's layout: shards/NNNNN.tar with KEY.jpg, KEY.txt, KEY.json."""
    (root / "shards").mkdir(parents=True)
    colours, written = list(COLOURS), []
    for s in range(shards):
        name = f"shards/{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(per_shard):
                n = s * per_shard + i
                jpg, caption = shape_image(colours[n % 4], SHAPES[n // 4 % 2], colours[(n + 1 + n // 8) % 4], size)
                key = f"{s:05d}{i:04d}"
                sink.write({"__key__": key, "jpg": jpg, "txt": caption,
                            "json": json.dumps({"key": key, "caption": caption}).encode()})
        written.append((name, per_shard))
    write_manifest(root, "images", written)
    return root


def write_embeddings(root: Path, clip: torch.nn.Module, tokenizer) -> None:
    """What pipelines/embed.py writes: embeddings/NNNNN.parquet (key, image_emb, text_emb), then its
    NNNNN.done.json marker, per shard; embeddings.json (what they depend on)."""
    (root / "embeddings").mkdir(exist_ok=True)
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["shards"]:
        samples = list(wds.WebDataset(str(root / shard["name"]), shardshuffle=False, empty_check=False))
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).copy())
                              .permute(2, 0, 1) for s in samples])
        with torch.no_grad():
            image = encode_images(clip, pixels).numpy()
            text = encode_text(clip, tokenizer, [s["txt"].decode() for s in samples]).numpy()
        dim = image.shape[1]
        table = pa.table({"key": [s["__key__"] for s in samples],
                          "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), dim),
                          "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), dim)})
        identity = {"clip": {"model_name": "test"}, "dim": dim}
        write_shard(str(root), shard["name"], table, identity)
    write_identity(str(root), identity)


def video_dataset(root: Path, size: int, shards: int = 2, per_shard: int = 4) -> Path:
    """shards/NNNNN.tar with KEY.mp4 only (the video side has no text)."""
    (root / "shards").mkdir(parents=True)
    sources = ["testsrc", "testsrc2", "rgbtestsrc", "smptebars"]
    written = []
    for s in range(shards):
        name = f"shards/{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(per_shard):
                src, out = f"{sources[i % 4]}=size={size}x{size}:rate=12", root / "clip.mp4"
                subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i", src, "-ss", str(0.25 * s),
                                "-t", "2", "-c:v", "libx264", "-g", "4", "-pix_fmt", "yuv420p", str(out)], check=True)
                sink.write({"__key__": f"{s:05d}{i:04d}", "mp4": out.read_bytes()})
                out.unlink()
        written.append((name, per_shard))
    write_manifest(root, "videos", written)
    return root


# --- the chain: every stage once, in order, on Ray Train with a real MLflow store -----------------------

CHAOS_STAGE, CHAOS_STEP, CHAOS_STEPS = "prior", 4, 6
# Trained in the test's process with the same loop (run_stage(in_process=True)): a Ray Train job costs ~25 s
# of process start-up here, and these stages add no Ray path the others do not take.
IN_PROCESS = ("sr_high", "interpolation", "sr_low")


def tiny_config() -> SimpleNamespace:
    """The tiny preset; the decoder on 2 Ray workers (gloo DDP) on the sample split, so that they see the
    global batches one worker sees; the chaos stage runs long enough to fail after a logged step that no
    checkpoint holds."""
    train = train_preset("tiny")
    updates = {CHAOS_STAGE: getattr(train, CHAOS_STAGE).model_copy(update={"steps": CHAOS_STEPS}),
               "decoder": train.decoder.model_copy(update={"num_workers": 2, "data_split": "samples"})}
    return SimpleNamespace(cascade=cascade_preset("tiny"), train=train.model_copy(update=updates))


@pytest.fixture(scope="module")
def chain(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    cfg = tiny_config()
    shape = cfg.cascade.shape
    images = image_dataset(root / "images", shape.sr_high_size)
    videos = video_dataset(root / "videos", shape.sr_low_size)
    run_root = root / "run"
    uri = default_tracking_uri(str(run_root))
    results = train_all(["clip"], cfg, images=str(images), run_root=str(run_root))
    # What the embed flow does after the clip stage: embeddings beside the shards, from the trained CLIP.
    clip, _, tokenizer = build_clip(cfg.cascade.clip)
    clip.load_state_dict(load_stage_weights("clip", "mlflow", uri)[0])
    write_embeddings(images, clip, tokenizer)
    os.environ[CHAOS_ENV] = str(CHAOS_STEP)  # the chaos knob, for the chaos stage only
    try:
        results.update(train_all([CHAOS_STAGE], cfg, images=str(images), run_root=str(run_root)))
    finally:
        os.environ.pop(CHAOS_ENV)
    for stages, in_process in ((["temporal", "decoder"], False), (list(IN_PROCESS), True)):  # put in order
        results.update(train_all(stages, cfg, images=str(images), videos=str(videos), run_root=str(run_root),
                                 in_process=in_process))
    return SimpleNamespace(cfg=cfg, images=images, videos=videos, run_root=run_root, uri=uri, results=results)


def stage_job(chain, name: str):
    """The job the driver hands the workers for `name` (its upstream weights come from the registry)."""
    data = chain.images if stage_spec(name).data == "images" else chain.videos
    return Job(stage=name, cascade=chain.cfg.cascade, train=chain.cfg.train.stage(name), data=str(data),
               run_root=str(chain.run_root), tracking_uri=chain.uri,
               sources={dep: "mlflow" for dep in requires(name, chain.cfg.cascade)})


def first_batch(job, stage) -> dict[str, torch.Tensor]:
    return next(stage_batches(job.data, stage.spec.view(job.cascade), global_batch=job.train.batch_size, rank=0,
                              world=1, seed=job.train.seed, total_steps=job.train.steps,
                              tokenizer=tokenizer_for(stage), shuffle_buffer=job.train.shuffle_buffer))


def fixed_batch_loss(chain, name: str, trained: bool) -> float:
    """The stage's loss on its first batch, with the worker's initial weights or the registered ones."""
    job = stage_job(chain, name)
    torch.manual_seed(job.train.seed)  # as the worker does: the same initial weights
    stage, module = build_stage(name, job.cascade, job.load)
    if trained:
        weights_module(module).load_state_dict(load_stage_weights(name, "mlflow", chain.uri)[0])
    batch = first_batch(job, stage)
    with torch.no_grad():
        return float(stage.loss(module, batch, SampleRng(batch["seed"])))


STAGE_NAMES = ("clip", "prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high")


def test_every_stage_trains_is_tracked_and_registered(chain) -> None:
    mlflow = mlflow_client(chain.uri)
    assert list(chain.results) == ["clip", "prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high"]
    for name in STAGE_NAMES:
        result = chain.results[name]
        run = mlflow.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert "mlflow.parentRunId" in run.data.tags
        params = run.data.params
        assert params["stage"] == name and int(params["train.steps"]) == result.steps
        assert params["cascade.shape.frames"] == str(chain.cfg.cascade.shape.frames)
        if name in IN_PROCESS:  # no Ray run; the last two checkpoints in local/<stage>
            assert not (chain.run_root / "ray" / name).exists(), name
            kept = [int(p.name.split("_")[1]) for p in sorted((chain.run_root / "local" / name).glob("step_*"))]
            assert kept == [result.steps - 2, result.steps], name
        else:  # the local cluster's 2 cores shared by the stage's workers, not Ray's default of 1 each
            assert params["worker.torch_threads"] == str(2 // int(params["train.num_workers"])), name
            assert list((chain.run_root / "ray" / name).glob("checkpoint_*")), name
        steps = [m.step for m in mlflow.get_metric_history(result.run_id, "loss")]
        assert steps == list(range(1, result.steps + 1)), name
        assert {"lr", "samples_per_s"} <= set(run.data.metrics)
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        kind = "videos" if name in ("temporal", "interpolation", "sr_low") else "images"
        assert dataset.digest == f"test-{kind}"
        current = mlflow.get_model_version_by_alias(f"mav-{name}", "current")
        assert int(current.version) == result.version and current.run_id == result.run_id
        assert Path(result.weights_path).is_file()
    previews = [a.path for a in mlflow.list_artifacts(chain.results["temporal"].run_id, "samples")]
    assert previews == ["samples/step_0000004.gif"]


def test_the_video_stages_trained_on_text_free_data(chain) -> None:
    """The quality bar's premise, read back from the runs behind the registered weights."""
    lineage = video_lineage(chain.uri)
    assert lineage["text_free"] and lineage["problems"] == [], lineage["problems"]
    assert list(lineage["stages"]) == ["temporal", "interpolation", "sr_low"]  # image stages are not asked
    assert {e["dataset"] for e in lineage["stages"].values()} == {str(chain.videos)}
    (scanned,) = lineage["datasets"]  # one dataset behind three stages, read once
    assert scanned["samples"] == lineage["video_samples"] == 8 and scanned["members"] == {"mp4": 8}
    assert "trained on 8 clips in 2 shards; 0 carried text" in describe(lineage)


def test_a_progress_line_reaches_the_worker_logs_once(chain) -> None:
    """Ray Train patches print in its workers to log it too (stdout and stderr, both sent to the driver):
    each worker that trained temporal has its last progress line once in its .out and .err together."""
    import ray

    steps = chain.results["temporal"].steps
    line = f"[temporal] step {steps}/{steps} loss"
    counts: dict[str, int] = {}
    for path in Path(ray._private.worker._global_node.get_logs_dir_path()).glob("worker-*"):
        if path.suffix in (".out", ".err"):
            counts[path.stem] = counts.get(path.stem, 0) + path.read_text(errors="replace").count(line)
    assert [c for c in counts.values() if c] and all(c <= 1 for c in counts.values()), counts


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_training_lowers_the_loss_on_a_fixed_batch(chain, name: str) -> None:
    before, after = fixed_batch_loss(chain, name, False), fixed_batch_loss(chain, name, True)
    assert after < before, f"{name}: {before:.4f} -> {after:.4f}"


def test_a_killed_worker_resumes_from_its_last_checkpoint(chain) -> None:
    """MAV_FAIL_AT_STEP=4 with checkpoints every 2 steps: step 3 was logged, then the worker died; the
    restart resumes at the step-2 checkpoint (not 0), replays step 3 without logging it twice, finishes."""
    result = chain.results[CHAOS_STAGE]
    assert (chain.run_root / CHAOS_STAGE / f".chaos-{CHAOS_STEP}").is_file()  # the failure did happen
    assert result.steps == CHAOS_STEPS
    mlflow = mlflow_client(chain.uri)
    steps = [m.step for m in mlflow.get_metric_history(result.run_id, "loss")]
    assert steps == list(range(1, CHAOS_STEPS + 1))  # every step once: none lost, none twice
    every = chain.cfg.train.stage(CHAOS_STAGE).checkpoint_every
    resumed = [(m.step, m.value) for m in mlflow.get_metric_history(result.run_id, "resumed_at_step")]
    last_checkpoint = (CHAOS_STEP - 1) // every * every
    assert resumed == [(last_checkpoint, float(last_checkpoint))]
    state = json.loads(next((chain.run_root / "ray" / CHAOS_STAGE).glob("checkpoint_*/state.json")).read_text())
    assert state["mlflow_run_id"] == result.run_id


def test_temporal_starts_as_the_registered_decoder_frame_by_frame(chain) -> None:
    """Identity init through the real path: decoder saved -> registered -> loaded -> inflated."""
    job = stage_job(chain, "temporal")
    stage, temporal = build_stage("temporal", job.cascade, job.load)  # what the temporal workers build
    state, meta = load_stage_weights("decoder", "mlflow", chain.uri)
    assert meta["config"]["stage"] == "decoder"
    decoder = build_network("decoder", job.cascade)
    decoder.load_state_dict(state)
    batch = first_batch(job, stage)
    video = batch["video"]  # (B, C, F, H, W), distinct frames
    t = torch.tensor([10, 500, 900, 999])[: video.shape[0]]
    cond = stage.video_embedding(video)
    with torch.no_grad():
        out = temporal(video, t, cond_emb=cond, fps=batch["fps"])
        frames = torch.stack([decoder(video[:, :, f], t, cond_emb=cond) for f in range(video.shape[2])], dim=2)
    torch.testing.assert_close(out, frames, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(frames[:, :, 0], frames[:, :, 1])


def test_two_ray_workers_give_the_loss_curve_of_one_worker(chain, tmp_path) -> None:
    """The chain's decoder ran on 2 Ray workers (gloo DDP, 2 samples each of a global batch of 4); the same
    loop as one worker with the whole batch of 4 logs the same losses, step by step."""
    ddp_run = mlflow_client(chain.uri).get_run(chain.results["decoder"].run_id)
    assert ddp_run.data.params["train.num_workers"] == "2"
    uri = default_tracking_uri(str(tmp_path))
    run_id = MlflowTracker(uri, "reference").start("decoder-one-worker")
    train = chain.cfg.train
    one = train.model_copy(update={"decoder": train.decoder.model_copy(update={"num_workers": 1})})
    config = job_config("decoder", SimpleNamespace(cascade=chain.cfg.cascade, train=one), str(chain.images),
                        str(tmp_path), tracking_uri=uri, experiment="reference", run_id=run_id)
    run_local(config, tmp_path / "checkpoints")
    single = [m.value for m in mlflow_client(uri).get_metric_history(run_id, "loss")]
    ddp = [m.value for m in mlflow_client(chain.uri).get_metric_history(ddp_run.info.run_id, "loss")]
    assert len(single) == len(ddp) == train.decoder.steps
    np.testing.assert_allclose(ddp, single, rtol=1e-4)


def test_a_stage_trained_in_process_resumes_where_it_stopped(tmp_path, monkeypatch) -> None:
    """run_stage(in_process=True): no Ray. A failure at step 4 (checkpoints every 2 steps, step 3 logged)
    leaves the step-2 checkpoint; the re-run resumes the same MLflow run there, logs every step once,
    keeps the last two checkpoints and registers the weights. A URL run folder is refused up front."""
    cfg = tiny_config()
    cfg.train = cfg.train.model_copy(update={"clip": cfg.train.clip.model_copy(update={"steps": 6})})
    images = image_dataset(tmp_path / "images", cfg.cascade.shape.sr_high_size, shards=1)
    run_root, uri = tmp_path / "run", default_tracking_uri(str(tmp_path / "run"))
    monkeypatch.setenv(CHAOS_ENV, "4")
    with pytest.raises(RuntimeError, match="chaos"):
        run_stage("clip", cfg, images=str(images), run_root=str(run_root), in_process=True)
    monkeypatch.delenv(CHAOS_ENV)
    assert [p.name for p in (run_root / "local" / "clip").glob("step_*")] == ["step_0000002"]
    result = run_stage("clip", cfg, images=str(images), run_root=str(run_root), in_process=True)
    mlflow = mlflow_client(uri)
    assert [m.step for m in mlflow.get_metric_history(result.run_id, "loss")] == list(range(1, 7))
    assert [m.step for m in mlflow.get_metric_history(result.run_id, "resumed_at_step")] == [2]
    assert sorted(p.name for p in (run_root / "local" / "clip").glob("step_*")) == ["step_0000004", "step_0000006"]
    assert not (run_root / "ray").exists()
    assert mlflow.get_model_version_by_alias("mav-clip", "current").run_id == result.run_id
    assert load_weights(result.weights_path)[1]["steps"] == 6
    with pytest.raises(ValueError, match="local folder"):
        run_stage("clip", cfg, images=str(images), run_root="s3://bucket/run", tracking_uri=uri, in_process=True)


def test_a_run_folder_url_goes_through_fsspec(ray_session, tmp_path, monkeypatch) -> None:
    """--out as a URL (here file://, the same fsspec and Ray storage calls as s3://): Ray Train keeps its
    checkpoints there, the weights land there and load from the URL, a re-run skips the done stage; an
    object-store folder without a tracking server is refused before anything starts."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config()
    images = image_dataset(tmp_path / "images", cfg.cascade.shape.sr_high_size)
    url, uri = (tmp_path / "run").as_uri(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_stage("clip", cfg, images=str(images), run_root=url, tracking_uri=uri)
    assert result.weights_path == f"{url}/clip/clip.safetensors"
    assert load_weights(result.weights_path)[1]["steps"] == cfg.train.clip.steps
    assert list((tmp_path / "run" / "ray" / "clip").glob("checkpoint_*/weights.safetensors"))
    assert run_stage("clip", cfg, images=str(images), run_root=url, tracking_uri=uri) == result
    with pytest.raises(ValueError, match="name a tracking server"):
        run_stage("clip", cfg, images=str(images), run_root="s3://bucket/run")


# --- without Ray: the data split, the boundaries, the command ---------------------------------------------

def test_a_video_stage_draws_its_clips_at_its_configured_fps(tmp_path) -> None:
    """train.<stage>.fps_min / fps_max / fps_mean reach the clip decoder: the test videos run at 12 fps, so
    fps 2 takes every 6th frame and fps 12 every frame, and each clip carries the fps it got; a range
    upside down or a mean outside (0, 1) is refused with the field named."""
    cascade = cascade_preset("tiny")
    videos = video_dataset(tmp_path / "videos", cascade.shape.sr_low_size, shards=1, per_shard=2)
    view = stage_spec("temporal").view(cascade)
    for fps in (2, 12):
        cfg = StageTrainConfig(fps_min=fps, fps_max=fps, fps_mean=(0.3, 0.6))
        batch = next(stage_batches(str(videos), view, global_batch=2, rank=0, world=1, seed=0, total_steps=4,
                                   fps=fps_schedule(cfg)))
        assert batch["fps"].tolist() == [float(fps)] * 2
    with pytest.raises(ValueError, match="fps_min 8 is above fps_max 4"):
        StageTrainConfig(fps_min=8, fps_max=4)
    with pytest.raises(ValueError, match="fps_mean"):
        StageTrainConfig(fps_mean=(0.0, 0.5))


def test_workers_split_the_global_batch_exactly(tmp_path) -> None:
    """Two workers' batches together are the one-worker batch, sample for sample, at every step, also
    after resuming at a later step; 'shards' gives each worker its own shards."""
    images = image_dataset(tmp_path / "images", 16, shards=2, per_shard=6)
    view = ImageView(16, embeddings=False, tokens=False)

    def batches(rank: int, world: int, start: int = 0, split: str = "samples", n: int = 4) -> list[dict]:
        it = stage_batches(str(images), view, global_batch=4, rank=rank, world=world, seed=3, total_steps=8,
                           start_step=start, split=split, shuffle_buffer=5)
        return [next(it) for _ in range(n)]

    one, (r0, r1) = batches(0, 1), (batches(0, 2), batches(1, 2))
    for step, whole in enumerate(one):  # 12 samples, batch 4: step 3 starts the second epoch
        merged = {k: torch.stack([r0[step][k], r1[step][k]], 1).flatten(0, 1) for k in whole}
        assert torch.equal(merged["seed"], whole["seed"]) and torch.equal(merged["image"], whole["image"])
    assert len(set(torch.cat([b["seed"] for b in one]).tolist())) == 16  # distinct seeds across epochs
    assert torch.equal(batches(0, 1, start=2, n=1)[0]["seed"], one[2]["seed"])
    own = [batches(r, 2, split="shards", n=1)[0]["seed"] for r in (0, 1)]
    assert not set(own[0].tolist()) & set(own[1].tolist())
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        batches(0, 3)


def test_the_stream_shuffles_samples_across_shards_and_epochs(tmp_path) -> None:
    """With a shuffle buffer every epoch still holds each sample once, in a new order that mixes the
    shards (a batch no longer holds the same neighbours every epoch); the order follows the seed only."""
    images = image_dataset(tmp_path / "images", 8, shards=3, per_shard=10)
    urls = shard_urls(str(images), read_manifest(str(images), "images"))

    def epochs(seed: int, buffer: int) -> list[list[str]]:
        stream = sample_stream(urls, seed, shuffle_buffer=buffer)
        keys = [next(stream)[1]["__key__"] for _ in range(90)]
        return [keys[i:i + 30] for i in range(0, 90, 30)]

    plain, mixed = epochs(1, 0), epochs(1, 8)
    for epoch in plain:  # shard order changes, samples within a shard do not
        assert [k for k in epoch if k.startswith("00001")] == [f"00001{i:04d}" for i in range(10)]
    for epoch in mixed:
        assert sorted(epoch) == sorted(plain[0])  # every sample once per epoch
        assert len({k[:5] for k in epoch[:15]}) > 1  # the first half of an epoch mixes shards
    assert mixed[0] != mixed[1] != mixed[2]
    assert epochs(1, 8) == mixed and epochs(2, 8) != mixed


def test_a_stage_fails_early_with_a_clear_message(tmp_path) -> None:
    cfg = tiny_config()
    images = image_dataset(tmp_path / "images", 16, shards=1, per_shard=4)
    with pytest.raises(ValueError, match="reads videos"):
        run_stage("temporal", cfg, images=str(images), run_root=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="holds a 'images' dataset"):
        run_stage("temporal", cfg, videos=str(images), run_root=str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="run the embed flow"):
        run_stage("decoder", cfg, images=str(images), run_root=str(tmp_path / "run"))
    videos = video_dataset(tmp_path / "videos", 16, shards=1, per_shard=1)
    with pytest.raises(LookupError, match="mav-decoder"):  # temporal starts from the registered decoder
        run_stage("temporal", cfg, videos=str(videos), run_root=str(tmp_path / "run"))


def test_a_worker_reserves_its_share_of_the_cores() -> None:
    assert worker_cpus(StageTrainConfig(), [16.0, 2.0]) == 2  # the smallest node bounds a worker
    assert worker_cpus(StageTrainConfig(num_workers=2), [8.0, 8.0]) == 4
    assert worker_cpus(StageTrainConfig(num_workers=4), [2.0]) == 1
    assert worker_cpus(StageTrainConfig(cpus_per_worker=3), [2.0]) == 3
    assert worker_cpus(StageTrainConfig(), [0.0]) == 1  # a head node without CPUs does not count


def test_trainable_temporal_keeps_the_image_weights() -> None:
    """train.<stage>.trainable="temporal": an optimiser step changes the temporal layers and the fps
    embedding that inflation added, never the image decoder's spatial weights; a stage without temporal
    layers is refused by name."""
    cascade = cascade_preset("tiny")
    torch.manual_seed(0)
    net = build_network("temporal", cascade)
    restrict_trainable(net, "temporal", "temporal")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    video = torch.randn(2, 3, cascade.shape.frames, cascade.shape.base_size, cascade.shape.base_size)
    out = net(video, torch.tensor([10, 500]), cond_emb=torch.randn(2, cascade.clip.embed_dim),
              fps=torch.tensor([4.0, 8.0]))
    out.pow(2).mean().backward()
    optimizer.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(is_added(k) for k in changed)
    assert any(".temporal." in k for k in changed)
    spatial = [k for k, p in net.named_parameters() if not is_added(k)]
    assert spatial and not any(net.get_parameter(k).requires_grad for k in spatial)
    with pytest.raises(ValueError, match="decoder has no temporal layers"):
        restrict_trainable(build_network("decoder", cascade), "temporal", "decoder")


def test_the_toy_preset_trains_only_what_inflation_added_to_dt() -> None:
    """The toy preset's Dt keeps the image decoder's spatial weights (a Dt that trains every weight on a few
    hundred clips loses the shapes): on the toy-size network only the temporal layers and the fps embedding
    require a gradient; F and sr_low, which start from video weights or from scratch, train every weight."""
    cascade, train = cascade_preset("toy"), train_preset("toy")
    net = build_network("temporal", cascade)
    restrict_trainable(net, train.temporal.trainable, "temporal")
    trains = {k for k, p in net.named_parameters() if p.requires_grad}
    assert trains and all(is_added(k) for k in trains)
    assert any(".temporal." in k for k in trains) and any("fps" in k for k in trains)
    kept = sum(p.numel() for k, p in net.named_parameters() if k not in trains)
    assert kept > sum(p.numel() for k, p in net.named_parameters() if k in trains)  # most weights stay as on images
    for stage in ("interpolation", "sr_low"):
        other = build_network(stage, cascade)
        restrict_trainable(other, train.stage(stage).trainable, stage)
        assert all(p.requires_grad for p in other.parameters())


def test_train_command_and_stage_order() -> None:
    parser = argparse.ArgumentParser(prog="mav")
    add_train_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "all", "--preset", "tiny", "--images", "i", "--out", "r", "--force"])
    assert (args.stage, args.preset, args.images, args.videos, args.out, args.force) == ("all", "tiny", "i", None,
                                                                                         "r", True)
    cascade = cascade_preset("tiny")
    assert stages_for(["all"], cascade) == list(STAGES)
    pretrained = cascade.model_copy(update={"clip": cascade.clip.model_copy(update={"weights_path": "c.pt"})})
    assert stages_for(["all"], pretrained) == [s for s in STAGES if s != "clip"]
    assert stages_for(["sr_high", "prior", "temporal"], cascade) == ["prior", "temporal", "sr_high"]
    with pytest.raises(ValueError, match="unknown stages"):
        stages_for(["decoderr"], cascade)


def test_a_stopped_stage_is_not_resumed_with_other_settings(tmp_path):
    """Resuming into a stopped attempt's run and checkpoints with changed settings would mix two
    trainings (MLflow itself refuses changed params deep inside the workers): a clear error first."""
    images = tmp_path / "images"
    (images / "shards").mkdir(parents=True)
    (images / "shards" / "00000.tar").write_bytes(b"")
    (images / "manifest.json").write_text(json.dumps({"kind": "images", "shards": [
        {"name": "shards/00000.tar", "samples": 1}]}))
    folder = tmp_path / "run" / "clip"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run_id": "0" * 32, "settings": "other"}))
    with pytest.raises(ValueError, match="other settings"):
        run_stage("clip", load_config("tiny"), images=str(images), run_root=str(tmp_path / "run"))


def test_a_residual_sr_stage_learns_the_difference_to_the_upsample():
    """With prediction x0 and a net that outputs zeros (an SR net at init), the residual stage's loss is
    the upsample's error; the plain stage's is the error of predicting grey."""
    cfg = cascade_preset("tiny")
    batch = {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1,
             "image_emb": torch.zeros(2, 32)}
    zero_net = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    stage = Stage(SPECS["sr_high"], cfg)
    base = resize(downsample(batch["image"], 32), 64)
    loss = stage.loss(zero_net, batch, SampleRng(torch.tensor([0, 1])))
    torch.testing.assert_close(loss, ((batch["image"] - base) ** 2).mean())
    plain_cfg = cfg.model_copy(update={"sr_high": cfg.sr_high.model_copy(
        update={"diffusion": cfg.sr_high.diffusion.model_copy(update={"residual": False})})})
    plain = Stage(SPECS["sr_high"], plain_cfg).loss(zero_net, batch, SampleRng(torch.tensor([0, 1])))
    torch.testing.assert_close(plain, (batch["image"] ** 2).mean())
