"""Per-stage data routing as the paper has it: SR_l on images first, then video, its temporal layers left at
their identity start by the image steps; SR_h on images and frames of clips, as crops. Real shards, built here."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_training import image_dataset, video_dataset

from model.checkpoint import load_weights, save_weights
from model.clip import build_clip
from model.inflate import is_added
from model.networks import build_network
from pipelines.config import load_config
from pipelines.embed_videos import embed_video_dataset
from training.config import StageTrainConfig
from training.jobs import run_stage
from training.loaders.stream import iter_shard
from training.plan import trace_stage
from training.routing import Cropped, check_crop, frames_per_batch, job_batches, second_kind
from training.storage import read_manifest

DIM = 32  # the tiny preset's CLIP width


def random_image_embeddings(root, seed: int = 0) -> None:
    """embeddings/NNNNN.parquet for every shard: what the embed flow writes (random vectors will do)."""
    (root / "embeddings").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in read_manifest(str(root))["shards"]:
        keys = [s["__key__"] for s in iter_shard(str(root / shard["name"]))]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(len(keys) * DIM, np.float32)), DIM)
        name = shard["name"].split("/")[-1].replace(".tar", ".parquet")
        pq.write_table(pa.table({"key": keys, "image_emb": emb, "text_emb": emb}), root / "embeddings" / name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Images at sr_high_size (64) with embeddings, clips at sr_low_size (32) with stored frame embeddings."""
    root = tmp_path_factory.mktemp("routing")
    cfg = load_config("tiny")
    images = image_dataset(root / "images", cfg.cascade.shape.sr_high_size, shards=2, per_shard=4)
    random_image_embeddings(images)
    videos = video_dataset(root / "videos", cfg.cascade.shape.sr_low_size, shards=2, per_shard=2)
    embed_video_dataset(str(videos), cfg.cascade.clip.model_copy(update={"weights_path": None}))
    return cfg, images, videos


@pytest.mark.parametrize("stage, fields, message", [
    ("decoder", {"frame_share": 0.5, "crop_size": 16}, "only the sr_high stage"),
    ("temporal", {"image_steps": 2}, "only the sr_low stage"),
    ("sr_high", {"frame_share": 0.5}, "set train.sr_high.crop_size"),
    ("sr_low", {"image_steps": 4, "steps": 4}, "leaves none of the 4 steps"),
])
def test_a_routing_field_on_the_wrong_stage_or_without_its_partner_is_refused(stage, fields, message):
    with pytest.raises(ValueError, match=message):
        second_kind(stage, StageTrainConfig(**fields))


def test_crops_must_give_a_whole_low_res_side_the_network_can_take():
    cascade = load_config("paper").cascade  # 256 -> 768: x3, four levels
    check_crop("sr_high", cascade, StageTrainConfig(crop_size=192))
    for bad in (200, 256, 1536):  # 200: not x8; 256: 85.3 px low-res; 1536: above 768
        with pytest.raises(ValueError, match="crop_size"):
            check_crop("sr_high", cascade, StageTrainConfig(crop_size=bad))
    with pytest.raises(ValueError, match="does not split"):
        frames_per_batch(StageTrainConfig(batch_size=8, frame_share=0.25), 4)


def test_a_crop_is_drawn_from_the_samples_own_rng():
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    crop = Cropped(lambda sample, rng, progress: {"image": image, "image_emb": torch.ones(2)}, 4)
    a, b = (crop({}, np.random.default_rng(5), 0.0) for _ in range(2))
    assert torch.equal(a["image"], b["image"]) and a["image"].shape == (3, 4, 4)
    top, left = int(a["image"][0, 0, 0]) // 8, int(a["image"][0, 0, 0]) % 8
    assert torch.equal(a["image"], image[:, top:top + 4, left:left + 4])


def test_sr_high_batches_hold_image_crops_and_clip_frames(folders):
    cfg, images, videos = folders
    train = StageTrainConfig(batch_size=4, frame_share=0.5, crop_size=16, shuffle_buffer=0)
    batch = next(job_batches("sr_high", cfg.cascade, train, str(images), str(videos), rank=0, world=1,
                             start_step=0, split="auto"))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image_emb"].shape == (4, DIM)
    # The first half are images (random embeddings), the second frames of clips (CLIP's, unit norm).
    norms = batch["image_emb"].norm(dim=-1)
    torch.testing.assert_close(norms[2:], torch.ones(2))
    assert (norms[:2] - 1).abs().min() > 0.1
    assert len(set(batch["seed"].tolist())) == 4
    # sr_high's memory is planned at the crop it trains on.
    full, cropped = (trace_stage("sr_high", cfg.cascade, "fp32", crop=c) for c in (None, 16))
    assert cropped.saved_bytes < full.saved_bytes / 8 and cropped.forward_flops < full.forward_flops / 8


@pytest.mark.slow
def test_sr_low_trains_on_images_first_and_its_temporal_layers_wait_for_the_clips(folders, tmp_path):
    cfg, images, videos = folders
    clip, _, _ = build_clip(cfg.cascade.clip)  # a CLIP file: no clip stage to train first
    weights = save_weights(clip, tmp_path / "clip.safetensors", {})
    cfg = load_config("tiny", overrides=["train.sr_low.steps=2", "train.sr_low.image_steps=1",
                                         "train.sr_low.checkpoint_every=1", "train.sr_low.batch_size=2",
                                         f"cascade.clip.weights_path={weights}"])
    run_stage("sr_low", cfg, images=str(images), videos=str(videos), run_root=str(tmp_path), in_process=True)
    torch.manual_seed(cfg.train.sr_low.seed)  # the loop builds the network from the same seed
    start = build_network("sr_low", cfg.cascade).state_dict()
    first, second = sorted((tmp_path / "local" / "sr_low").glob("step_*"))  # after steps 1 and 2
    after_images, after_clips = (load_weights(step / "raw.safetensors")[0] for step in (first, second))
    temporal = [k for k in start if is_added(k)]
    spatial = [k for k in start if not is_added(k)]
    assert temporal and spatial
    # The image step moved the spatial layers only; the clip step moved the temporal ones too.
    assert all(torch.equal(after_images[k], start[k]) for k in temporal)
    assert any(not torch.equal(after_images[k], start[k]) for k in spatial)
    assert any(not torch.equal(after_clips[k], start[k]) for k in temporal)
